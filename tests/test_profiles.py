"""The Profile: typed, validated when loaded (one line naming the file and the key), `extends`
resolved first, and read by its content, never by its name."""

from pathlib import Path

import pytest
import yaml

from hydrabench.config.profiles import PROFILE_DIR, Profile, TaskColumn, load_profile
from hydrabench.errors import SpecError
from hydrabench.pipeline.resolve import resolve_spec
from hydrabench.records.provenance import scores_stand_ins


def write(folder: Path, text: str, name: str = "mine.yaml") -> str:
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text)
    return str(folder / name)


def test_a_profile_extending_another_is_typed_with_what_it_inherits(tmp_path: Path) -> None:
    mine = load_profile(write(tmp_path, "extends: small\ntrain: {batch_size: 2}\n"))
    small, paper = load_profile("small"), load_profile("paper")
    assert isinstance(mine, Profile) and mine.model == small.model == "Qwen/Qwen2.5-0.5B"
    assert mine.train == {**small.train, "batch_size": 2} and mine.tasks == paper.tasks
    assert paper.tasks["math"] == TaskColumn(corpus="hub:openai/gsm8k:main", eval=("gsm8k_cot",),
                                             local_corpus="data:gsm8k/train.jsonl")
    assert paper.requires_gpu and not load_profile("tiny").requires_gpu
    assert load_profile("reference").seed == 41 and paper.seed == 0
    # A profile that says nothing of its cost is "minutes on a CPU" (the one place it is written).
    assert load_profile("tiny").estimate == Profile(model="m").estimate == "minutes on a CPU"


def test_the_record_and_profile_show_get_the_resolved_mapping() -> None:
    tiny = load_profile("tiny")
    assert tiny.to_dict() == yaml.safe_load((PROFILE_DIR / "tiny.yaml").read_text())
    reference = load_profile("reference").to_dict()
    assert "extends" not in reference and reference["model"] == "meta-llama/Llama-2-7b-hf"
    reference["train"]["lr"] = 1.0  # a copy: the loaded profile is unchanged
    assert load_profile("reference").train["lr"] == 2e-4


@pytest.mark.parametrize(("text", "says"), [
    ("extends: tiny\nseed: seven\n", "seed must be an integer, got 'seven'"),
    ("extends: tiny\ndescripton: x\n", "unknown key in profile {file}: 'descripton'"),
    ("extends: tiny\nadapter: {rank: 0}\n", "rank must be >= 1, got 0"),
    ("extends: tiny\neval: {limit: all}\n", "eval setting limit must be an integer or null"),
    ("extends: tiny\nsharding: {full: [fsdp_full]}\n", "sharding: full must name a sharding"),
    ("extends: tiny\ntasks: {mine: {corpus: synthetic, eval: tiny_facts}}\n",
     "task mine: eval must be a list of lm-eval task names"),
])
def test_a_bad_key_is_one_line_naming_the_file_and_the_key(tmp_path: Path, text: str,
                                                          says: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(SpecError) as caught:
        load_profile(path)
    message = str(caught.value)
    assert "\n" not in message and path in message and says.format(file=path) in message, message


def test_include_path_is_relative_to_the_profile_file(tmp_path: Path) -> None:
    path = write(tmp_path / "sub", "extends: tiny\ninclude_path: [my_tasks, ../other]\n")
    assert load_profile(path).include_path == (str(tmp_path / "sub" / "my_tasks"),
                                               str(tmp_path / "other"))


def test_a_profile_extending_tiny_scores_stand_ins_as_tiny_does(tmp_path: Path) -> None:
    """Stand-in or not follows from what a profile holds (tiny's synthetic tasks), not from
    its name."""
    mine = write(tmp_path, "extends: tiny\nname: mine\n")
    assert scores_stand_ins(resolve_spec("lora", "medical", mine))
    assert scores_stand_ins(resolve_spec("lora", "medical", "tiny"))
    assert not scores_stand_ins(resolve_spec("base", "lm-eval:bbh", mine, lm_eval_task_ok=True))
