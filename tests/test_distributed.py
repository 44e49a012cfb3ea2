"""Training in 2 processes (torchrun, gloo on CPU) reaches the loss of 1 process with the same
global batch and seed: DDP for adapters, FSDP2 (the profile's `sharding: {full: fsdp_full}`) for
full fine-tuning. Real processes, the real launcher and real SIGKILLs; dropout 0 so the runs are
comparable (with dropout each process draws its own masks)."""

import json
from pathlib import Path

import pytest
from conftest import artifact_info, finish, kill_when, start, torchrun
from safetensors.torch import load_file

# torchrun: several training processes per test: `make test`, not the fast tier.
pytestmark = pytest.mark.slow

COMMON = ["--task", "medical", "--batch-size", "8", "--dropout", "0", "--limit", "2"]
LORA = ["run", "--method", "lora", "--max-steps", "8", *COMMON]
# Enough steps that a kill lands mid-training; a checkpoint every 5 steps.
FULL = ["run", "--method", "full", "--max-steps", "40", "--checkpoint-every", "5", *COMMON]


def trained(args: list[str], results: Path, processes: int = 1) -> dict:
    finish(start(args, results, torchrun(processes) if processes > 1 else None))
    return artifact_info(results)["train"]


def weights(results: Path) -> dict:
    (checkpoint,) = results.glob("artifacts/*/model.safetensors")
    return load_file(checkpoint)


def test_two_processes_match_one(tmp_path: Path) -> None:
    single = trained(LORA, tmp_path / "single")
    double = trained(LORA, tmp_path / "double", processes=2)
    assert (single["processes"], double["processes"]) == (1, 2)
    assert (single["strategy"], double["strategy"]) == ("single", "ddp")
    assert double["steps"] == single["steps"] == 8
    assert double["trained_tokens"] == single["trained_tokens"]
    # Same global batch: the same losses up to float32 summation order across 2 processes.
    assert double["first_loss"] == pytest.approx(single["first_loss"], rel=1e-5)
    assert double["final_loss"] == pytest.approx(single["final_loss"], rel=1e-4)
    records = list((tmp_path / "double").glob("runs/*/record.json"))
    assert len(records) == 1  # rank 0 alone writes


@pytest.fixture(scope="module")
def full_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Full fine-tuning uninterrupted in 1 process and, sharded, in 2."""
    root = tmp_path_factory.mktemp("full")
    for name, processes in (("single", 1), ("sharded", 2)):
        trained(FULL, root / name, processes)
    return {"single": root / "single", "sharded": root / "sharded"}


def test_sharded_full_finetuning_matches_one_process(full_runs: dict[str, Path]) -> None:
    single = artifact_info(full_runs["single"])["train"]
    sharded = artifact_info(full_runs["sharded"])["train"]
    assert (single["strategy"], sharded["strategy"]) == ("single", "fsdp:fsdp_full")
    assert sharded["trained_tokens"] == single["trained_tokens"]
    assert sharded["first_loss"] == pytest.approx(single["first_loss"], rel=1e-5)
    assert sharded["final_loss"] == pytest.approx(single["final_loss"], rel=1e-3)
    # Rank 0 saved the whole model, gathered from the shards, as a plain checkpoint; 40 AdamW
    # steps from the same start land within float32 reduction noise of the 1-process weights.
    one, two = weights(full_runs["single"]), weights(full_runs["sharded"])
    assert one.keys() == two.keys()
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 5e-3
    record = json.loads(next(full_runs["sharded"].glob("runs/*/record.json")).read_text())
    assert record["spec"]["train"]["sharding"]["name"] == "fsdp_full"  # the resolved config
    assert record["metrics"]  # rank 0 evaluated the gathered model in one process


def test_sharded_run_killed_mid_training_resumes_exactly(full_runs: dict[str, Path],
                                                         tmp_path: Path) -> None:
    results = tmp_path / "results"
    kill_when(start(FULL, results, torchrun(2)), results, "artifacts/.checkpoints-*/ckpt.pt")
    assert not list(results.glob("artifacts/*/artifact.json"))
    err = finish(start(FULL, results, torchrun(2)))
    resumed = artifact_info(results)["train"]
    expected = artifact_info(full_runs["sharded"])["train"]
    assert resumed["resumed_from_step"] > 0, err
    # Same processes, same shards, each process's own random state restored: the same run.
    assert resumed["final_loss"] == expected["final_loss"]
    assert resumed["trained_tokens"] == expected["trained_tokens"]


def test_checkpoint_of_two_processes_resumes_in_one(full_runs: dict[str, Path],
                                                     tmp_path: Path) -> None:
    """Checkpoints hold the whole state, so a sharded run can go on with fewer processes."""
    results = tmp_path / "results"
    kill_when(start(FULL, results, torchrun(2)), results, "artifacts/.checkpoints-*/ckpt.pt")
    err = finish(start(FULL, results))
    resumed = artifact_info(results)["train"]
    assert resumed["resumed_from_step"] > 0, err
    assert resumed["strategy"] == "single"
    expected = artifact_info(full_runs["single"])["train"]
    assert resumed["final_loss"] == pytest.approx(expected["final_loss"], rel=1e-3)
