"""Behavioural tests for hydrabench.methods.hydralora on a tiny, randomly initialised Llama."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from hydrabench.data.records import InstructionRecord
from hydrabench.methods import lora_split
from hydrabench.methods.hydralora import METHOD, HeadedAdapter
from hydrabench.methods.hydralora_layer import (
    HydraLoraConfig,
    HydraLoraLinear,
    apply_hydralora,
    hydralora_layers,
    load_balancing_loss,
    load_hydralora,
    mean_router_gates,
    merge_hydralora,
    recording_gates,
    save_hydralora,
)
from hydrabench.pipeline.resolve import resolve_spec

HIDDEN, LAYERS, VOCAB = 64, 2, 128
TARGETS = ("q_proj", "v_proj", "down_proj")


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=VOCAB,
    )
    return LlamaForCausalLM(config).eval()


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """HydraLoRA's registry entry's counts of an adapted tiny_llama()."""
    return METHOD.parameter_counts(model, sum(p.numel() for p in tiny_llama().parameters()))


def adapted(gate: str = "softmax", num_heads: int = 4, seed: int = 0) -> LlamaForCausalLM:
    config = HydraLoraConfig(r=4, num_heads=num_heads, target_modules=TARGETS, gate=gate)
    return apply_hydralora(tiny_llama(seed), config)


@torch.no_grad()
def randomize(model: nn.Module, seed: int = 1, router_std: float = 1.0) -> None:
    """Non-zero B heads (B starts at zero) and a router with a clearly non-uniform gate."""
    gen = torch.Generator().manual_seed(seed)
    for layer in hydralora_layers(model).values():
        layer.lora_B.copy_(0.1 * torch.randn(layer.lora_B.shape, generator=gen))
        if layer.router is not None:
            layer.router.weight.copy_(
                router_std * torch.randn(layer.router.weight.shape, generator=gen)
            )


def input_ids(batch: int = 2, seq: int = 9, seed: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits


def head_a(layer: HydraLoraLinear, i: int) -> torch.Tensor:
    """Head i's A: the shared one, or its own rows of the stacked [N*r, in] matrix."""
    a = layer.lora_A.weight
    return a if layer.shared_a else a[i * layer.r: (i + 1) * layer.r]


def per_head_loop(layer: HydraLoraLinear, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """The reference implementation: A applied once per head, heads summed in a Python loop."""
    out = layer.base(x)
    for i in range(layer.num_heads):
        head = F.linear(F.linear(x, head_a(layer, i)), layer.lora_B[i])
        out = out + gate[..., i : i + 1] * head * layer.scaling
    return out


@pytest.mark.parametrize("shared_a", [True, False], ids=["hydralora", "loramoe"])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_forward_matches_per_head_loop(dtype: torch.dtype, tol: float, shared_a: bool) -> None:
    torch.manual_seed(0)
    layer = HydraLoraLinear(nn.Linear(32, 24, dtype=dtype), r=4, num_heads=3, alpha=8.0,
                            shared_a=shared_a)
    assert layer.lora_A.weight.shape == ((4 if shared_a else 12), 32)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.1)
    x = torch.randn(2, 5, 32, dtype=dtype)
    gate = torch.softmax(F.linear(x.float(), layer.router.weight.float()), dim=-1).to(dtype)
    with torch.no_grad():
        expected = per_head_loop(layer, x, gate)
        out = layer(x)
        base = layer.base(x)
    assert out.dtype == dtype
    assert (expected - base).abs().max() > 0.1  # the update is not negligible
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)


def test_gate_is_float32_softmax() -> None:
    layer = HydraLoraLinear(nn.Linear(16, 8, dtype=torch.bfloat16), r=2, num_heads=5, alpha=4.0)
    gate = layer.compute_gate(torch.randn(3, 16, dtype=torch.bfloat16))
    assert gate.dtype == torch.float32 and gate.shape == (3, 5)
    torch.testing.assert_close(gate.sum(-1), torch.ones(3))


