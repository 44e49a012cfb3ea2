"""RunRecord, the one place a run record's fields are named: the shapes on disk load, bad ones are
one line naming the file, and no module outside the store reads a record by string key."""

from __future__ import annotations

import ast
import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest

from hydrabench.records.store import CorruptRecord, RunRecord, RunStore

PACKAGE = Path(__file__).resolve().parents[1] / "hydrabench"

TRAIN_METERING = {"energy": {"total_kwh": 1e-5, "energy_measured": False},
                  "throughput": {"wall_s": 2.0, "tokens_per_s": 500.0}}
EVAL_METERING = {"energy": {"total_kwh": None}, "throughput": {"wall_s": 1.0, "requests": 12}}

# A record as the runner wrote it before the metering was kept once (values cut down): the
# training's metering in training.metering.train and in metering.train.
WRITTEN = {
    "run_id": "lora-medical-s0-0123456789abcdef", "method": "lora", "task": "medical", "seed": 0,
    "spec": {"method": "lora", "task": "medical", "profile": "tiny", "inputs": {"model": "m"}},
    "profile": {"name": "tiny", "model": "builtin:tiny"},
    "metrics": {"tiny_medical": {
        "metrics": {"acc,none": 0.5, "acc_norm,none": 0.25},
        "stderr": {"acc,none": 0.1, "acc_norm,none": None}, "primary": "acc,none",
        "value": 0.5, "n": 6, "n_shot": 0, "version": 1.0}},
    "column_tasks": ["tiny_medical"], "stand_in": True,
    "data_source": "train: synthetic suite (generated); eval: synthetic suite (generated)",
    "backend": "hf", "merge": None, "serving": None, "merge_gap": None,
    "artifact": "artifacts/lora-s0-fedcba9876543210",  # relative to the results root
    "train_id": "lora-s0-fedcba9876543210",
    "training": {"trained": True, "train": {"steps": 6, "first_loss": 7.0, "final_loss": 6.0},
                 "train_records": 40, "metering": {"train": TRAIN_METERING},
                 "parameters": {"adapter": 4096, "percent_param": 1.5},
                 "train_id": "lora-s0-fedcba9876543210",
                 "inputs": {"model": "m", "corpus": {"synthetic": "c"}}},
    "metering": {"train": TRAIN_METERING, "eval": EVAL_METERING},
    "provenance": {"model_source": "builtin:tiny", "model_fingerprint": "m",
                   "data_fingerprints": {"synthetic": "c"}, "task_fingerprints": {},
                   "data_source": "local", "packages": {"lm_eval": "0.4"},
                   "git": {"commit": "abc", "dirty": False}, "python": "3.11.7",
                   "hardware": {"logical_cores": 2}},
    "wall_s": {"total": 3.5}, "finished_at": "2026-12-01T21:46:33Z"}

# The smallest record reports read (as tests write them by hand, and the first records were).
MINIMAL = {"run_id": "base-medical-s0-0123456789abcdef", "method": "base", "task": "medical",
           "seed": 0, "metrics": {}, "column_tasks": [], "training": {}}


def test_a_record_loads_typed_and_keeps_its_keys_with_the_training_metering_once() -> None:
    record = RunRecord.from_dict(copy.deepcopy(WRITTEN))
    medical = record.metrics["tiny_medical"]
    assert (medical.value, medical.n, medical.key("acc_norm")) == (0.5, 6, "acc_norm,none")
    assert record.score == 0.5 and record.column_tasks == ("tiny_medical",)
    assert record.training.percent_param == 1.5 and record.training.train["steps"] == 6
    assert record.metering.train == TRAIN_METERING and record.metering.export is None
    assert record.provenance.python == "3.11.7" and record.artifact == Path(WRITTEN["artifact"])
    written = record.to_dict()
    assert set(written) == set(WRITTEN)  # external checks read record.json by these keys
    expected = copy.deepcopy(WRITTEN)
    del expected["training"]["metering"]  # the one copy is metering.train
    assert json.loads(json.dumps(written)) == {**expected,
                                               "metering": {**WRITTEN["metering"], "export": None}}
    assert RunRecord.from_dict(json.loads(json.dumps(written))) == record


def test_older_shapes_still_load() -> None:
    # Figure fixtures and the earliest records: the training's metering only in training.
    only_in_training = copy.deepcopy(WRITTEN)
    del only_in_training["metering"]
    assert RunRecord.from_dict(only_in_training).metering.train == TRAIN_METERING
    minimal = RunRecord.from_dict(MINIMAL)
    assert minimal.spec is None and minimal.training.trained is None
    assert minimal.metering.train is None and minimal.stand_in is None


def _broken(change: Any) -> dict[str, Any]:
    record = copy.deepcopy(WRITTEN)
    change(record)
    return record


BROKEN = {
    "seed a string": (_broken(lambda r: r.update(seed="0")), "seed"),
    "no run id": (_broken(lambda r: r.pop("run_id")), "run_id"),
    "a value not a number": (_broken(lambda r: r["metrics"]["tiny_medical"].update(value="x")),
                             "value"),
    "a column task without metrics": (_broken(lambda r: r.update(column_tasks=["tiny_bbh"])),
                                      "tiny_bbh"),
    "an unknown field": (_broken(lambda r: r.update(score=1.0)), "score"),
    "provenance not an object": (_broken(lambda r: r.update(provenance=[])), "provenance"),
    "a list": ([WRITTEN], "JSON object"),
}


@pytest.mark.parametrize("kind", BROKEN)
def test_a_bad_record_is_one_line_naming_the_file(kind: str, tmp_path: Path) -> None:
    record, named = BROKEN[kind]
    store = RunStore(tmp_path / "results")
    path = store.record_path(WRITTEN["run_id"])
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(record))
    with pytest.raises(CorruptRecord) as err:
        store.load(WRITTEN["run_id"])
    message = str(err.value)
    assert message.startswith(f"corrupt record {path}: ") and named in message
    assert "\n" not in message


# A record is held in a name like these; outside store.py it is read through RunRecord.
RECORD_NAME = re.compile(r"(rec|record|\w+_record)")


def _string_key_reads(tree: ast.AST) -> list[int]:
    """Lines where a record-named variable is subscripted, or .get(), with a string."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript):
            target, key = node.value, node.slice
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "get" and node.args):
            target, key = node.func.value, node.args[0]
        else:
            continue
        if (isinstance(target, ast.Name) and RECORD_NAME.fullmatch(target.id)
                and isinstance(key, ast.Constant) and isinstance(key.value, str)):
            lines.append(node.lineno)
    return lines


def test_the_scan_finds_string_key_reads() -> None:
    code = 'a = record["metrics"]\nb = rec.get("seed")\nc = base_record["x"]\nd = row["x"]'
    assert _string_key_reads(ast.parse(code)) == [1, 2, 3]


def test_no_module_outside_the_store_reads_a_record_by_string_key() -> None:
    found = [f"{path.relative_to(PACKAGE.parent)}:{line}"
             for path in sorted(PACKAGE.rglob("*.py")) if path.name != "store.py"
             for line in _string_key_reads(ast.parse(path.read_text(encoding="utf-8")))]
    assert not found, f"read these through store.RunRecord: {', '.join(found)}"
