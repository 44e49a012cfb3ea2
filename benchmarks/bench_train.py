"""Training throughput (tokens/s of full optimizer steps) per fine-tuning method.

Each method is built by hydrabench's own registry (``get_method(name).adapt``) from the tiny
profile's settings, so what is timed is what the harness trains. A step is the work of one
step of ``hydrabench.training.loop.train`` (forward with labels, backward, loss read-out, gradient
clipping, AdamW step, zero grad) on a fixed batch of full-length sequences. LoRA-Split 4x8
trains one of its four adapters at a time, so its step is timed with ``split_0`` active.

Models: the embedded tiny Llama (profile batch 8 x seq 128); on CUDA also a 1B-class Llama
(TinyLlama-1.1B shapes, random init, bf16, batch 4 x seq 1024) with model FLOPs utilisation.
Headline: ``hydra_over_lora_r32_tokens_per_s``, HydraLoRA's training speed over LoRA r=32's
(the paper's Fig. 5 says 1.96x on LLaMA-2-7B, 4x A40, end to end).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from _common import finish, parse_args, peak_memory_mib, print_table, ratio, time_interleaved
from transformers import AutoModelForCausalLM, LlamaConfig

from hydrabench.config.spec import RunSpec
from hydrabench.methods import get_method
from hydrabench.models import load_base_model
from hydrabench.pipeline.resolve import resolve_spec

# (row label, registry name, adapter overrides on top of the tiny profile)
METHODS: list[tuple[str, str, dict[str, Any]]] = [
    ("lora r=8", "lora", {"rank": 8}),
    ("lora r=32", "lora", {"rank": 32}),
    ("lora-split 4x8", "lora-split", {"rank": 8, "num_splits": 4}),
    ("hydralora r=8 N=4", "hydralora", {"rank": 8, "num_heads": 4}),
    ("full FT", "full", {}),
]
PAPER_HYDRA_OVER_LORA_R32 = 1.96
# Dense bf16 peak of known GPUs (vendor datasheets, without sparsity), for MFU.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A40": 150e12}
# TinyLlama-1.1B's architecture: a 1B-class Llama that needs no download.
LLAMA_1B = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                       num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                       max_position_embeddings=2048, tie_word_embeddings=False)


@dataclass(frozen=True)
class Workload:
    name: str
    build: Callable[[], torch.nn.Module]  # a fresh base model on the target device
    batch_size: int
    seq_len: int
    mfu: bool = False  # only where the model runs in the dtype PEAK_BF16_FLOPS is quoted for


def method_spec(method: str, adapter: dict[str, Any]) -> RunSpec:
    return resolve_spec(method, "general", profile="tiny", overrides={"adapter": adapter})


def train_step(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    """One optimizer step as hydrabench.training.loop.train does it (grad_accum 1; the LR schedule,
    a scalar update, left out)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=2e-4)

    def step() -> None:
        loss = model(**batch).loss
        loss.backward()
        loss.item()  # the loop logs every step's loss, which waits for the GPU each step
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        optim.zero_grad(set_to_none=True)

    return step


def flops_per_token(base: torch.nn.Module, seq_len: int, full: bool) -> float:
    """Model FLOPs per trained token: 6N (full) or 4N (frozen weights: no weight gradients),
    N the weights of all matmuls, plus 12 * layers * hidden * seq for attention (PaLM, App. B).
    """
    n_matmul = sum(m.weight.numel() for m in base.modules() if isinstance(m, torch.nn.Linear))
    config = base.config
    attention = 12 * config.num_hidden_layers * config.hidden_size * seq_len
    return (6 if full else 4) * n_matmul + attention


def peak_flops(override_tflops: float | None) -> float | None:
    if override_tflops is not None:
        return override_tflops * 1e12
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


