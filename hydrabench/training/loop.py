"""One plain training loop: setup, step, checkpoint, log — readable top to bottom (torchtune style).

Loss is on the response tokens only. The batch order is fixed by the seed up front, so a run resumed
from a checkpoint sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from hydrabench.atomic import atomic_path, remove_stale_temps
from hydrabench.config.spec import TrainSettings
from hydrabench.data.records import InstructionRecord, render_prompt
from hydrabench.errors import SpecError
from hydrabench.progress import log, report_progress
from hydrabench.training import distributed

IGNORE_INDEX = -100
StepHook = Callable[[int, int], None]  # (trained tokens, samples) after each optimizer step
# A method's own per-step work, given (model, 0-based step) after each optimizer update and before
# the gradients are cleared: AdaLoRA's rank allocation reads those gradients.
StepCallback = Callable[[torch.nn.Module, int], None]
# A method's own training loss for one micro-batch (HydraLoRA adds its load-balancing term).
LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]


class TrainingDiverged(SpecError):
    """The loss became NaN or infinite: nothing trained is kept, no record is written."""


class TrainingOutOfMemory(SpecError):
    """Reported like bad input: one line naming the batch shape that did not fit."""


@dataclass
class TrainResult:
    steps: int = 0
    trained_tokens: int = 0
    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)  # the learning rate each step took
    resumed_from_step: int = 0
    processes: int = 1  # data-parallel training processes (torchrun)
    strategy: str = "single"  # single, ddp or fsdp:<sharding config>

    def summary(self) -> dict:
        return {"steps": self.steps, "trained_tokens": self.trained_tokens,
                "first_loss": self.losses[0] if self.losses else None,
                "final_loss": self.losses[-1] if self.losses else None,
                "resumed_from_step": self.resumed_from_step, "processes": self.processes,
                "strategy": self.strategy,
                "curve": [{"step": step, "loss": loss, "lr": lr} for step, (loss, lr)
                          in enumerate(zip(self.losses, self.lrs, strict=True), start=1)]}


def encode_record(tokenizer, record: InstructionRecord, template: str,
                  seq_len: int) -> tuple[list[int], list[int]]:
    """Token ids and labels; the prompt (with BOS) is masked out of the loss."""
    prompt = tokenizer(render_prompt(record, template))["input_ids"]
    response = tokenizer(record.output, add_special_tokens=False)["input_ids"]
    response = [*response, tokenizer.eos_token_id]
    ids = (prompt + response)[:seq_len]
    labels = ([IGNORE_INDEX] * len(prompt) + response)[:seq_len]
    return ids, labels


def format_training_example(tokenizer, record: InstructionRecord, template: str,
                            seq_len: int) -> str:
    """One record as training sees it (prompt with BOS, target with EOS, both cut to seq_len)."""
    ids, labels = encode_record(tokenizer, record, template, seq_len)
    prompt = [t for t, label in zip(ids, labels, strict=True) if label == IGNORE_INDEX]
    target = [t for t in labels if t != IGNORE_INDEX]
    return (f"training example ({template} template; the loss is on the target only)\n"
            f"prompt: {tokenizer.decode(prompt)!r}\ntarget: {tokenizer.decode(target)!r}")


def collate(examples: Sequence[tuple[list[int], list[int]]],
            pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id)
    labels = torch.full((len(examples), width), IGNORE_INDEX)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, lab) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(lab)] = torch.tensor(lab)
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


@torch.no_grad()
def mean_loss(model: torch.nn.Module, tokenizer, records: Sequence[InstructionRecord], *,
              template: str, seq_len: int, device: str = "cpu", batch_size: int = 8) -> float:
    """The token-mean training loss on `records`, computed without training (eval mode)."""
    encoded = [encode_record(tokenizer, r, template, seq_len) for r in records]
    was_training = model.training
    model.eval()
    total = tokens = 0.0
    for start in range(0, len(encoded), batch_size):
        batch = collate(encoded[start: start + batch_size], tokenizer.pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        n_tokens = int((batch["labels"] != IGNORE_INDEX).sum())
        total += model(**batch).loss.item() * n_tokens
        tokens += n_tokens
    model.train(was_training)
    return total / tokens


def batch_schedule(n_examples: int, settings: TrainSettings, seed: int) -> list[list[int]]:
    """Micro-batches of example indices for the whole run, shuffled per epoch by the seed."""
    rng = random.Random(seed)
    batches = []
    for _ in range(settings.epochs):
        order = list(range(n_examples))
        rng.shuffle(order)
        batches += [order[i: i + settings.batch_size]
                    for i in range(0, n_examples, settings.batch_size)]
    if settings.max_steps:
        batches = batches[: settings.max_steps * settings.grad_accum]
    return batches


def optimizer_steps(n_examples: int, settings: TrainSettings) -> int:
    """The number of optimizer steps `train` takes on n examples (AdaLoRA needs it up front)."""
    return max(1, len(batch_schedule(n_examples, settings, seed=0)) // settings.grad_accum)


def lr_lambda(settings: TrainSettings, total_steps: int) -> Callable[[int], float]:
    warmup = math.ceil(settings.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        if settings.scheduler == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        if settings.scheduler == "linear":
            return 1 - progress
        return 1.0

    return factor


def _trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


CHECKPOINT_FORMAT = 3  # whole (unsharded) state, loadable whatever the number of processes;
# 3: with the learning rate of each step (the loss curve)


def _on_cuda(device: str | torch.device) -> bool:
    return torch.device(device).type == "cuda"


def _rng_state(device: str | torch.device) -> dict[str, torch.Tensor]:
    """The random state the run draws from: the CPU's, and its GPU's on a CUDA run only (asking
    CUDA in a CPU run would create a CUDA context, and flip the metered peak memory to CUDA's
    counter)."""
    state = {"cpu": torch.get_rng_state()}
    if _on_cuda(device):
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _restore_rng(state: dict[str, torch.Tensor], device: str | torch.device) -> None:
    """Set the state `_rng_state` took; a GPU's state only on a CUDA run (a CPU run resuming a
    GPU run's checkpoint leaves CUDA alone)."""
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and _on_cuda(device):
        torch.cuda.set_rng_state(state["cuda"], device)