def test_init_equals_base_model_exactly() -> None:
    ids = input_ids()
    reference = logits(tiny_llama(), ids)
    model = adapted()
    assert len(hydralora_layers(model)) == LAYERS * len(TARGETS)
    assert not any(m.training for m in model.modules())  # wrappers inherit eval mode
    assert all((layer.lora_B == 0).all() for layer in hydralora_layers(model).values())
    assert torch.equal(logits(model, ids), reference)


def test_only_adapter_parameters_train() -> None:
    model = adapted()
    randomize(model)  # with B = 0 the gradients of A and the router would be exactly zero
    model.train()
    ids = input_ids()
    model(input_ids=ids, labels=ids).loss.backward()
    trainable_suffixes = (".lora_A.weight", ".lora_B", ".router.weight")
    seen = set()
    for name, param in model.named_parameters():
        if name.endswith(trainable_suffixes):
            seen.update(s for s in trainable_suffixes if name.endswith(s))
            assert param.requires_grad, name
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert not param.requires_grad, name
            assert param.grad is None, name
    assert seen == set(trainable_suffixes)

    counts = parameter_counts(model)
    r, heads = 4, 4
    out_dims = LAYERS * (HIDDEN + HIDDEN + HIDDEN)  # q, v and down all map to hidden size
    in_dims = LAYERS * (HIDDEN + HIDDEN + 128)  # down_proj reads the intermediate size
    assert counts["adapter"] == r * in_dims + heads * r * out_dims
    assert counts["router"] == heads * in_dims
    assert counts["trainable"] == counts["adapter"] + counts["router"]
    assert counts["total"] == sum(p.numel() for p in model.parameters())


def test_save_load_round_trip(tmp_path: Path) -> None:
    model = adapted()
    model.hydralora_config.base_model_id = "tiny-llama-test"
    randomize(model)
    ids = input_ids()
    expected = logits(model, ids)
    save_hydralora(model, tmp_path)

    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]  # no temp files left behind
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta == {
        "method": "hydralora",
        "r": 4,
        "num_heads": 4,
        "alpha": 32.0,
        "dropout": 0.05,
        "target_modules": list(TARGETS),
        "gate": "softmax",
        "shared_a": True,
        "base_model_id": "tiny-llama-test",
    }
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    prefix = "model.layers.0.self_attn.q_proj"
    assert tensors[f"{prefix}.lora_A.weight"].shape == (4, HIDDEN)
    assert tensors[f"{prefix}.lora_B"].shape == (4, HIDDEN, 4)
    assert tensors[f"{prefix}.router.weight"].shape == (4, HIDDEN)
    assert len(tensors) == 3 * LAYERS * len(TARGETS)  # adapter + router only, no base weights

    loaded = load_hydralora(tiny_llama(), tmp_path)
    assert torch.equal(logits(loaded, ids), expected)

    del tensors[f"{prefix}.router.weight"]
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"missing=.*q_proj\.router\.weight"):
        load_hydralora(tiny_llama(), tmp_path)


def test_uniform_gate_ablation() -> None:
    layer = HydraLoraLinear(nn.Linear(16, 8), r=2, num_heads=3, alpha=4.0, gate="uniform")
    assert layer.router is None
    x = torch.randn(2, 4, 16)
    gate = layer.compute_gate(x)
    assert torch.equal(gate, torch.full((2, 4, 3), 1 / 3))
    with torch.no_grad():
        layer.lora_B.normal_()
        torch.testing.assert_close(layer(x), per_head_loop(layer, x, gate))

    model = adapted(gate="uniform")
    assert parameter_counts(model)["router"] == 0
    assert not any("router" in name for name, _ in model.named_parameters())


