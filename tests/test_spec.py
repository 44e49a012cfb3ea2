"""RunSpec resolution: profiles + overrides, run ids, and validation of bad input."""

from pathlib import Path

import pytest

from hydrabench.config.profiles import load_yaml
from hydrabench.config.spec import spec_from_dict
from hydrabench.errors import SpecError
from hydrabench.pipeline.resolve import resolve_spec


def test_profile_values_and_overrides_are_resolved() -> None:
    spec = resolve_spec("lora", "math", "tiny", seed=3,
                        overrides={"adapter": {"rank": 16}, "train": {"lr": 1e-3}})
    assert spec.adapter.rank == 16 and spec.train.lr == 1e-3
    assert spec.train.batch_size == 8  # from tiny.yaml
    assert spec.eval_tasks == ("tiny_arithmetic",)
    assert spec.adapter.target_modules == ("q_proj", "v_proj")  # the paper's default


def test_run_id_is_stable_and_changes_with_any_setting() -> None:
    a = resolve_spec("lora", "general")
    assert a.run_id == resolve_spec("lora", "general").run_id
    assert a.run_id.startswith("lora-general-s0-")
    b = resolve_spec("lora", "general", overrides={"adapter": {"rank": 16}})
    c = resolve_spec("lora", "general", seed=1)
    assert len({a.run_id, b.run_id, c.run_id}) == 3


def test_columns_sharing_a_corpus_share_the_training() -> None:
    general, bbh = resolve_spec("hydralora", "general"), resolve_spec("hydralora", "bbh")
    assert general.run_id != bbh.run_id
    assert general.train_id == bbh.train_id


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"method": "lorra"}, "unknown method 'lorra' (did you mean 'lora'?)"),
    ({"task": "medicine"}, "unknown task 'medicine' (did you mean 'medical'?)"),
    ({"profile": "tinny"}, "unknown profile 'tinny' (did you mean 'tiny'?)"),
    ({"overrides": {"adapter": {"rank": 0}}}, "rank must be >= 1"),
    ({"overrides": {"adapter": {"num_heads": 0}}}, "num_heads must be >= 1"),
    ({"overrides": {"adapter": {"alpha": -1.0}}}, "alpha must be > 0"),
    ({"overrides": {"train": {"lr": 0.0}}}, "lr must be > 0"),
    ({"overrides": {"train": {"seq_len": 0}}}, "seq_len must be >= 8"),
    ({"overrides": {"train": {"bogus": 1}}}, "unknown train setting(s) ['bogus']"),
])
def test_bad_input_is_one_clear_error(kwargs: dict, message: str) -> None:
    args = {"method": "lora", "task": "general", "profile": "tiny", **kwargs}
    with pytest.raises(SpecError) as err:
        resolve_spec(args.pop("method"), args.pop("task"), **args)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_malformed_yaml_names_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntrain:\n  lr: [1, 2\n  epochs: 1\n")
    with pytest.raises(SpecError, match=r"malformed YAML at .*bad\.yaml:\d+"):
        load_yaml(bad)


def test_the_profile_picks_fsdp_for_full_finetuning_only() -> None:
    full = resolve_spec("full", "medical", "paper")
    assert full.train.sharding == {"name": "fsdp_full", "reshard_after_forward": True,
                                   "reduce_dtype": "float32", "cpu_offload": False}
    assert resolve_spec("lora", "medical", "paper").train.sharding is None
    assert spec_from_dict(full.to_dict()).train_id == full.train_id  # survives the record


def test_profile_numbers_written_without_a_dot_and_a_single_target_module(tmp_path: Path) -> None:
    """YAML reads `1e-3` as a string: taken as the number; `target_modules: q_proj` is one
    module, not five letters."""
    mine = tmp_path / "mine.yaml"
    mine.write_text("extends: tiny\ntrain: {lr: 1e-3}\nadapter: {target_modules: q_proj}\n")
    spec = resolve_spec("lora", "medical", str(mine))
    assert spec.train.lr == 1e-3 and spec.adapter.target_modules == ("q_proj",)


def test_an_unknown_name_among_many_gives_the_three_nearest() -> None:
    from hydrabench.errors import did_you_mean

    valid = [f"mmlu_{subject}" for subject in ("anatomy", "astronomy", "virology")] + [
        f"bbh_task_{i}" for i in range(200)]
    message = str(did_you_mean("lm-eval task", "mmlu_anatomyy", valid))
    assert message.startswith("unknown lm-eval task 'mmlu_anatomyy' (did you mean 'mmlu_anatomy', ")
    assert message.count("'") == 8 and "203 known" in message and "bbh_task_1" not in message


def test_an_lm_eval_task_named_like_a_column_is_reachable() -> None:
    column = resolve_spec("base", "bbh", lm_eval_task_ok=True)
    real = resolve_spec("base", "lm-eval:bbh", lm_eval_task_ok=True)
    assert column.eval_tasks == ("tiny_bbh",) and real.eval_tasks == ("bbh",)
    assert real.task == "bbh" and real.corpus == "none" and real.run_id != column.run_id
