"""Table 2's peft baselines (prompt, p- and prefix tuning, (IA)³, AdaLoRA) through the real runner.

One cut-down run per method (3 steps, 4 lm-eval documents of tiny_medical). The runner's method is
wrapped to keep the adapted model's initial parameters and the trained model, so the tests can
compare them with each other and with the saved artifact.
"""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from hydrabench.cli import main
from hydrabench.errors import SpecError
from hydrabench.methods import METHODS, get_method
from hydrabench.methods.adalora import adalora_config
from hydrabench.methods.api import Method
from hydrabench.models import load_base_model
from hydrabench.pipeline import run as runner
from hydrabench.pipeline.resolve import resolve_spec
from hydrabench.records.store import RunStore

QUICK = {"train": {"max_steps": 3}, "eval": {"limit": 4}}
PROMPT_LEARNING = ("prompt-tuning", "p-tuning", "prefix-tuning")
MERGEABLE = ("ia3", "adalora")

# Tiny Llama: hidden 128, 2 layers, 4 heads × 32 (keys/values 128 wide), intermediate 344.
HIDDEN, LAYERS, INTERMEDIATE = 128, 2, 344
# (trainable, added to the base) parameters, by hand.
EXPECTED_COUNTS = {
    "prompt-tuning": (20 * HIDDEN,) * 2,
    # 256 virtual embeddings, then the MLP encoder: three hidden × hidden linear layers with bias.
    "p-tuning": (256 * HIDDEN + 3 * (HIDDEN * HIDDEN + HIDDEN),) * 2,
    # 20 virtual keys and values in every layer.
    "prefix-tuning": (20 * LAYERS * 2 * HIDDEN,) * 2,
    # One vector per layer scaling k_proj's and v_proj's outputs and down_proj's input.
    "ia3": (LAYERS * (HIDDEN + HIDDEN + INTERMEDIATE),) * 2,
    # q_proj and v_proj of each layer at init_r = 12: A (12 × 128), B (128 × 12), E (12), and a
    # frozen one-element `ranknum` that peft adds but does not train.
    "adalora": (2 * LAYERS * (12 * HIDDEN * 2 + 12), 2 * LAYERS * (12 * HIDDEN * 2 + 12 + 1)),
}
LORA_R8 = 2 * LAYERS * (HIDDEN * 8 * 2)  # q_proj and v_proj, for comparison
# The only parameters each method may train, by name.
ADAPTER_NAME_PARTS = {"prompt-tuning": ("prompt_encoder",), "p-tuning": ("prompt_encoder",),
                      "prefix-tuning": ("prompt_encoder",), "ia3": ("ia3_l",),
                      "adalora": ("lora_A", "lora_B", "lora_E")}


def capturing(method: Method, seen: dict) -> Method:
    """`method`, keeping its freshly adapted parameters and its trained model in `seen`."""

    def adapt(model: torch.nn.Module, spec, records) -> torch.nn.Module:
        adapted = method.adapt(model, spec, records)
        seen["initial"] = {n: p.detach().clone() for n, p in adapted.named_parameters()}
        return adapted

    def save(model: torch.nn.Module, directory: Path) -> None:
        seen["trained"] = model
        method.save(model, directory)

    return replace(method, adapt=adapt, save=save)