@pytest.mark.parametrize("shared_a", [True, False], ids=["hydralora", "loramoe"])
def test_delta_weight_is_gated_sum_of_heads(shared_a: bool) -> None:
    torch.manual_seed(0)
    layer = HydraLoraLinear(nn.Linear(16, 8), r=2, num_heads=3, alpha=4.0, shared_a=shared_a)
    with torch.no_grad():
        layer.lora_B.normal_()
    one_hot = torch.tensor([0.0, 1.0, 0.0])
    expected = layer.scaling * layer.lora_B[1] @ head_a(layer, 1)
    torch.testing.assert_close(layer.delta_weight(one_hot), expected)
    gate = torch.tensor([0.2, 0.5, 0.3])
    x = torch.randn(5, 16)
    with torch.no_grad():  # a fixed gate: the dense update reproduces the layer's output
        torch.testing.assert_close(layer.base(x) + F.linear(x, layer.delta_weight(gate)),
                                   per_head_loop(layer, x, gate.expand(5, 3)))
    with pytest.raises(ValueError, match="shape"):
        layer.delta_weight(torch.ones(2))


def test_merge_uniform_matches_uniform_gate_model() -> None:
    model = adapted(gate="uniform")
    randomize(model)
    ids = input_ids()
    expected = logits(model, ids)
    merge_hydralora(model, "uniform")
    assert not hydralora_layers(model)
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    assert not hasattr(model, "hydralora_config")
    torch.testing.assert_close(logits(model, ids), expected, rtol=0, atol=1e-5)


def test_router_mean_merge() -> None:
    ids = input_ids()
    # Zero router: softmax(0) = 1/N for every token, so the router-mean merge is exact.
    model = adapted()
    randomize(model)
    with torch.no_grad():
        for layer in hydralora_layers(model).values():
            layer.router.weight.zero_()
    expected = logits(model, ids)
    gates = mean_router_gates(model, [ids])
    assert set(gates) == set(hydralora_layers(model))
    assert all(torch.equal(g, torch.full((4,), 0.25)) for g in gates.values())
    merge_hydralora(model, gates)
    torch.testing.assert_close(logits(model, ids), expected, rtol=0, atol=1e-5)

    # Token-dependent router: the merge is only an approximation.
    model = adapted()
    randomize(model, router_std=2.0)
    expected = logits(model, ids)
    gates = mean_router_gates(model, [ids])
    assert all((g - 0.25).abs().max() > 1e-3 for g in gates.values())
    merge_hydralora(model, gates)
    assert (logits(model, ids) - expected).abs().max() > 1e-3


def test_mean_router_gates_ignores_padding() -> None:
    model = adapted()
    randomize(model)
    ids = input_ids(batch=1, seq=6)
    # Right padding under causal attention leaves the real tokens' activations unchanged.
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=ids.dtype)], dim=1)
    mask = torch.cat([torch.ones(1, 6), torch.zeros(1, 3)], dim=1).long()
    plain = mean_router_gates(model, [ids])
    masked = mean_router_gates(model, [{"input_ids": padded, "attention_mask": mask}])
    unmasked = mean_router_gates(model, [padded])
    for path, gate in plain.items():
        torch.testing.assert_close(masked[path], gate, rtol=0, atol=1e-6)
        assert (unmasked[path] - gate).abs().max() > 1e-4
    assert all(layer.last_gate is None for layer in hydralora_layers(model).values())


def test_load_balancing_loss() -> None:
    model = adapted()
    randomize(model, router_std=2.0)
    ids = input_ids()
    with pytest.raises(RuntimeError, match="recording_gates"):
        load_balancing_loss(model)
    with recording_gates(model):
        model(input_ids=ids)
        unbalanced = load_balancing_loss(model)
        assert unbalanced > 0
        unbalanced.backward()  # gates are kept in the graph so the loss trains the router
        assert all(
            layer.router.weight.grad.abs().sum() > 0 for layer in hydralora_layers(model).values()
        )
        # Every token prefers a different head, but each head gets the same total mass.
        for layer in hydralora_layers(model).values():
            layer.last_gate = torch.eye(4).repeat(5, 1)
        assert load_balancing_loss(model) == 0

    with torch.no_grad():
        for layer in hydralora_layers(model).values():
            layer.router.weight.zero_()  # uniform gate for every token
    with recording_gates(model):
        model(input_ids=ids)
        assert load_balancing_loss(model) == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r": 0}, "r must be >= 1"),
        ({"num_heads": 0}, "num_heads must be >= 1"),
        ({"alpha": 0.0}, "alpha must be > 0"),
        ({"dropout": 1.0}, "dropout"),
        ({"gate": "topk"}, "gate must be one of"),
        ({"target_modules": ()}, "target_modules must not be empty"),
    ],
)
def test_config_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        HydraLoraConfig(**kwargs)


