"""lm-eval scoring throughput (requests/s, tokens/s) of the tiny base model, per backend.

Tasks from the synthetic suite (``tasks/tiny``, lm-eval's own tasks left out):
``tiny_medical`` (multiple choice, loglikelihood requests) and ``tiny_arithmetic``
(``generate_until``, greedy, up to 48 new tokens). The backend's LM is wrapped so that only its
model calls are timed (``model_s``); ``wall_s`` is the whole ``simple_evaluate`` call, including
lm-eval's task building and metrics. tokens = prompt tokens (context + continuation for
loglikelihood) + generated tokens, counted with the model's tokenizer. Each evaluation runs
``--rounds`` times and the fastest is kept.

The hf backend always runs. When vllm is installed, the same checkpoint is also served the way
the harness's ``--backend vllm`` does it (``hydrabench.serving.server.VllmServer``, scored through
``hydrabench.serving.client``); the server's start-up (about a minute on 2 cores) is reported apart,
not counted in the rates: the first start on an empty compile cache (``*_startup_s``) and a
second start of the same model on the cache the first one kept (``*_restart_s``), as the harness
keeps it for a model that stays where it is (a base model, an export). Otherwise the reason is
printed and the run goes on. Beside it, lm-eval's own in-process ``vllm`` backend scores the same
checkpoints (``vllm-inprocess``, ``vllm-plugin-inprocess``) on an empty compile cache of its own,
in a spawned process, as the harness scores a run with a checkpoint of its own
(``hydrabench.serving.inprocess``; the server stays for base-model servers). Its start-up counts
from the spawn, imports included, as the server's does. Beside the rates, one run's whole wall
(``*_wall_s``, ``*_served_over_inprocess_wall``): a server started on an empty cache, the rounds
scored, the server stopped, against the spawned process from spawn to exit, the same rounds
scored. Every vLLM row's per-request loglikelihoods are compared with its hf reference
(``max_abs_ll_diff``): a faster path only counts if it stays exact.

HydraLoRA (N = 4, r = 8 at q_proj and v_proj, the tiny profile's) is scored the same two ways:
``hf-hydralora``, the exact in-memory model, and ``vllm-plugin``, its exact export served by
hydrabench's vLLM plugin. Its B heads are random (seeded), not trained: the arithmetic, hence
the speed, is a trained adapter's.

One server for N runs (``--runs``, default 3; the ``eval.serving`` setting): N LoRA adapters (r = 8
at q_proj and v_proj, random seeded B) of the tiny base model scored on ``tiny_medical``, once on
one server of the base model that loads each adapter in turn (``adapters``: vLLM's own LoRA
serving, what a sweep does), once as N merged checkpoints with a server each (``merged``). Both
walls count everything from the first server start to the last score (the merged side's merging
apart: the runner does it before serving); each run's scoring time is reported start-up apart.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import itertools
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lm_eval
import psutil
import torch
from _common import (
    REPORT_DIR,
    LoadWindow,
    finish,
    other_cores_busy,
    parse_args,
    print_table,
    ratio,
)
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from peft import LoraConfig, get_peft_model

from hydrabench.methods.hydralora import METHOD
from hydrabench.methods.hydralora_layer import HydraLoraConfig, apply_hydralora, hydralora_layers
from hydrabench.models import BUILTIN_TINY, load_base_model
from hydrabench.paths import TASKS_DIR
from hydrabench.serving.export import save_plugin_checkpoint
from hydrabench.training.metering import hardware_summary

TASKS = ("tiny_medical", "tiny_arithmetic")


@dataclass
class Counts:
    requests: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    model_s: float = 0.0


class CountingLM(LM):
    """Delegates every request type to a backend's LM, timing the calls and counting tokens."""

    def __init__(self, inner: LM, tokenizer: Any) -> None:
        super().__init__()
        self.inner = inner
        self.tokenizer = tokenizer
        self.counts = Counts()
        self.loglikelihoods: list[float] = []  # in request order, to compare backends

    def _n_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _timed(self, call: Callable[[list[Instance]], list], requests: list[Instance]) -> list:
        start = time.perf_counter()
        results = call(requests)
        self.counts.model_s += time.perf_counter() - start
        self.counts.requests += len(requests)
        return results

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        results = self._timed(self.inner.loglikelihood, requests)
        self.loglikelihoods += [ll for ll, _ in results]
        self.counts.prompt_tokens += sum(self._n_tokens(ctx + cont) for ctx, cont in
                                         (r.args for r in requests))
        return results

    def loglikelihood_rolling(self, requests: list[Instance]) -> list[float]:
        results = self._timed(self.inner.loglikelihood_rolling, requests)
        self.counts.prompt_tokens += sum(self._n_tokens(r.args[0]) for r in requests)
        return results

    def generate_until(self, requests: list[Instance]) -> list[str]:
        results = self._timed(self.inner.generate_until, requests)
        self.counts.prompt_tokens += sum(self._n_tokens(r.args[0]) for r in requests)
        self.counts.generated_tokens += sum(self._n_tokens(text) for text in results)
        return results