def _save_checkpoint(path: Path, owner, optim, sched, step: int, result: TrainResult,
                     device: str) -> None:
    """All processes gather the trainable weights and optimizer state whole; rank 0 writes them."""
    options = StateDictOptions(**distributed.FULL_STATE, ignore_frozen_params=True)
    params, optim_state = get_state_dict(owner, optim, options=options)
    rng = distributed.all_gather(_rng_state(device))  # each process draws its own dropout masks
    if not distributed.is_main():
        return
    state = {"format": CHECKPOINT_FORMAT, "step": step, "params": params, "optim": optim_state,
             "sched": sched.state_dict(), "rng": rng, "losses": result.losses,
             "lrs": result.lrs, "tokens": result.trained_tokens}
    # Written through Python, so a full disk is an OSError naming the checkpoint and its size.
    with atomic_path(path, durable=True, size=_tensor_bytes(state)) as tmp, open(tmp, "wb") as fh:
        torch.save(state, fh)


def _tensor_bytes(state) -> int:
    """The bytes of the tensors in a (nested) state: about what saving it writes."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(_tensor_bytes(v) for v in state.values())
    if isinstance(state, list | tuple):
        return sum(_tensor_bytes(v) for v in state)
    return 0


def _load_checkpoint(path: Path, owner, optim, sched, result: TrainResult, device: str) -> int:
    """Restore a checkpoint in every process; the step to go on from (0: none usable)."""
    # Tensors and plain values only: a checkpoint under results/ is data, never code.
    state = torch.load(path, weights_only=True)
    if state.get("format") != CHECKPOINT_FORMAT:
        log(f"{path}: checkpoint from an older hydrabench, starting over")
        return 0
    set_state_dict(owner, optim, model_state_dict=state["params"],
                   optim_state_dict=state["optim"],
                   options=StateDictOptions(full_state_dict=True, strict=False))
    sched.load_state_dict(state["sched"])
    rank, processes = distributed.world()
    # The same process count resumes every process's own random stream, hence the same run.
    rng = state["rng"][rank] if len(state["rng"]) == processes else state["rng"][0]
    _restore_rng(rng, device)
    result.losses, result.lrs = state["losses"], state["lrs"]
    result.trained_tokens = state["tokens"]
    result.resumed_from_step = state["step"]
    return state["step"]


def train(model: torch.nn.Module, tokenizer, records: Sequence[InstructionRecord],
          settings: TrainSettings, *, seed: int, template: str, device: str = "cpu",
          checkpoint_path: Path | None = None, on_step: StepHook | None = None,
          step_callback: StepCallback | None = None, loss_fn: LossFn | None = None,
          desc: str = "training") -> TrainResult:
    """Train the parameters of `model` that require grad; resume from `checkpoint_path` if any."""
    torch.manual_seed(seed)
    encoded = [encode_record(tokenizer, r, template, settings.seq_len) for r in records]
    batches = batch_schedule(len(encoded), settings, seed)
    total_steps = optimizer_steps(len(encoded), settings)
    rank, processes = distributed.world()
    if any(len(b) < processes for b in batches):
        raise SpecError(f"a micro-batch of the schedule has fewer examples than the "
                        f"{processes} processes; use a batch size that divides the data")
    model.to(device).train()
    forward, owner = distributed.prepare(model, settings.sharding)
    params = list(_trainable(owner).values())
    optim = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_lambda(settings, total_steps))
    result = TrainResult(processes=processes, strategy=distributed.strategy(settings.sharding))
    start = 0
    if checkpoint_path is not None and distributed.is_main():
        # A killed process's half-written checkpoint: this process holds the train lock.
        remove_stale_temps(checkpoint_path, every=True)
    if checkpoint_path is not None and checkpoint_path.exists():
        start = _load_checkpoint(checkpoint_path, owner, optim, sched, result, device)
    steps = report_progress(range(start, total_steps), desc, total=total_steps, initial=start)
    for step in steps:
        micro = batches[step * settings.grad_accum: (step + 1) * settings.grad_accum]
        n_tokens = sum(sum(1 for t in encoded[i][1] if t != IGNORE_INDEX) for b in micro for i in b)
        step_loss = 0.0
        for indices in micro:
            local = indices[rank::processes]  # this process's slice of the micro-batch
            batch = collate([encoded[i] for i in local], tokenizer.pad_token_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            local_tokens = int((batch["labels"] != IGNORE_INDEX).sum())
            micro_tokens = distributed.all_sum(local_tokens)
            try:
                raw = loss_fn(forward, batch) if loss_fn else forward(**batch).loss
                # DDP averages gradients over processes; this weight turns that average into
                # the token-mean loss of the whole micro-batch (weight 1 in one process).
                weight = local_tokens * processes / micro_tokens / len(micro)
                (raw * weight).backward()
            except torch.OutOfMemoryError:
                raise TrainingOutOfMemory(
                    f"out of memory at step {step} with batch size {len(local)} × "
                    f"{batch['input_ids'].shape[1]} tokens; lower --batch-size (raising "
                    f"grad_accum keeps the effective batch) or --seq-len") from None
            step_loss += distributed.all_sum(raw.item() * local_tokens) / micro_tokens / len(micro)
        if not math.isfinite(step_loss):
            raise TrainingDiverged(f"training loss became {step_loss} at step {step + 1} "
                                   f"(lr {settings.lr}); lower --lr or --alpha")
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        lr = sched.get_last_lr()[0]  # the one this step takes
        optim.step()
        sched.step()
        if step_callback is not None:
            step_callback(owner, step)
        optim.zero_grad(set_to_none=True)
        result.losses.append(step_loss)
        result.lrs.append(lr)
        result.trained_tokens += n_tokens
        steps.set_postfix(loss=f"{step_loss:.3f}")
        if on_step is not None:
            on_step(n_tokens, sum(len(b) for b in micro))
        if checkpoint_path is not None and (step + 1) % settings.checkpoint_every == 0:
            _save_checkpoint(checkpoint_path, owner, optim, sched, step + 1, result, device)
    if owner is not model:  # trained sharded: rank 0's full copy takes the trained weights
        distributed.gather_into(owner, model)
    distributed.settle()  # the other ranks leave now: nothing of theirs in flight
    model.eval()
    result.steps = total_steps
    return result
