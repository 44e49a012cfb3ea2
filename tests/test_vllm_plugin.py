"""hydrabench's vLLM plugin against the real vLLM CPU build: HydraLoRA-family, MoLoRA and FlyLoRA
runs served exactly.

No mocks. Tiny HydraLoRA, LoRAMoE, LoRA-Split, R-LoRA, MoLoRA and FlyLoRA runs are trained for a few
steps and scored on hf (the exact in-memory model); then the same trained adapters are served by a
real vLLM engine through the plugin (a run with backend vllm; `hydrabench eval --run RUN --backend
vllm`, the command line a user runs): the run's export scored by lm-eval's in-process vllm in a
child process. Per answer the loglikelihoods must agree to 1e-4 and greedy generations must match
but for near ties. Each slow test starts exactly one engine (the run's own): about 20 s on a core
as the suite starts it (conftest's FAST_VLLM), a minute and more compiled, as the tensor-parallel
HydraLoRA test starts it. vLLM missing is a failure unless HYDRABENCH_SKIP_VLLM=1 says so
explicitly.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_refused_in_one_line, error_lines, too_few_gpus
from test_vllm_backend import assert_same_scores, hydrabench, vllm_available

from hydrabench.cli import main
from hydrabench.methods import get_method
from hydrabench.methods.hydralora import METHOD
from hydrabench.methods.hydralora_layer import (
    HydraLoraConfig,
    apply_hydralora,
    hydralora_layers,
    load_hydralora,
)
from hydrabench.models import load_base_model
from hydrabench.pipeline.resolve import resolve_spec
from hydrabench.pipeline.run import execute
from hydrabench.records.store import RunRecord, RunStore
from hydrabench.serving.export import export_run, load_base_or_export, save_plugin_checkpoint
from hydrabench.serving.inprocess import ENGINE_LOG
from hydrabench.serving.plugin import (
    ADAPTER_DIR,
    PLUGIN_ARCHITECTURES,
    PluginError,
    check_adapter_config,
    check_covered,
)

__all__ = ["vllm_available"]  # a fixture the slow tests use

PLUGIN_TOL = 1e-4  # nats per answer; measured differences are ~3e-6 in float32
ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# "general" scores multiple choice (loglikelihoods) and generation tasks: both paths are checked.
TASK, LIMIT, STEPS = "general", 6, 6


def flags(method: str, targets: list[str] | None = None) -> list[str]:
    """The CLI flags that give the same spec as overrides(method, targets)."""
    extra = ["--target-modules", ",".join(targets)] if targets else []
    return ["--method", method, "--task", TASK, "--max-steps", str(STEPS), "--limit", str(LIMIT),
            *extra]


def overrides(targets: list[str] | None = None) -> dict:
    adapter = {"target_modules": targets} if targets else {}
    return {"train": {"max_steps": STEPS}, "eval": {"limit": LIMIT}, "adapter": adapter}


def assert_served_exactly(hf_record: RunRecord, hf_dir: Path, vllm_dir: Path) -> None:
    for task, score in hf_record.metrics.items():
        metric = score.primary.split(",")[0]
        print(assert_same_scores(hf_dir, vllm_dir, task, metric, tolerance=PLUGIN_TOL))


def served_record(result, store: RunStore) -> tuple[RunRecord, Path]:
    assert result.returncode == 0, result.stderr[-3000:]
    run_id = re.search(r"results/runs/(\S+)/record\.json", result.stdout).group(1)
    record = store.load(run_id)
    assert record.backend == "vllm" and record.merge == "exact"
    log = store.runs / run_id / record.serving["log"]
    # The engine ran the plugin's class: the export's config named it.
    assert log.name == ENGINE_LOG and "HydraLoraLlamaForCausalLM" in log.read_text()
    return record, store.runs / run_id


@pytest.mark.slow
@pytest.mark.skipif(too_few_gpus(2), reason="tensor parallelism 2 on CUDA needs 2 GPUs")
def test_hydralora_run_with_vllm_backend_is_exact_under_tensor_parallelism(
        vllm_available: None, compiled_vllm: None, tmp_path: Path) -> None:
    """Every target module the plugin covers (fused q/k/v and gate/up slices, row-parallel
    o/down), a trained router, two tensor-parallel ranks (B sharded, A·x and router logits of
    o/down all-reduced): a run with backend vllm records merge exact and matches hf. The engine
    is compiled, as a user's is (the other plugin tests start theirs without torch.compile)."""
    store = RunStore(tmp_path / "results")
    hf_record = execute(resolve_spec("hydralora", TASK, overrides=overrides(ALL_TARGETS)),
                        store=store)
    # The exact export: the base checkpoint, the adapter, the plugin class; hf loads it as is.
    export = export_run(hf_record.run_id, "exact", store=store)
    assert json.loads((export / "config.json").read_text())["architectures"] == [
        PLUGIN_ARCHITECTURES["LlamaForCausalLM"]]
    exported = load_base_or_export(str(export))
    assert set(hydralora_layers(exported.model)) and (export / ADAPTER_DIR).is_dir()
    ids = exported.tokenizer("Question: what is the capital?", return_tensors="pt")["input_ids"]
    run_model = load_hydralora(load_base_model("builtin:tiny").model, hf_record.artifact)
    with torch.no_grad():
        assert torch.equal(exported.model(ids).logits, run_model(ids).logits)

    # The evaluation settings are not part of the train id: the same trained adapter is served.
    served = {**overrides(ALL_TARGETS),
              "eval": {"limit": LIMIT, "backend": "vllm", "tensor_parallel_size": 2}}
    record = execute(resolve_spec("hydralora", TASK, overrides=served), store=store)
    assert record.train_id == hf_record.train_id
    assert record.backend == "vllm" and record.merge == "exact"
    run_dir = store.runs / record.run_id
    log = (run_dir / record.serving["log"]).read_text()
    assert "HydraLoraLlamaForCausalLM" in log and "world_size=2 rank=1" in log
    assert not list(run_dir.glob("merged-*"))  # the served checkpoint was temporary
    assert_served_exactly(hf_record, store.runs / hf_record.run_id / "lm_eval",
                          run_dir / "lm_eval")


