"""Shared test set-up: offline hub, a persistent cache for the tiny base model, isolated stores."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

# No internet here: any accidental hub access fails at once instead of retrying. Set before
# transformers / datasets are imported, which read these variables on import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tiny base model takes ~25 s to build; build it once and reuse it across test sessions.
os.environ.setdefault("HYDRABENCH_CACHE", str(REPO / ".cache" / "hydrabench"))


@pytest.fixture
def store_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Results and reports of this test go to a fresh directory."""
    monkeypatch.setenv("HYDRABENCH_RESULTS", str(tmp_path / "results"))
    monkeypatch.setenv("HYDRABENCH_REPORTS", str(tmp_path / "reports"))
    return tmp_path
