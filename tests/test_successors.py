"""HydraLoRA's successors as methods (issue 30): MoSLoRA, MoLoRA/MixLoRA, R-LoRA and FlyLoRA.

Real components throughout: the project-built tiny Llama, peft, the real runner. Every expected
forward is an independent few-line computation from the paper's definition, not the code under
test.
"""

from pathlib import Path

import pytest
import torch

from hydrabench.methods import METHODS, get_method
from hydrabench.models import load_base_model
from hydrabench.resolve import resolve_spec
from hydrabench.runner import execute
from hydrabench.spec import AdapterSettings, InputFingerprints, RunSpec
from hydrabench.store import RunStore

HIDDEN = 128  # the tiny Llama: 2 layers, hidden 128
QUICK = {"train": {"max_steps": 4}, "eval": {"limit": 4}}


def fresh_model() -> torch.nn.Module:
    return load_base_model("builtin:tiny").model


def tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 200, (2, 7), generator=torch.Generator().manual_seed(seed))


# -- run ids: the settings added for these methods leave existing ids where they were ----------


@pytest.mark.parametrize(("method", "run_id", "train_id"), [
    ("hydralora", "hydralora-medical-s0-1b2d7a89f284009f", "hydralora-s0-f5ef8b5ad1c5f367"),
    ("lora", "lora-medical-s0-7bbfe4818541ef5f", "lora-s0-642471295aa0026c")])
def test_ids_of_existing_specs_do_not_move(method: str, run_id: str, train_id: str) -> None:
    """The ids were computed before `top_k` and `sparsity` existed (hard-coded here)."""
    def spec(**adapter: object) -> RunSpec:
        return RunSpec(method=method, task="medical", profile="tiny", model="builtin:tiny",
                       seed=0, corpus="medical", eval_tasks=("medqa",),
                       inputs=InputFingerprints(model="m0", corpus={"train": "c0"},
                                                tasks={"medqa": {"config": "t0"}}),
                       adapter=AdapterSettings(rank=8, alpha=16, num_heads=4, **adapter))

    assert (spec().run_id, spec().train_id) == (run_id, train_id)
    # set, the new settings are part of both ids
    for changed in (spec(top_k=2), spec(sparsity=0.5)):
        assert changed.run_id != run_id and changed.train_id != train_id


# method -> (mergeable, served unmerged by hydrabench's vLLM plugin)
SERVING = {"moslora": (True, False)}


@pytest.mark.parametrize("name", sorted(SERVING))
def test_registered_with_its_merge_status(name: str) -> None:
    assert (METHODS[name].mergeable, METHODS[name].served_by_plugin) == SERVING[name]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SERVING))
def test_trains_through_the_runner_and_records(name: str, tmp_path: Path) -> None:
    """A few steps through the real runner: only the adapter trains, the record has scores and
    the parameter counts."""
    spec = resolve_spec(name, "medical", overrides=QUICK)
    record = execute(spec, store=RunStore(tmp_path / "results"))
    assert record.metrics["tiny_medical"].n == 4
    assert record.training.train["steps"] == 4 and len(record.training.train["curve"]) == 4
    params = record.training.parameters
    assert 0 < params["adapter"] < params["base"] and params["trainable"] > 0
    if name == "moslora":  # r (in + out) + r^2 on q_proj, v_proj of 2 layers (r = 8)
        assert params["adapter"] == 2 * 2 * (8 * (HIDDEN + HIDDEN) + 8 * 8)


# -- moslora: delta W = B M A, merges exactly ----------------------------------------------------


def test_moslora_forward_is_b_m_a_and_merges_exactly(tmp_path: Path) -> None:
    from hydrabench.methods.moslora import MixedDown

    spec = resolve_spec("moslora", "medical", overrides={"adapter": {"rank": 4}})
    method = get_method("moslora")
    model = method.adapt(fresh_model(), spec, []).eval()
    ids = tokens()
    with torch.no_grad():
        base_logits = model.get_base_model()(ids).logits
        assert torch.equal(model(ids).logits, base_logits)  # B = 0: the base model at init
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    mixed = layer.lora_A["default"]
    assert isinstance(mixed, MixedDown)
    # A, M, B train (M = r x r); the base does not
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.endswith("q_proj.lora_A.default.mixer.weight") for n in trainable)
    assert all("lora_" in n for n in trainable)
    assert mixed.mixer.weight.shape == (4, 4)
    assert not torch.allclose(mixed.mixer.weight, torch.eye(4))  # Kaiming, not the identity
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.1)
        x = torch.randn(3, 5, HIDDEN)
        a, m, b = mixed.down.weight, mixed.mixer.weight, layer.lora_B["default"].weight
        scaling = spec.adapter.alpha / 4
        want = x @ layer.base_layer.weight.T + scaling * (x @ a.T @ m.T @ b.T)
        assert torch.allclose(layer(x), want, atol=1e-5)
        for other in model.modules():  # every adapted layer gets a non-zero update
            if isinstance(getattr(other, "lora_B", None), torch.nn.ModuleDict):
                other.lora_B["default"].weight.normal_(0, 0.1)
        adapted_logits = model(ids).logits
    assert not torch.allclose(adapted_logits, base_logits, atol=1e-3)
    # the artifact is the equal plain LoRA (A' = M A): LoRA's load and merge reproduce the logits
    method.save(model, tmp_path / "adapter")
    loaded = method.load(fresh_model(), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, adapted_logits, atol=1e-4)
        merged = method.merge(loaded)
        assert not any("lora" in n for n, _ in merged.named_parameters())
        assert torch.allclose(merged(ids).logits, adapted_logits, atol=1e-4)
    # the saved adapter is the plain LoRA vLLM's own LoRA serving computes exactly
    from hydrabench.serving import served_lora_config

    assert served_lora_config(tmp_path / "adapter")["r"] == 4