@pytest.mark.slow
@pytest.mark.skipif(too_few_gpus(2), reason="tensor parallelism 2 on CUDA needs 2 GPUs")
@pytest.mark.parametrize("method", ["molora", "flylora"])
def test_top_k_run_with_vllm_backend_is_exact_under_tensor_parallelism(
        vllm_available: None, method: str, tmp_path: Path) -> None:
    """The top-k gates at two ranks on every target: taken from the all-reduced A·x and router
    logits of o/down (row-parallel), FlyLoRA's d replicated, B sharded; the run matches hf."""
    store = RunStore(tmp_path / "results")
    hf_record = execute(resolve_spec(method, TASK, overrides=overrides(ALL_TARGETS)),
                        store=store)
    served = {**overrides(ALL_TARGETS),
              "eval": {"limit": LIMIT, "backend": "vllm", "tensor_parallel_size": 2}}
    record = execute(resolve_spec(method, TASK, overrides=served), store=store)
    assert record.train_id == hf_record.train_id and record.merge == "exact"
    run_dir = store.runs / record.run_id
    log = (run_dir / record.serving["log"]).read_text()
    assert "HydraLoraLlamaForCausalLM" in log and "world_size=2 rank=1" in log
    assert_served_exactly(hf_record, store.runs / hf_record.run_id / "lm_eval",
                          run_dir / "lm_eval")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["loramoe", "lora-split", "hydralora-uniform", "r-lora",
                                    "molora", "flylora"])
def test_eval_run_with_vllm_backend_scores_a_finished_run_exactly(
        vllm_available: None, method: str, tmp_path: Path) -> None:
    """One A per expert (LoRAMoE in the FFN, LoRA-Split at the profile's q/v), the uniform gate
    (no router), R-LoRA's random heads, MoLoRA's top-2 of 4 experts renormalised, FlyLoRA's top-8
    mask of 32 rank-1 heads (A·x + d: on trained float data no ties, so hf and vLLM pick the
    same): `eval --run RUN --backend vllm` scores the finished hf run's adapter through the
    plugin, as hf does."""
    store = RunStore(tmp_path / "results")
    hf_record = execute(resolve_spec(method, TASK, overrides=overrides()), store=store)
    result = hydrabench("eval", "--run", hf_record.run_id, "--task", TASK, "--limit",
                        str(LIMIT), "--backend", "vllm", results=store.root)
    record, run_dir = served_record(result, store)
    assert record.artifact == hf_record.artifact
    assert_served_exactly(hf_record, store.runs / hf_record.run_id / "lm_eval",
                          run_dir / "lm_eval")


