"""Run ids and train ids of every row of every shipped table on `tiny` are pinned: moving code,
renaming modules or reshaping specs must not orphan a user's finished runs.

`tests/data/golden_ids.json` was computed before the repository's layout changed (issue 28), and
computed again when the tiny suite's held-out splits grew (issue 29: every tiny id moved, as the
records fingerprint the suite they read); regenerate it only for a change that means to move ids,
and say so in the commit.
"""

import json
from pathlib import Path

import pytest

GOLDEN = Path(__file__).parent / "data" / "golden_ids.json"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def shipped_ids() -> dict[str, list[str]]:
    """'table/row label/task' → [run id, train id] for seed 0 on tiny, every shipped table."""
    from hydrabench.config.tables import load_table, table_names
    from hydrabench.pipeline.resolve import table_runs

    return {f"{name}/{row.label}/{task}": [spec.run_id, spec.train_id]
            for name in table_names()
            for row, task, spec in table_runs(load_table(name), "tiny", (0,))}


@pytest.fixture
def shared_data(monkeypatch: pytest.MonkeyPatch) -> None:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is not here: the ids fingerprint its files")
    monkeypatch.setenv("HYDRABENCH_DATA_DIR", str(SHARED_DATA))


def test_every_shipped_table_row_keeps_its_run_and_train_ids(shared_data: None) -> None:
    golden = json.loads(GOLDEN.read_text(encoding="utf-8"))
    now = shipped_ids()
    # New tables and rows may come; the pinned ones stay.
    gone = sorted(set(golden) - set(now))
    assert not gone, f"pinned table rows no longer resolve: {gone}"
    moved = {key: (ids, now[key]) for key, ids in golden.items() if now[key] != ids}
    assert not moved, f"ids moved: {moved}"