def evaluate_once(inner: LM, tokenizer: Any, task: str, manager: TaskManager,
                  limit: int | None) -> dict[str, Any]:
    """One lm-eval run of ``task``: its counts, times, rates and (key ``loglikelihoods``, left
    out of the report) each loglikelihood request's answer."""
    lm = CountingLM(inner, tokenizer)
    start = time.perf_counter()
    # bootstrap_iters=0: stderr bootstrapping is metric work, not scoring throughput.
    lm_eval.simple_evaluate(model=lm, tasks=[task], limit=limit, task_manager=manager,
                            bootstrap_iters=0, log_samples=False, verbosity="WARNING")
    wall_s = time.perf_counter() - start
    c = lm.counts
    return {"task": task, **asdict(c), "wall_s": wall_s, "loglikelihoods": lm.loglikelihoods,
            "requests/s": c.requests / c.model_s,
            "tokens/s": (c.prompt_tokens + c.generated_tokens) / c.model_s,
            "generated tokens/s": c.generated_tokens / c.model_s}


def run_backend(name: str, inner: LM, tokenizer: Any, manager: TaskManager,
                args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for task in TASKS:
        print(f"scoring {task} with {name} ...", flush=True)
        runs = [evaluate_once(inner, tokenizer, task, manager, args.limit)
                for _ in range(args.rounds)]
        # The fastest run: on a shared machine other processes only ever slow a run down.
        rows.append({"backend": name, **min(runs, key=lambda run: run["model_s"])})
    return rows


def vllm_rows(name: str, model_dir: Path, tokenizer: Any, manager: TaskManager,
              args: argparse.Namespace
              ) -> tuple[list[dict[str, Any]], str, list[float], float | None]:
    """vLLM rows (backend `name`), a status line, the start-up seconds of the server's first
    and second start (on the compile cache the first one kept), and the first server's whole
    wall: start, scoring, stop (what one run with a checkpoint of its own costs the harness).

    Never raises: a missing or broken optional backend must not lose the hf figures.
    """
    if importlib.util.find_spec("vllm") is None:
        return [], "unavailable: vllm is not installed", [], None
    try:
        from hydrabench.serving.client import served_lm
        from hydrabench.serving.server import VllmServer
    except ImportError as err:
        return [], f"unavailable: hydrabench's serving is not importable ({err})", [], None
    def server() -> VllmServer:
        return VllmServer(model_dir, max_model_len=args.max_length, compile_cache=args.vllm_cache,
                          log_dir=REPORT_DIR / f"{name}_server")

    try:
        # The harness's own vllm path: a served checkpoint scored by lm-eval's local-completions.
        start = time.perf_counter()
        with server() as first:
            rows = run_backend(name, served_lm(first, model_dir), tokenizer, manager, args)
        wall_s = time.perf_counter() - start
        with server() as again:  # on the compile cache the first one kept
            return rows, "measured", [first.startup_s, again.startup_s], wall_s
    except Exception as err:
        print(f"vllm failed: {err}", file=sys.stderr)  # names the kept server log
        first_line = next(iter(str(err).splitlines()), "")
        return [], f"failed: {type(err).__name__}: {first_line}", [], None


def inprocess_child(name: str, model_dir: str, settings: dict[str, Any], spawned_at: float,
                    log_path: str, result_path: str) -> None:
    """In a fresh interpreter (spawned): lm-eval's in-process `vllm` backend scores `model_dir`
    in the environment the harness gives its engine child (`hydrabench.serving.inprocess`). Its
    output goes to `log_path`; its rows and the seconds from spawn to a ready engine to
    `result_path`."""
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(log, 1)  # the engine processes it starts inherit these
    os.dup2(log, 2)
    from transformers import AutoTokenizer

    from hydrabench.serving.inprocess import point_version_lookup_at_cpu_build
    from hydrabench.serving.server import vllm_env

    os.environ.update(vllm_env(1, Path(settings["scratch"])))
    point_version_lookup_at_cpu_build()
    from lm_eval.models.vllm_causallms import VLLM

    lm = VLLM(pretrained=model_dir, dtype="float32", max_model_len=settings["max_length"],
              add_bos_token=True, batch_size="auto")
    ready_s = time.time() - spawned_at
    manager = TaskManager(include_path=str(TASKS_DIR / "tiny"), include_defaults=False)
    rows = run_backend(name, lm, AutoTokenizer.from_pretrained(model_dir), manager,
                       argparse.Namespace(**settings))
    Path(result_path).write_text(json.dumps({"rows": rows, "startup_s": ready_s}))
    # Its engine processes end with it: else the process's exit waits for them for ever.
    del lm
    gc.collect()


def inprocess_rows(name: str, model_dir: Path, args: argparse.Namespace
                   ) -> tuple[list[dict[str, Any]], str, float | None, float | None]:
    """lm-eval's in-process `vllm` backend on `model_dir`, in a spawned process
    (`inprocess_child`): rows, a status line, seconds from spawn to a ready engine, and from
    spawn to exit. Never raises, as `vllm_rows`."""
    if importlib.util.find_spec("vllm") is None:
        return [], "unavailable: vllm is not installed", None, None
    from hydrabench.serving.server import last_error_line, vllm_scratch

    log_path = REPORT_DIR / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    result = vllm_scratch("bench-eval-engine-")  # the engine's TMPDIR and compile cache
    settings = {"limit": args.limit, "rounds": args.rounds, "max_length": args.max_length,
                "scratch": str(result)}
    print(f"scoring with {name} (spawned; log: {log_path}) ...", flush=True)
    spawned_at = time.time()
    child = multiprocessing.get_context("spawn").Process(
        target=inprocess_child, args=(name, str(model_dir), settings, spawned_at, str(log_path),
                                      str(result / "result.json")))
    try:
        child.start()
        child.join()
        wall_s = time.time() - spawned_at
        if child.exitcode != 0:
            error = last_error_line(log_path.read_text(errors="replace"))
            print(f"{name} failed: exit code {child.exitcode}: {error} (log: {log_path})",
                  file=sys.stderr)
            return [], f"failed: exit code {child.exitcode}: {error}", None, None
        reported = json.loads((result / "result.json").read_text())
        return reported["rows"], "measured", reported["startup_s"], wall_s
    finally:
        shutil.rmtree(result, ignore_errors=True)


def hydralora_model(device: str, export_dir: Path) -> torch.nn.Module:
    """The tiny base model with a HydraLoRA adapter (random B heads), its exact plugin export
    written to `export_dir`."""
    torch.manual_seed(0)
    base = load_base_model(BUILTIN_TINY, "float32", device)
    model = apply_hydralora(base.model, HydraLoraConfig(r=8, num_heads=4, alpha=16.0,
                                                        target_modules=("q_proj", "v_proj")))
    with torch.no_grad():
        for layer in hydralora_layers(model).values():
            layer.lora_B.normal_(std=0.02)
    save_plugin_checkpoint(METHOD, model, base.tokenizer, export_dir, "bench-eval")
    return model.eval()


def lora_runs(n: int, root: Path) -> list[tuple[Path, Path]]:
    """(peft adapter, merged checkpoint) of n LoRA adapters of the tiny base (random B)."""
    runs = []
    for k in range(n):
        torch.manual_seed(k)
        base = load_base_model(BUILTIN_TINY, "float32", "cpu")
        model = get_peft_model(base.model, LoraConfig(r=8, lora_alpha=16,
                                                      target_modules=["q_proj", "v_proj"]))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(std=0.02)
        model.save_pretrained(root / f"adapter{k}")
        model.merge_and_unload().save_pretrained(root / f"merged{k}")
        base.tokenizer.save_pretrained(root / f"merged{k}")
        runs.append((root / f"adapter{k}", root / f"merged{k}"))
    return runs


def score_served(server: Any, model_dir: Path, model_name: str | None, tokenizer: Any,
                 manager: TaskManager, args: argparse.Namespace) -> dict[str, Any]:
    from hydrabench.serving.client import served_lm

    return evaluate_once(served_lm(server, model_dir, model_name), tokenizer, "tiny_medical",
                         manager, args.limit)


def server_cpu_s(server: Any) -> float:
    """CPU seconds (user + system) the server's processes used so far."""
    top = psutil.Process(server.process.pid)
    return sum(sum(p.cpu_times()[:2]) for p in [top, *top.children(recursive=True)])


def shared_vs_per_run(base_dir: Path, tokenizer: Any, manager: TaskManager,
                      args: argparse.Namespace) -> dict[str, Any]:
    """N runs scored on one server vs one server per run (see the module's docstring)."""
    from hydrabench.serving.server import LoraSlots, VllmServer, served_lora_config

    root = Path(tempfile.mkdtemp(prefix="bench-eval-shared-"))
    try:
        runs = lora_runs(args.runs, root)
        load, servers_cpu_s = LoadWindow(), 0.0
        slots = LoraSlots.fitting([served_lora_config(adapter) for adapter, _ in runs])
        print(f"scoring {args.runs} LoRA runs on one server ...", flush=True)
        start = time.perf_counter()
        shared = []
        with VllmServer(base_dir, max_model_len=args.max_length, lora=slots,
                        compile_cache=args.vllm_cache,
                        log_dir=REPORT_DIR / "shared_server") as server:
            shared_startup_s = server.startup_s
            for k, (adapter, _) in enumerate(runs):
                server.load_adapter(f"run{k}", adapter)
                shared.append(score_served(server, base_dir, f"run{k}", tokenizer, manager,
                                           args))
                server.unload_adapter(f"run{k}")
            shared_s = time.perf_counter() - start
            servers_cpu_s += server_cpu_s(server)
        print(f"scoring {args.runs} merged runs, a server each ...", flush=True)
        start, per_run, startups = time.perf_counter(), [], []
        for k, (_, merged) in enumerate(runs):
            # A compile cache of its own, as the runner gives the checkpoint it merges per run.
            with VllmServer(merged, max_model_len=args.max_length,
                            log_dir=REPORT_DIR / f"per_run_server{k}") as server:
                startups.append(server.startup_s)
                per_run.append(score_served(server, merged, None, tokenizer, manager, args))
                servers_cpu_s += server_cpu_s(server)
        per_run_s = time.perf_counter() - start
        others = load.others(servers_cpu_s)
    finally:
        shutil.rmtree(root)

    return {"runs": args.runs, "one_server_wall_s": round(shared_s, 1),
            "server_per_run_wall_s": round(per_run_s, 1),
            "server_per_run_over_one_server_wall": ratio(per_run_s, shared_s),
            "one_server_startup_s": round(shared_startup_s, 1),
            "per_run_startup_s": [round(s, 1) for s in startups],
            # Start-up apart, per run: the shared server's first requests also pay its warm-up.
            "one_server_scoring_s": [round(r["model_s"], 2) for r in shared],
            "server_per_run_scoring_s": [round(r["model_s"], 2) for r in per_run],
            "one_server_other_processes_cores_busy": None if others is None
            else round(others, 2),
            "rows": {"one_server": shared, "server_per_run": per_run}}


def over(rows: Sequence[dict[str, Any]], backend: str, reference: str,
         key: str) -> dict[str, float]:
    by = {(r["backend"], r["task"]): r[key] for r in rows}
    return {task: ratio(by[(backend, task)], by[(reference, task)]) for task in TASKS
            if (backend, task) in by}


def startups(prefix: str, seconds: Sequence[float]) -> dict[str, float | None]:
    """A server's first start (empty compile cache) and second start (the cache it kept)."""
    first, second = (round(s, 1) for s in seconds) if seconds else (None, None)
    return {f"{prefix}_startup_s": first, f"{prefix}_restart_s": second}


def max_ll_diff(rows: Sequence[dict[str, Any]], backend: str, reference: str) -> float | None:
    """Largest |loglikelihood difference| of one request between two backends' rows."""
    by = {(r["backend"], r["task"]): r["loglikelihoods"] for r in rows}
    diffs = [abs(a - b) for task in TASKS if (backend, task) in by
             for a, b in zip(by[(backend, task)], by[(reference, task)], strict=True)]
    return max(diffs) if diffs else None


# Environment variables that change how vLLM starts (compilation, engine processes), not what it
# computes: named in the headline when set.
VLLM_SETTINGS = ("TORCH_COMPILE_DISABLE", "VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_CI_ENV")


def main() -> None:
    def options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--limit", type=int, default=None,
                            help="documents per task (default: all 60; quick: 20)")
        parser.add_argument("--batch-size", type=int, default=32,
                            help="lm-eval batch size (the tiny profile's)")
        parser.add_argument("--max-length", type=int, default=512,
                            help="context length (the tiny model's maximum)")
        parser.add_argument("--runs", type=int, default=None,
                            help="N runs scored on one server vs a server each (default: 3, "
                                 "quick: 2; 0: skip)")

    args = parse_args(__doc__.splitlines()[0], (3, 5), options)
    if args.quick and args.limit is None:
        args.limit = 20
    if args.runs is None:
        args.runs = 2 if args.quick else 3
    base = load_base_model(BUILTIN_TINY, "float32", args.device)
    manager = TaskManager(include_path=str(TASKS_DIR / "tiny"), include_defaults=False)
    hf = HFLM(pretrained=base.model, tokenizer=base.tokenizer, batch_size=args.batch_size,
              max_length=args.max_length)
    rows = run_backend("hf", hf, base.tokenizer, manager, args)
    # Taken before vLLM starts: its engine processes are not children this process reaps, so
    # their CPU time would otherwise count as other processes' load.
    export_dir = Path(tempfile.mkdtemp(prefix="bench-eval-hydralora-"))
    hydralora = hydralora_model(args.device, export_dir)
    rows += run_backend("hf-hydralora", HFLM(pretrained=hydralora, tokenizer=base.tokenizer,
                                             batch_size=args.batch_size,
                                             max_length=args.max_length),
                        base.tokenizer, manager, args)
    others = other_cores_busy()
    # vLLM's compile caches start empty and go with the run: start-up is measured cold and warm.
    args.vllm_cache = Path(tempfile.mkdtemp(prefix="bench-eval-vllm-cache-"))
    walls: dict[str, float | None] = {}
    extra, vllm_status, vllm_startups, walls["vllm"] = vllm_rows(
        "vllm", base.directory, base.tokenizer, manager, args)
    rows += extra
    extra, plugin_status, plugin_startups, walls["vllm-plugin"] = vllm_rows(
        "vllm-plugin", export_dir, base.tokenizer, manager, args)
    rows += extra
    sharing: dict[str, Any] = {"one_server": "skipped (--runs 0)"}
    if args.runs and vllm_status == "measured":
        try:
            sharing = shared_vs_per_run(base.directory, base.tokenizer, manager, args)
        except Exception as err:  # a broken optional path must not lose the other figures
            print(f"one server for {args.runs} runs failed: {err}", file=sys.stderr)
            sharing = {"one_server": f"failed: {type(err).__name__}: "
                                     f"{next(iter(str(err).splitlines()), '')}"}
    elif args.runs:
        sharing = {"one_server": f"skipped: vllm {vllm_status}"}
    inprocess = {}
    for name, model_dir in (("vllm-inprocess", base.directory),
                            ("vllm-plugin-inprocess", export_dir)):
        extra, inprocess[name], inprocess[f"{name}_startup_s"], walls[name] = inprocess_rows(
            name, model_dir, args)
        rows += extra
    shutil.rmtree(export_dir)
    shutil.rmtree(args.vllm_cache)

    columns = ["backend", "task", "requests", "prompt_tokens", "generated_tokens", "model_s",
               "wall_s", "requests/s", "tokens/s", "generated tokens/s"]
    print_table(f"lm-eval scoring throughput, tiny base model ({args.device}, "
                f"limit {args.limit}, batch {args.batch_size})",
                [{k: r[k] for k in columns} for r in rows])
    vllm_over_hf = over(rows, "vllm", "hf", "tokens/s") or None
    print(f"\nvllm: {vllm_status}" + (f"; vllm/hf tokens/s: {vllm_over_hf}" if vllm_over_hf
                                      else ""))
    hf_rows = {r["task"]: r for r in rows if r["backend"] == "hf"}
    headline: dict[str, Any] = {}
    for task, row in hf_rows.items():
        headline[f"hf_{task}_requests_per_s"] = round(row["requests/s"], 1)
        headline[f"hf_{task}_tokens_per_s"] = round(row["tokens/s"])
    plugin_over_hf = over(rows, "vllm-plugin", "hf-hydralora", "tokens/s") or None
    print(f"vllm-plugin (HydraLoRA, exact): {plugin_status}" + (
        f"; plugin/hf-hydralora tokens/s: {plugin_over_hf}" if plugin_over_hf else ""))
    exactness = {f"{backend}_max_abs_ll_diff": max_ll_diff(rows, backend, reference)
                 for backend, reference in (("vllm", "hf"), ("vllm-plugin", "hf-hydralora"),
                                            ("vllm-inprocess", "hf"),
                                            ("vllm-plugin-inprocess", "hf-hydralora"))}
    inprocess_over_served = {
        "vllm_inprocess_over_served_tokens_per_s": over(rows, "vllm-inprocess", "vllm",
                                                        "tokens/s") or None,
        "plugin_inprocess_over_served_tokens_per_s": over(rows, "vllm-plugin-inprocess",
                                                          "vllm-plugin", "tokens/s") or None}
    # One run with a checkpoint of its own, whole: >1 means the in-process child took less time.
    served_over_inprocess_wall = {
        f"{served.replace('-', '_')}_served_over_inprocess_wall":
            ratio(walls[served], walls[f"{served}-inprocess"])
            if walls[served] and walls[f"{served}-inprocess"] else None
        for served in ("vllm", "vllm-plugin")}
    print(f"lm-eval's in-process vllm: {inprocess}; over the served path: "
          f"{inprocess_over_served}; served/in-process wall: {served_over_inprocess_wall}"
          f"\nexactness: {exactness}")
    headline |= {"vllm_over_hf_tokens_per_s": vllm_over_hf, "vllm": vllm_status,
                 **startups("vllm", vllm_startups),
                 "plugin_over_hf_hydralora_tokens_per_s": plugin_over_hf,
                 "vllm_plugin": plugin_status, **startups("vllm_plugin", plugin_startups),
                 **{k: v for k, v in sharing.items() if k != "rows"},
                 **{k.replace("-", "_"): round(v, 1) if isinstance(v, float) else v
                    for k, v in inprocess.items()},
                 **inprocess_over_served,
                 **{f"{k.replace('-', '_')}_wall_s": None if v is None else round(v, 1)
                    for k, v in walls.items()},
                 **served_over_inprocess_wall, **exactness,
                 "device": args.device, "cpu": hardware_summary()["cpu_model"],
                 # Start-up figures hold for vLLM's defaults only (the test suite turns them off).
                 "vllm_settings": " ".join(f"{name}={os.environ[name]}" for name in VLLM_SETTINGS
                                           if name in os.environ) or "default",
                 # While the hf rows ran (vLLM's processes would count as others after).
                 "other_processes_cores_busy": None if others is None else round(others, 2)}
    for row in itertools.chain(rows, *sharing.get("rows", {}).values()):
        row.pop("loglikelihoods")  # compared above; thousands of numbers, not figures
    finish("bench_eval", headline, {"quick": args.quick, "limit": args.limit,
                                    "batch_size": args.batch_size, "rows": rows,
                                    "shared_server_rows": sharing.get("rows")}, others)


if __name__ == "__main__":
    main()