@pytest.fixture(scope="module", params=list(EXPECTED_COUNTS))
def run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A finished cut-down run of one method: its record, store and trained model."""
    name = request.param
    seen: dict = {}
    store = RunStore(tmp_path_factory.mktemp(name) / "results")
    spec = resolve_spec(name, "medical", overrides=QUICK)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner, "get_method", lambda _: capturing(get_method(name), seen))
        record = runner.execute(spec, store=store)
    return {"name": name, "method": get_method(name), "record": record, "store": store, **seen}


def loaded(run: dict) -> tuple[torch.nn.Module, object]:
    """The artifact on a fresh base model, as the runner evaluates it, and the tokenizer."""
    base = load_base_model("builtin:tiny")
    return run["method"].load(base.model, run["record"].artifact).eval(), base.tokenizer


def probe_ids(tokenizer) -> torch.Tensor:
    return tokenizer(["Question: fever and cough?\nAnswer: pulmonology", "The contract is void"],
                     return_tensors="pt", padding=True)["input_ids"]


def test_only_the_adapter_is_trained_and_counted(run: dict) -> None:
    trainable, added = EXPECTED_COUNTS[run["name"]]
    counts = run["record"].training.parameters
    assert (counts["trainable"], counts["adapter"]) == (trainable, added)
    assert counts["total"] == counts["base"] + added
    assert run["record"].training.train["steps"] == 3
    for name, param in run["trained"].named_parameters():
        if param.requires_grad:
            assert any(part in name for part in ADAPTER_NAME_PARTS[run["name"]]), name
            assert not torch.equal(param, run["initial"][name]), f"{name} did not change"
        else:
            assert torch.equal(param, run["initial"][name]), f"frozen {name} changed"


def test_percent_param_order_on_tiny() -> None:
    added = {name: counts[1] for name, counts in EXPECTED_COUNTS.items()}
    order = sorted([*added, "lora"], key=lambda name: added.get(name, LORA_R8))
    assert order == ["ia3", "prompt-tuning", "lora", "prefix-tuning", "adalora", "p-tuning"]
    # AdaLoRA's init_r = 1.5 r gives the paper's ratio to LoRA r=8 (0.093 / 0.062).
    assert EXPECTED_COUNTS["adalora"][0] / LORA_R8 == pytest.approx(1.5, abs=0.01)


def test_saved_artifact_reproduces_the_trained_logits(run: dict) -> None:
    model, tokenizer = loaded(run)
    ids = probe_ids(tokenizer)
    with torch.no_grad():
        reloaded, trained = model(ids).logits, run["trained"].eval()(ids).logits
        if run["name"] != "adalora":
            assert torch.equal(reloaded, trained)
            return
        # peft saves AdaLoRA's rank pattern and reloads each layer cut to its kept ranks, so
        # the reload sums fewer (masked-out, zero) terms and may round differently in the last
        # bit on some CPUs. Exact up to float32 rounding, and far from the untrained model
        # (AdaLoRA's E starts at zero: untrained is the base model).
        untrained = load_base_model("builtin:tiny").model.eval()(ids).logits
    tolerance = 1e-5  # measured 2.9e-6 on an AMD EPYC; 0.016 from the untrained model
    assert (reloaded - trained).abs().max() <= tolerance
    assert (trained - untrained).abs().max() >= 100 * tolerance


def test_lm_eval_scores_the_real_token_positions(run: dict) -> None:
    """lm-eval's per-choice loglikelihoods equal sums over the logits of the real positions.

    Prompt and p-tuning put their virtual tokens in front of the input, so their logits are
    longer than the input: lm-eval must skip those positions, not read logit i for token i.
    """
    model, tokenizer = loaded(run)
    samples = (run["store"].runs / run["record"].run_id / "lm_eval"
               / "samples_tiny_medical.jsonl")
    doc = json.loads(samples.read_text().splitlines()[0])
    virtual = {"prompt-tuning": 20, "p-tuning": 256}.get(run["name"], 0)
    for (context, continuation), response in zip(doc["arguments"], doc["resps"], strict=True):
        context_ids = tokenizer(context)["input_ids"]
        ids = tokenizer(context + continuation)["input_ids"]
        assert ids[: len(context_ids)] == context_ids
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
        assert logits.shape[0] == virtual + len(ids)
        logprobs = logits[virtual:].log_softmax(-1)
        by_hand = sum(logprobs[i - 1, ids[i]].item() for i in range(len(context_ids), len(ids)))
        assert response[0][0] == pytest.approx(by_hand, abs=1e-4)


# peft warns that it drops the position ids generate computes; prompt and p-tuning restore them.
@pytest.mark.filterwarnings("ignore:Position ids are not supported:UserWarning")
@pytest.mark.parametrize("run", PROMPT_LEARNING, indirect=True)
def test_generation_is_the_same_alone_and_in_a_padded_batch(run: dict) -> None:
    """What lm-eval's generate_until relies on, with its left-padded batches.

    `generate` returns the input ids, then the new tokens (lm-eval cuts the input off), and a
    row's scores do not depend on how much padding the other rows of its batch impose on it.
    """
    model, tokenizer = loaded(run)
    tokenizer.padding_side = "left"
    texts = ["Question: fever?\nAnswer:", "Question: palpitations, dizziness, numbness?\nAnswer:"]

    def generate(batch: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        inputs = tokenizer(batch, return_tensors="pt", padding=True)
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_scores=True,
                             return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id)
        return inputs["input_ids"], out.sequences, torch.stack(out.scores, dim=1)

    _, _, batched = generate(texts)
    for row, text in enumerate(texts):
        ids, sequences, scores = generate([text])
        assert torch.equal(sequences[0, : ids.shape[1]], ids[0])
        with torch.no_grad():
            assert sequences[0, ids.shape[1]] == model(ids).logits[0, -1].argmax()
        assert torch.allclose(scores[0], batched[row], atol=1e-5)


def test_merge_matches_the_adapter_or_is_refused(run: dict) -> None:
    if run["name"] not in MERGEABLE:
        assert not run["method"].mergeable
        vllm = resolve_spec(run["name"], "medical", overrides={
            **QUICK, "eval": {**QUICK["eval"], "backend": "vllm"}})
        with pytest.raises(SpecError, match="cannot be merged"):
            runner.execute(vllm, store=run["store"])
        return
    model, tokenizer = loaded(run)
    ids = probe_ids(tokenizer)
    with torch.no_grad():
        unmerged = model(ids).logits
        merged_model = run["method"].merge(model)
        merged = merged_model(ids).logits
    assert type(merged_model).__name__ == "LlamaForCausalLM"
    assert torch.allclose(merged, unmerged, atol=1e-5)


@pytest.mark.parametrize("run", ["adalora"], indirect=True)
def test_adalora_reallocated_its_rank_budget(run: dict) -> None:
    """The per-step callback ran through the runner: the final ranks meet the budget target_r."""
    pattern = run["trained"].peft_config["default"].rank_pattern
    assert len(pattern) == 2 * LAYERS
    assert sum(sum(kept) for kept in pattern.values()) == 2 * LAYERS * 8
    model, _ = loaded(run)  # the artifact keeps only the final ranks
    kept = [p.shape[0] for n, p in model.named_parameters() if "lora_E" in n]
    assert sorted(kept) == sorted(sum(k) for k in pattern.values())


@pytest.mark.parametrize("total", [1, 2, 3, 10, 1000])
def test_adalora_schedule_fits_any_run_length(total: int) -> None:
    config = adalora_config(resolve_spec("adalora", "medical"), total)  # peft validates it
    assert (config.target_r, config.init_r, config.total_step) == (8, 12, total)
    assert config.tfinal == (0 if total == 1 else max(1, total // 5))
    assert config.tinit == total // 10


def test_list_methods_shows_the_baselines(capsys: pytest.CaptureFixture) -> None:
    assert main(["list", "methods"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    for name in EXPECTED_COUNTS:
        assert name in METHODS and name in lines
        assert ("[hf backend only]" in lines[name]) is (name in PROMPT_LEARNING)
