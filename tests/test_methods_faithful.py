"""The methods as their papers define them: LoRA-Split's three readings, LoRAMoE with its
localized balancing constraint, and the reference code's own recipe as the `reference` profile.

Real components throughout: the project-built tiny Llama, peft, sklearn, lm-eval's HF backend.
Every expected value is computed here by hand from its definition, not by the code under test.
"""

from pathlib import Path

import pytest
import torch

from hydrabench.cli import main
from hydrabench.data import synthetic
from hydrabench.methods import get_method
from hydrabench.methods.hydralora_layer import HydraLoraLinear, hydralora_layers
from hydrabench.methods.lora_split import (
    PromptRouter,
    adapt_splits,
    combine_splits,
    route_by_prompt,
    split_components,
    split_text,
)
from hydrabench.models import load_base_model
from hydrabench.pipeline.resolve import resolve_spec
from hydrabench.records.store import RunStore

HIDDEN = 128  # the tiny Llama: 2 layers, hidden 128


@pytest.fixture(scope="module")
def tiny():
    return load_base_model("builtin:tiny")


def fresh_model():
    return load_base_model("builtin:tiny").model


def randomize_lora_b(model: torch.nn.Module, seed: int = 0) -> None:
    """B starts at zero (the adapted model is the base model); give it values to compare."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


# -- lora-split: n router-mixed experts, each its own A and B -----------------------------------


def test_lora_split_is_the_literal_router_mixed_sum_per_token() -> None:
    n, r = 3, 2
    spec = resolve_spec("lora-split", "medical", overrides={"adapter": {"num_splits": n,
                                                                        "rank": r}})
    model = get_method("lora-split").adapt(fresh_model(), spec, []).eval()
    randomize_lora_b(model)
    layers = hydralora_layers(model)
    assert len(layers) == 2 * 2  # q_proj, v_proj of 2 layers
    layer = next(iter(layers.values()))
    assert isinstance(layer, HydraLoraLinear) and not layer.shared_a and layer.num_heads == n
    x = torch.randn(2, 5, HIDDEN)
    with torch.no_grad():
        got = layer(x)
        a = layer.lora_A.weight.reshape(n, r, HIDDEN)  # A_i: rows i*r .. (i+1)*r
        b = layer.lora_B  # [n, out, r]
        scaling = spec.adapter.alpha / r
        for row in range(2):
            for token in range(5):
                v = x[row, token]
                g = torch.softmax(layer.router.weight.double() @ v.double(), dim=0)
                want = layer.base.weight.double() @ v.double()
                for i in range(n):
                    want += scaling * g[i] * (b[i].double() @ (a[i].double() @ v.double()))
                assert torch.allclose(got[row, token].double(), want, atol=1e-5)
    # %Param: the experts hold n·r·(in + out) per layer, LoRA r = n·r's count; the router apart.
    assert sum(lay.lora_A.weight.numel() + lay.lora_B.numel() for lay in layers.values()) == (
        4 * (HIDDEN * n * r + n * r * HIDDEN))
    assert sum(lay.router.weight.numel() for lay in layers.values()) == 4 * n * HIDDEN


# -- lora-split-sum: peft's cat merge of the per-component adapters ------------------------------


def test_lora_split_sum_is_the_cat_merge_of_its_adapters() -> None:
    n, r = 3, 2
    spec = resolve_spec("lora-split-sum", "medical",
                        overrides={"adapter": {"num_splits": n, "rank": r}})
    model = adapt_splits(fresh_model(), spec, []).eval()
    randomize_lora_b(model)
    from peft.tuners.lora import Linear as LoraLinear

    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}
    x = torch.randn(2, 5, HIDDEN)
    scaling = spec.adapter.alpha / r
    with torch.no_grad():
        want = {name: m.base_layer(x) + sum(
            scaling * x @ m.lora_A[f"split_{k}"].weight.T @ m.lora_B[f"split_{k}"].weight.T
            for k in range(n)) for name, m in layers.items()}
        combine_splits(model, [f"split_{k}" for k in range(n)])
        model.eval()  # the combined adapter's new dropout starts in training mode
        for name, m in layers.items():
            assert list(m.lora_A) == ["combined"] and m.r["combined"] == n * r
            assert torch.allclose(m(x), want[name], atol=1e-5)


# -- lora-split-routed: each prompt to the adapter of its centroid -------------------------------


def test_lora_split_routed_sends_each_prompt_to_its_centroids_adapter(tiny) -> None:
    records = [rec for rec in synthetic.training_records()
               if rec.component in ("medical", "arithmetic")]
    component = split_components(records, 2, seed=0)  # exactly 2 labels: the labels themselves
    router = PromptRouter.fit([split_text(rec) for rec in records], component, 2)
    spec = resolve_spec("lora-split-routed", "medical",
                        overrides={"adapter": {"num_splits": 2, "rank": 2}})
    model = adapt_splits(fresh_model(), spec, records)
    randomize_lora_b(model)
    model = route_by_prompt(model.eval(), router, tiny.tokenizer)
    medical = next(rec for rec in records if rec.component == "medical")
    arithmetic = next(rec for rec in records if rec.component == "arithmetic")
    prompts = [medical.instruction, arithmetic.instruction, medical.instruction]
    expected = [f"split_{component[records.index(rec)]}" for rec in (medical, arithmetic, medical)]
    assert expected[0] != expected[1]
    batch = tiny.tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        routed = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        for row, name in enumerate(expected):
            alone = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                          adapter_names=[name] * len(prompts)).logits
            other = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                          adapter_names=[expected[1 - row % 2]] * len(prompts)).logits
            assert torch.allclose(routed[row], alone[row], atol=1e-5)
            assert not torch.allclose(routed[row], other[row], atol=1e-3)
        generated = model.generate(input_ids=batch["input_ids"][:1], max_new_tokens=4,
                                   do_sample=False)
        alone = model.generate(input_ids=batch["input_ids"][:1], max_new_tokens=4,
                               do_sample=False, adapter_names=[expected[0]])
    assert torch.equal(generated, alone)


# -- every variant trains and records through `hydrabench run` ----------------------------------


@pytest.mark.parametrize("method", ["lora-split", "lora-split-sum", "lora-split-routed"])
def test_every_lora_split_reading_trains_and_records(method: str, store_env: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    assert main(["run", "--method", method, "--task", "medical", "--num-splits", "2", "--rank",
                 "4", "--max-steps", "4", "--limit", "4"]) == 0
    [record] = RunStore().records()
    score = record.metrics["tiny_medical"]
    params = record.training.parameters
    print(f"{method}: tiny_medical {score.value:.3f} (n={score.n}), "
          f"%Param {params['percent_param']:.4f}, router {params['router']}")
    assert score.n == 4 and 0 <= score.value <= 1
    # Two rank-4 LoRAs on q_proj and v_proj of 2 layers: LoRA r=8's parameters.
    assert params["adapter"] == 2 * 2 * (HIDDEN * 8 + 8 * HIDDEN)
    assert params["router"] == (2 * 2 * 2 * HIDDEN if method == "lora-split" else 0)
    assert record.backend == "hf"
    assert get_method(method).mergeable is (method == "lora-split-sum")


# -- loramoe: experts in the FFN, localized balancing constraint -------------------------------


def test_localized_balancing_term_is_the_formula_on_planted_gates() -> None:
    """LoRAMoE's code: Q[m][i] = Σ_t g[m][t][i] over a sample's tokens; experts 0..N/2-1 serve
    world knowledge; ω = 1+δ where expert group and sample type agree, else 1-δ; Z = ω·Q; the term
    is var(Z) / mean(Z)² (unbiased variance over all of Z). The paper prints σ²(Z)/μ(Z); its code,
    which hydrabench follows, divides by μ(Z)²."""
    import statistics

    from hydrabench.methods.loramoe import localized_balancing_term

    generator = torch.Generator().manual_seed(1)
    gate = torch.softmax(torch.randn(3, 5, 4, generator=generator), dim=-1)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    knowledge = [True, False, True]
    delta = 0.1
    z = []
    for m in range(3):
        for i in range(4):
            q = sum(float(gate[m, t, i]) for t in range(5) if mask[m, t])
            expert_is_knowledge = i < 2
            z.append(q * (1 + delta if expert_is_knowledge == knowledge[m] else 1 - delta))
    want = statistics.variance(z) / (statistics.fmean(z) ** 2 + 1e-10)
    got = localized_balancing_term(gate, mask, torch.tensor(knowledge), delta)
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_loramoe_sits_in_the_ffn_unless_told_otherwise() -> None:
    for profile in ("tiny", "paper"):  # both profiles put every other adapter at q_proj, v_proj
        spec = resolve_spec("loramoe", "general", profile)
        assert spec.adapter.target_modules == ("gate_proj", "up_proj", "down_proj")
        assert (spec.adapter.blc_weight, spec.adapter.blc_alpha) == (0.1, 0.1)
        assert resolve_spec("hydralora", "general", profile).adapter.target_modules == (
            "q_proj", "v_proj")
    told = resolve_spec("loramoe", "general", overrides={"adapter": {
        "target_modules": ["q_proj", "v_proj"], "blc_weight": 0.0}})
    assert told.adapter.target_modules == ("q_proj", "v_proj") and told.adapter.blc_weight == 0


def test_loramoe_loss_adds_the_constraint_of_every_layer_by_sample_type(tiny) -> None:
    from hydrabench.methods.hydralora_layer import recording_gates
    from hydrabench.methods.loramoe import localized_balancing_term
    from hydrabench.training.loop import collate, encode_record

    spec = resolve_spec("loramoe", "general", overrides={"adapter": {
        "num_heads": 4, "blc_knowledge": ["facts"], "blc_weight": 0.5, "blc_alpha": 0.2}})
    method = get_method("loramoe")
    model = method.adapt(fresh_model(), spec, []).eval()
    records = [next(r for r in synthetic.training_records() if r.component == c)
               for c in ("facts", "medical", "facts")]
    encoded = [encode_record(tiny.tokenizer, r, spec.prompt_template, 64) for r in records]
    model.loramoe_knowledge = frozenset(tuple(encoded[i][0]) for i in (0, 2))
    batch = collate(encoded, tiny.tokenizer.pad_token_id)
    with torch.no_grad():
        got = method.loss_fn(spec)(model, batch)
        with recording_gates(model) as layers:
            lm_loss = model(**batch).loss
            terms = [localized_balancing_term(layer.last_gate, batch["attention_mask"],
                                              torch.tensor([True, False, True]), 0.2)
                     for layer in layers.values()]
    assert len(terms) == 2 * 3  # gate, up and down projections of 2 layers
    assert got.item() == pytest.approx(lm_loss.item() + 0.5 * sum(t.item() for t in terms),
                                       rel=1e-5)


def test_loramoe_trains_and_records(store_env: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["run", "--method", "loramoe", "--task", "medical", "--num-heads", "2",
                 "--max-steps", "4", "--limit", "4"]) == 0
    [record] = RunStore().records()
    score = record.metrics["tiny_medical"]
    params = record.training.parameters
    print(f"loramoe: tiny_medical {score.value:.3f} (n={score.n}), "
          f"%Param {params['percent_param']:.4f}, router {params['router']}")
    adapter = record.spec["adapter"]
    assert adapter["target_modules"] == ["gate_proj", "up_proj", "down_proj"]
    assert (adapter["blc_weight"], adapter["blc_alpha"]) == (0.1, 0.1)
    # Two rank-8 experts on gate/up (128 -> 344) and down (344 -> 128) of 2 layers.
    assert params["adapter"] == 2 * 2 * 3 * 8 * (128 + 344)
    assert params["router"] == 2 * 2 * (128 + 128 + 344)  # 2 experts × in_features, 2 layers


# -- the reference code's own recipe as a profile -----------------------------------------------

# Clin0212/HydraLoRA (commit afb693b): HydraLoRA/fine-tuning.sh and fine-tuning.py, as published.
REFERENCE_RECIPE = [
    ("adapter.target_modules", ("gate_proj", "up_proj", "down_proj")),  # lora_trainable
    ("adapter.rank", 4),  # lora_rank=4
    ("adapter.alpha", 32),  # lora_alpha=32
    ("adapter.dropout", 0.05),  # lora_dropout=0.05
    ("adapter.num_heads", 4),  # lora_b_nums=4
    ("train.lr", 2e-4),  # lr=0.0002
    ("train.scheduler", "cosine"),  # --lr_scheduler_type cosine
    ("train.warmup_ratio", 0.03),  # --warmup_ratio 0.03
    ("train.epochs", 1),  # --num_train_epochs 1
    ("train.max_steps", 0),
    ("train.batch_size", 1),  # per_device_train_batch_size=1
    ("train.grad_accum", 8),  # gradient_accumulation_steps=8
    ("train.seq_len", 1024),  # max_seq_length=1024
    ("train.weight_decay", 0.0),  # --weight_decay 0
    ("seed", 41),  # --seed 41
    ("dtype", "bfloat16"),  # --bf16 --torch_dtype bfloat16
    ("prompt_template", "reference"),  # build_dataset.py: "{instruction}</s>"
    ("model", "meta-llama/Llama-2-7b-hf"),
]


@pytest.mark.parametrize(("field", "value"), REFERENCE_RECIPE, ids=[f for f, _ in REFERENCE_RECIPE])
def test_reference_profile_is_the_published_recipe(field: str, value) -> None:
    spec = resolve_spec("hydralora", "general", "reference")
    got = spec
    for part in field.split("."):
        got = getattr(got, part)
    assert got == value
    assert resolve_spec("hydralora", "general", "reference", seed=3).seed == 3


def test_reference_template_is_the_reference_codes(tiny) -> None:
    """build_dataset.py: source "{instruction}</s>" (input after a newline), target
    "{output}</s>", loss on the target only."""
    from hydrabench.data.records import InstructionRecord, render_prompt
    from hydrabench.training.loop import IGNORE_INDEX, encode_record

    with_input = InstructionRecord("Add the numbers.", "5", input="2, 3")
    assert render_prompt(with_input, "reference") == "Add the numbers.\n2, 3</s>"
    assert render_prompt(InstructionRecord("Say hi.", "hi"), "reference") == "Say hi.</s>"
    ids, labels = encode_record(tiny.tokenizer, with_input, "reference", 1024)
    response = tiny.tokenizer("5", add_special_tokens=False)["input_ids"]
    assert ids[-len(response) - 1:] == [*response, tiny.tokenizer.eos_token_id]
    assert labels == [IGNORE_INDEX] * (len(ids) - len(response) - 1) + ids[-len(response) - 1:]
    assert resolve_spec("lora", "general", "paper").prompt_template == "reference"


@pytest.mark.slow
def test_reference_pipeline_runs_on_cpu_with_local_data(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import SHARED

    from hydrabench.pipeline.run import execute

    model = SHARED / "models" / "stories260K"
    if not model.is_dir():
        pytest.skip("../shared/models not present")
    monkeypatch.setenv("HYDRABENCH_DATA_DIR", str(SHARED / "data"))
    spec = resolve_spec("hydralora", "math", "reference", model=str(model),
                        overrides={"train": {"max_steps": 2},
                                   # 16 tokens: stories260K never stops a chain of thought
                                   "eval": {"limit": 3, "backend": "hf",
                                            "gen_kwargs": "max_gen_toks=16"}})
    record = execute(spec, store=RunStore(tmp_path / "results"))
    assert record.seed == 41 and record.spec["prompt_template"] == "reference"
    assert tuple(record.spec["adapter"]["target_modules"]) == ("gate_proj", "up_proj",
                                                               "down_proj")
    assert record.training.train["steps"] == 2
    assert record.metrics["gsm8k_cot"].n == 3