def qwen2_model(tmp_path: Path) -> str:
    """A small random Qwen2 (bias on q/k/v, 2 key/value heads for 4 query heads, head size 32)
    with the tiny model's tokenizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = load_base_model("builtin:tiny").tokenizer
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(tmp_path / "qwen2")
    tokenizer.save_pretrained(tmp_path / "qwen2")
    return str(tmp_path / "qwen2")


@pytest.mark.slow
def test_qwen2_hydralora_served_exactly(vllm_available: None, tmp_path: Path) -> None:
    """The plugin's Qwen2 class: fused q/k/v with biases and grouped key/value heads."""
    store = RunStore(tmp_path / "results")
    model, targets = qwen2_model(tmp_path), ["q_proj", "k_proj", "v_proj", "down_proj"]
    hf_record = execute(resolve_spec("hydralora", TASK, model=model,
                                     overrides=overrides(targets)), store=store)
    served = {**overrides(targets), "eval": {"limit": LIMIT, "backend": "vllm"}}
    record = execute(resolve_spec("hydralora", TASK, model=model, overrides=served), store=store)
    assert record.merge == "exact" and record.train_id == hf_record.train_id
    run_dir = store.runs / record.run_id
    assert "HydraLoraQwen2ForCausalLM" in (run_dir / record.serving["log"]).read_text()
    assert_served_exactly(hf_record, store.runs / hf_record.run_id / "lm_eval",
                          run_dir / "lm_eval")