def test_config_dict_round_trip() -> None:
    config = HydraLoraConfig(r=2, target_modules=["q_proj"], base_model_id="m")
    assert config.target_modules == ("q_proj",)
    assert HydraLoraConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown"):
        HydraLoraConfig.from_dict({"r": 2, "rank": 2})


def test_unknown_target_module() -> None:
    config = HydraLoraConfig(target_modules=("q_proj", "query_key_value"))
    with pytest.raises(ValueError, match=r"\['query_key_value'\].*available.*'q_proj'"):
        apply_hydralora(tiny_llama(), config)
    model = adapted()
    with pytest.raises(ValueError, match="already has HydraLoRA"):
        apply_hydralora(model, HydraLoraConfig())


def test_balance_loss_is_added_to_training_only_when_turned_on() -> None:
    from types import SimpleNamespace

    model = apply_hydralora(tiny_llama(), HydraLoraConfig(r=4, num_heads=3, dropout=0.0))
    batch = {"input_ids": torch.randint(0, 128, (2, 6)), "attention_mask": torch.ones(2, 6)}
    batch["labels"] = batch["input_ids"]
    off = SimpleNamespace(adapter=SimpleNamespace(balance_loss_coef=0.0))
    assert METHOD.loss_fn(off) is None  # the reference code never applies it: nor do we
    loss_fn = METHOD.loss_fn(SimpleNamespace(adapter=SimpleNamespace(balance_loss_coef=0.5)))
    total = loss_fn(model, batch)
    with recording_gates(model):
        lm_loss = model(**batch).loss
        expected = lm_loss + 0.5 * load_balancing_loss(model, batch["attention_mask"])
    assert torch.allclose(total, expected) and total > lm_loss
    total.backward()
    assert all(layer.router.weight.grad is not None for layer in hydralora_layers(model).values())


def test_loramoe_experts_have_their_own_a_and_survive_save_load(tmp_path: Path) -> None:
    model = apply_hydralora(tiny_llama(), HydraLoraConfig(r=4, num_heads=3, target_modules=TARGETS,
                                                          shared_a=False))
    randomize(model)
    counts = parameter_counts(model)
    in_dims, out_dims = LAYERS * (HIDDEN + HIDDEN + 128), LAYERS * 3 * HIDDEN
    assert counts["adapter"] == 3 * 4 * in_dims + 3 * 4 * out_dims  # N whole LoRAs
    ids = input_ids()
    expected = logits(model, ids)
    save_hydralora(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["shared_a"] is False
    assert torch.equal(logits(load_hydralora(tiny_llama(), tmp_path), ids), expected)


def test_auto_heads_are_chosen_on_the_records_not_carried_on_the_model() -> None:
    """`num_heads: auto`: adapt builds the elbow's N, which fit reports again from the spec and
    the records (nothing rides on the torch model); lora-split's N is num_splits, so it reports
    no choice even under a spec whose num_heads is auto."""
    records = [InstructionRecord(f"{topic} {which} question", "answer")
               for topic in ("cardiology heart dose", "sum of integers", "contract law clause")
               for which in ("first", "second", "third", "fourth")]
    spec = resolve_spec("hydralora", "medical",
                        overrides={"adapter": {"num_heads": "auto", "target_modules": TARGETS}})
    choice = HeadedAdapter().head_choice(spec, records)
    model = METHOD.adapt(tiny_llama(), spec, records)
    assert {layer.num_heads for layer in hydralora_layers(model).values()} == {choice["num_heads"]}
    assert vars(model).keys() == vars(tiny_llama()).keys() | {"hydralora_config"}
    assert lora_split.EXPERTS.head_choice(spec, records) is None