def bench_workload(work: Workload, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Time a training step of every method on one model; one table row per method."""
    gen = torch.Generator().manual_seed(0)
    steps, rows = {}, {}
    for label, method, adapter in METHODS:
        base = work.build()
        ids = torch.randint(0, base.config.vocab_size, (work.batch_size, work.seq_len),
                            generator=gen).to(args.device)
        batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
        flops = flops_per_token(base, work.seq_len, full=method == "full")
        model = get_method(method).adapt(base, method_spec(method, adapter), [])
        model.train()
        steps[label] = train_step(model, batch)
        rows[label] = {"model": work.name, "method": label,
                       "trainable params": sum(p.numel() for p in model.parameters()
                                               if p.requires_grad),
                       "flops_per_token": flops}
    # Short windows, many rounds (see time_interleaved); a 1B step alone can take ~0.5 s.
    min_run_time = 1.0 if work.seq_len * work.batch_size > 4096 else 0.25
    times = time_interleaved(steps, rounds=args.rounds, min_run_time=min_run_time)
    peak = peak_flops(args.peak_tflops) if work.mfu and args.device == "cuda" else None
    tokens = work.batch_size * work.seq_len
    for label, row in rows.items():
        tps = tokens / times[label].seconds
        row |= {"step ms": times[label].ms, "tokens/s": tps,
                "MFU": row["flops_per_token"] * tps / peak if peak else None,
                "peak MiB": peak_memory_mib(steps[label]),
                "spread": round(times[label].spread, 3)}
    return list(rows.values())


def main() -> None:
    def options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--peak-tflops", type=float, default=None,
                            help="accelerator peak (dense bf16) for MFU; default: known GPUs")

    args = parse_args(__doc__.splitlines()[0], (6, 12), options)
    tiny_spec = method_spec("lora", {})
    workloads = [Workload("tiny", lambda: load_base_model(tiny_spec.model, "float32",
                                                          args.device).model,
                          tiny_spec.train.batch_size, tiny_spec.train.seq_len)]
    if args.device == "cuda":
        def llama_1b() -> torch.nn.Module:
            torch.manual_seed(0)
            with torch.device(args.device):
                return AutoModelForCausalLM.from_config(LLAMA_1B, dtype=torch.bfloat16)

        workloads.append(Workload("llama-1.1B (random)", llama_1b, 4, 1024, mfu=True))

    headline: dict[str, Any] = {}
    all_rows = []
    for work in workloads:
        print(f"timing training steps on {work.name} ({work.batch_size} x {work.seq_len}) ...",
              flush=True)
        rows = bench_workload(work, args)
        all_rows += rows
        tps = {r["method"]: r["tokens/s"] for r in rows}
        prefix = "" if work.name == "tiny" else "llama1b_"
        headline |= {
            f"{prefix}hydra_over_lora_r32_tokens_per_s":
                ratio(tps["hydralora r=8 N=4"], tps["lora r=32"]),
            f"{prefix}hydra_over_lora_r8_tokens_per_s":
                ratio(tps["hydralora r=8 N=4"], tps["lora r=8"]),
            f"{prefix}hydra_tokens_per_s": round(tps["hydralora r=8 N=4"]),
        }
        hydra_mfu = next(r["MFU"] for r in rows if r["method"] == "hydralora r=8 N=4")
        if hydra_mfu is not None:
            headline[f"{prefix}hydra_mfu"] = round(hydra_mfu, 3)
    columns = ["model", "method", "trainable params", "step ms", "tokens/s", "spread"]
    if args.device == "cuda":
        columns += ["MFU", "peak MiB"]
    print_table(f"training step throughput ({args.device})",
                [{k: r[k] for k in columns} for r in all_rows])
    print(f"\nhydralora r=8 N=4 / lora r=32 tokens/s: "
          f"{headline['hydra_over_lora_r32_tokens_per_s']} on the tiny model "
          f"(paper Fig. 5: {PAPER_HYDRA_OVER_LORA_R32}x, LLaMA-2-7B on 4x A40)")
    headline["device"] = args.device
    finish("bench_train", headline, {"quick": args.quick, "rows": all_rows})


if __name__ == "__main__":
    main()