@pytest.mark.slow
def test_engine_that_does_not_come_up_is_one_line_naming_its_log(
        vllm_available: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    """A context longer than the model's (512) makes vLLM refuse to start: the error names the
    engine's last error and its log, kept outside results/. (A server that does not come up:
    test_vllm_backend.py, test_server_failing_after_training_leaves_nothing_it_made.)
    hydrabench refuses that setting before any work (check_vllm_settings): switched off here so
    that the real engine stands for a failure no check foresees."""
    monkeypatch.setenv("HYDRABENCH_RESULTS", str(tmp_path / "results"))
    monkeypatch.setattr("hydrabench.pipeline.run.check_vllm_settings", lambda spec: None)
    argv = ["eval", "--model", "builtin:tiny", "--task", "tiny_medical", "--limit", "2",
            "--backend", "vllm", "--profile", profile_with("eval: {max_model_len: 4096}\n")(
                tmp_path)]
    assert main(argv) == 2
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and "vLLM engine exited" in errors[0], errors
    assert "max_model_len" in errors[0]  # vLLM's own reason, from its log
    log = Path(re.search(r"engine log: (\S+)\)$", errors[0]).group(1))
    error = errors[0].split(" before it was ready: ", 1)[1].rsplit(" (engine log:", 1)[0]
    assert error[:60] in log.read_text()  # the kept log holds the error the line quotes
    shutil.rmtree(log.parent)
    assert_no_run(tmp_path / "results")


def assert_no_run(results: Path) -> None:
    """No run: no record, no run or staging directory. (The runner's lock files and the base
    method's artifact marker, which records that nothing was trained, come before serving.)"""
    runs = results / "runs"
    assert not runs.exists() or not any(runs.iterdir()), list(runs.iterdir())


# -- bad input, before any work: one line, exit 2, nothing under results/ ---------------------


def tiny_export(tmp_path: Path) -> Path:
    """A plugin export written by the real exporter (an untrained adapter: enough to load)."""
    base = load_base_model("builtin:tiny")
    model = apply_hydralora(base.model, HydraLoraConfig(target_modules=("q_proj", "v_proj")))
    save_plugin_checkpoint(METHOD, model, base.tokenizer, tmp_path / "export", "hand-made")
    return tmp_path / "export"


def corrupt_adapter(tmp_path: Path) -> str:
    export = tiny_export(tmp_path)
    weights = export / ADAPTER_DIR / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a copy cut short
    return str(export)


def mistral_model(tmp_path: Path) -> str:
    """A causal LM whose architecture the plugin does not cover (same module names as Llama)."""
    from transformers import MistralConfig, MistralForCausalLM

    tokenizer = load_base_model("builtin:tiny").tokenizer
    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                           num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
    MistralForCausalLM(config).save_pretrained(tmp_path / "mistral")
    tokenizer.save_pretrained(tmp_path / "mistral")
    return str(tmp_path / "mistral")


def profile_with(text: str):
    def write(tmp_path: Path) -> str:
        (tmp_path / "mine.yaml").write_text(f"extends: tiny\n{text}")
        return str(tmp_path / "mine.yaml")
    return write


HYDRALORA_VLLM = ["run", "--method", "hydralora", "--task", "medical", "--backend", "vllm"]
CASES = [
    ("corrupt adapter, hf", ["eval", "--model", corrupt_adapter, "--task", "tiny_medical"],
     "cannot load the plugin adapter in"),
    ("corrupt adapter, vllm", ["eval", "--model", corrupt_adapter, "--task", "tiny_medical",
                               "--backend", "vllm"], "cannot load the plugin adapter in"),
    ("architecture the plugin does not cover", [*HYDRALORA_VLLM, "--model", mistral_model],
     "architecture MistralForCausalLM is not covered by hydrabench's vLLM plugin"),
    ("unverified tensor parallelism",
     [*HYDRALORA_VLLM, "--profile", profile_with("eval: {tensor_parallel_size: 4}\n")],
     "tensor_parallel_size 4 is not verified"),
]


@pytest.mark.parametrize(("argv", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_plugin_bad_input_is_one_line_exit_2_nothing_written(
        argv: list, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("HYDRABENCH_RESULTS", str(tmp_path / "results"))
    argv = [a(tmp_path) if callable(a) else a for a in argv]
    assert_refused_in_one_line(argv, message, tmp_path / "results", capsys)


def test_backend_auto_picks_vllm_where_the_plugin_serves_the_method(tmp_path: Path) -> None:
    auto = profile_with("eval: {backend: auto}\n")(tmp_path)
    assert resolve_spec("hydralora", "medical", auto).eval.backend == "vllm"
    assert resolve_spec("loramoe", "medical", auto).eval.backend == "vllm"
    for method in ("r-lora", "molora", "flylora"):  # molora's, flylora's top-k gates too
        assert resolve_spec(method, "medical", auto).eval.backend == "vllm"
    assert resolve_spec("lora", "medical", auto).eval.backend == "vllm"  # merges exactly
    assert resolve_spec("prompt-tuning", "medical", auto).eval.backend == "hf"
    lm_head = {"adapter": {"target_modules": ["q_proj", "lm_head"]}}
    assert resolve_spec("hydralora", "medical", auto, overrides=lm_head).eval.backend == "hf"
    assert resolve_spec("hydralora", "medical", auto,
                        model=mistral_model(tmp_path)).eval.backend == "hf"


def test_a_target_module_the_plugin_does_not_cover_is_named() -> None:
    """Every adaptable linear layer of the Llama family is covered, so the CLI refuses other
    targets (the output head) earlier; the plugin's own check still names what it lacks."""
    with pytest.raises(PluginError, match=r"target module\(s\) lm_head are not covered by "
                                          "hydrabench's vLLM plugin"):
        check_covered(["LlamaForCausalLM"], ["q_proj", "lm_head"], 1)


def test_plain_transformers_refuses_an_export_rather_than_drop_its_adapter(
        tmp_path: Path) -> None:
    """Plain transformers reads an export's base checkpoint and never its adapter (hydralora/):
    it loaded the base model silently. The export's model type is hydrabench's own, so plain
    transformers (a fresh process: no hydrabench import, none of its registrations) refuses it
    naming hydrabench; hydrabench loads it, the adapter on its base."""
    export = tiny_export(tmp_path)
    assert json.loads((export / "config.json").read_text())["model_type"] == (
        "hydrabench_hydralora_llama")
    plain = ("import sys\nfrom transformers import AutoModelForCausalLM\n"
             "AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
             "assert 'hydrabench' not in sys.modules")
    result = subprocess.run([sys.executable, "-c", plain, str(export)], capture_output=True,
                            text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "ValueError: The checkpoint you are trying to load has model type " \
           "`hydrabench_hydralora_llama`" in result.stderr
    loaded = load_base_or_export(str(export)).model
    assert type(loaded).__name__ == "LlamaForCausalLM" and set(hydralora_layers(loaded))


# -- the top-k methods (molora, flylora) in the plugin's terms, without an engine --------------


def adapted(method: str) -> tuple[torch.nn.Module, object]:
    """(the tiny model adapted by `method`, its tokenizer), with random B heads (and router,
    FlyLoRA's d) so that the top-k choice matters; in eval mode (no dropout, d stays)."""
    base = load_base_model("builtin:tiny")
    adapter = {"num_heads": 4, "top_k": 2} if method == "molora" else {"rank": 6, "top_k": 2}
    spec = resolve_spec(method, "medical", overrides={"adapter": adapter})
    model = get_method(method).adapt(base.model, spec, []).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if any(key in name for key in ("lora_B", "router", "expert_bias")):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
    return model, base.tokenizer


@pytest.mark.parametrize("method", ["molora", "flylora"])
def test_plugin_adapter_update_is_the_hf_layers_delta(vllm_available: None, method: str,
                                                      tmp_path: Path) -> None:
    """The plugin's adapter (HydraLoraAdapter, its tensors read from the saved artifact by
    plugin_layout) adds what the hf layer adds, per token; the gate keeps k heads of each."""
    from safetensors.torch import load_file

    from hydrabench.serving.plugin.models import HydraLoraAdapter, plugin_layout

    model, _ = adapted(method)
    get_method(method).save(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["method"] == method
    terms = check_adapter_config(config)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    layers = {path: m for path, m in model.named_modules() if hasattr(m, "lora_B")}
    used = set()
    x = torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(2))
    for path, layer in layers.items():
        adapter = HydraLoraAdapter(terms, layer.base.in_features, layer.base.out_features,
                                   torch.float32)
        saved, keys = plugin_layout(method, tensors, path)
        used |= keys
        with torch.no_grad():
            for key, tensor in saved.items():
                getattr(adapter, key).copy_(tensor)
            low_rank = F.linear(x, adapter.lora_A)  # tensor parallelism 1: no partial sums
            logits = None if adapter.router is None else F.linear(x, adapter.router)
            gate = adapter.head_weights(low_rank.unflatten(-1, (-1, adapter.r)), logits)
            assert (gate > 0).sum(-1).eq(2).all() and gate.sum(-1).gt(0.99).all()
            assert torch.allclose(adapter.update(low_rank, logits), layer(x) - layer.base(x),
                                  atol=1e-6, rtol=1e-5)
    assert used == set(tensors)  # every saved tensor has its place


@pytest.mark.parametrize("method", ["molora", "flylora"])
def test_top_k_export_loads_as_the_run_model(method: str, tmp_path: Path) -> None:
    """The plugin export of a top-k method: base checkpoint plus the method's own adapter,
    which hf loads back as that method (not as dense HydraLoRA)."""
    model, tokenizer = adapted(method)
    save_plugin_checkpoint(get_method(method), model, tokenizer, tmp_path / "export", "hand")
    assert json.loads((tmp_path / "export" / ADAPTER_DIR / "adapter_config.json").read_text())[
        "method"] == method
    exported = load_base_or_export(str(tmp_path / "export")).model
    ids = tokenizer("Question: what is the capital?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(exported(ids).logits, model(ids).logits)


GOOD = {"method": "molora", "r": 8, "num_heads": 4, "alpha": 16, "shared_a": False,
        "gate": "softmax", "top_k": 2, "target_modules": ["q_proj"]}
FLY = {"method": "flylora", "r": 32, "k": 8, "alpha": 64, "target_modules": ["q_proj"]}


@pytest.mark.parametrize(("config", "message"), [
    ({**GOOD, "method": "lora"}, "not an adapter config hydrabench's vLLM plugin reads"),
    ({**GOOD, "top_k": 5}, r"top_k 5 outside \[1, 4\]"),
    ({**GOOD, "top_k": 0}, r"top_k 0 outside"),
    ({**GOOD, "gate": "uniform"}, "top_k with the uniform gate"),
    ({**GOOD, "method": "hydralora", "gate": "mask"}, "gate 'mask'"),
    ({**GOOD, "shared_a": True}, "a shared A"),
    ({**GOOD, "method": "hydralora"}, "top_k in HydraLoRA's format"),
    ({key: v for key, v in FLY.items() if key != "k"}, "KeyError"),
    ({**FLY, "k": 33}, r"top_k 33 outside \[1, 32\]"),
])
def test_adapter_config_the_plugin_cannot_compute_is_refused(config: dict,
                                                             message: str) -> None:
    with pytest.raises(PluginError, match=message):
        check_adapter_config(config)


def test_top_k_adapter_configs_in_the_plugins_terms() -> None:
    molora, fly = check_adapter_config(GOOD), check_adapter_config(FLY)
    assert (molora.gate, molora.top_k, molora.r, molora.num_heads) == ("softmax", 2, 8, 4)
    assert (fly.gate, fly.top_k, fly.r, fly.num_heads, fly.scaling) == ("mask", 8, 1, 32, 2.0)
    dense = {key: v for key, v in GOOD.items() if key != "top_k"}
    assert check_adapter_config({**dense, "method": "hydralora"}).top_k is None
    assert check_adapter_config(dense).top_k is None  # molora's top_k absent: the dense gate
