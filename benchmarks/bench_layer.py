"""Forward+backward time and peak memory of ONE adapted projection, per adapter implementation.

Variants, all wrapping the same frozen ``nn.Linear`` (input requires grad, as inside a network):
frozen linear alone (no adapter), peft LoRA r=8 and r=32, hydrabench's ``HydraLoraLinear``
(r=8, N=4), the same layer with one A per head (LoRAMoE's structure, ``shared_a=False``) and
``ReferenceHydraLoraLinear``, the baseline written the way the HydraLoRA authors' code computes
it. Shapes: LLaMA-2-7B's 4096->4096 projection and the tiny model's 128->128.

Headline (at the 7B shape, largest token count): ``hydra_over_lora_r8`` (time ratio, target
<= 1.15) and ``reference_over_hydra`` (target >= 2 at N=4); ``loramoe_over_hydra`` is what the
shared A saves. The ``*_adapter_only`` figures
subtract the frozen linear's time, i.e. compare only what each adapter adds; the ``GEMM FLOPs``
columns give the ratio that matmul arithmetic alone predicts, so that time beyond it shows up
as overhead. When HydraLoRA misses its target at some shape, it is profiled there and the top
operators are reported. Default mode (2048-8192 tokens) takes about 20 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from _common import finish, parse_args, peak_memory_mib, print_table, ratio, time_interleaved
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.profiler import ProfilerActivity, profile

from hydrabench.methods.hydralora_layer import HydraLoraLinear

# The paper's adapter settings (reference scripts): r 8, alpha 32, dropout 0.05, 4 heads.
R = 8
ALPHA = 32.0
DROPOUT = 0.05
NUM_HEADS = 4
HYDRA_OVER_LORA_TARGET = 1.15
REFERENCE_OVER_HYDRA_TARGET = 2.0

LLAMA7B = ("llama2-7b 4096->4096", 4096, 4096)
TINY = ("tiny 128->128", 128, 128)


class ReferenceHydraLoraLinear(nn.Module):
    """BASELINE being compared against: HydraLoRA as the authors' reference code computes it.

    Same maths as ``HydraLoraLinear``, but for every head the shared ``A`` (and its dropout)
    is applied again and the heads are summed one by one in a Python loop, each adding a
    gate-weighted ``[tokens, out]`` term to the result. Router logits are in the model dtype,
    their softmax in float32.
    """

    def __init__(self, base: nn.Linear, r: int, num_heads: int, alpha: float,
                 dropout: float) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Linear(base.in_features, r, bias=False, **factory)
        self.lora_B = nn.ModuleList(
            nn.Linear(r, base.out_features, bias=False, **factory) for _ in range(num_heads))
        self.router = nn.Linear(base.in_features, num_heads, bias=False, **factory)
        self.dropout = nn.Dropout(dropout)
        self.scaling = alpha / r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        gate = torch.softmax(self.router(x), dim=-1, dtype=torch.float32).to(result.dtype)
        for i, head in enumerate(self.lora_B):
            result = result + gate[..., i:i + 1] * head(self.lora_A(self.dropout(x))) * self.scaling
        return result


class PerHeadDropoutHydraLoraLinear(HydraLoraLinear):
    """``HydraLoraLinear`` drawing a separate dropout mask per head, as the reference code does
    (it calls ``lora_dropout(x)`` once per head): A·dropout_i(x) for every head i, one GEMM over
    the N independently masked copies of x. Measures what matching the reference's masks costs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        x = x.to(self.lora_A.weight.dtype)
        copies = x.unsqueeze(-2).expand(*x.shape[:-1], self.num_heads, x.shape[-1])
        low_rank = self.lora_A(self.dropout(copies))  # [..., N, r]: one mask per head
        weights = (self.compute_gate(x) * self.scaling).to(low_rank.dtype)
        mixed = (weights.unsqueeze(-1) * low_rank).flatten(-2)
        b_cat = self.lora_B.permute(1, 0, 2).reshape(self.out_features, -1)
        return result + F.linear(mixed, b_cat).to(result.dtype)


class _Holder(nn.Module):
    """A one-layer module for peft to find its target ``proj`` in."""

    def __init__(self, proj: nn.Linear) -> None:
        super().__init__()
        self.proj = proj


def peft_lora(base: nn.Linear, r: int) -> nn.Module:
    """peft's own LoRA layer (``peft.tuners.lora.Linear``) around ``base``."""
    config = LoraConfig(r=r, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=["proj"])
    return get_peft_model(_Holder(base), config).base_model.model.proj


@dataclass(frozen=True)
class Variant:
    name: str
    build: Callable[[nn.Linear], nn.Module]  # wraps the shared frozen base
    # (in, out) of every trainable matmul one call makes, for the GEMM FLOP count.
    gemms: Callable[[int, int], list[tuple[int, int]]]


VARIANTS = [
    Variant("frozen linear", lambda base: base, lambda i, o: []),
    Variant("lora r=8", lambda base: peft_lora(base, R), lambda i, o: [(i, R), (R, o)]),
    Variant("lora r=32", lambda base: peft_lora(base, 32), lambda i, o: [(i, 32), (32, o)]),
    Variant("hydralora r=8 N=4",
            lambda base: HydraLoraLinear(base, R, NUM_HEADS, ALPHA, DROPOUT),
            lambda i, o: [(i, R), (i, NUM_HEADS), (NUM_HEADS * R, o)]),
    # LoRAMoE's structure: the same layer with one A per head (shared_a=False).
    Variant("loramoe r=8 N=4",
            lambda base: HydraLoraLinear(base, R, NUM_HEADS, ALPHA, DROPOUT, shared_a=False),
            lambda i, o: [(i, NUM_HEADS * R), (i, NUM_HEADS), (NUM_HEADS * R, o)]),
    # HydraLoRA with the reference's per-head dropout masks (N masked copies of x through A).
    Variant("hydralora per-head dropout",
            lambda base: PerHeadDropoutHydraLoraLinear(base, R, NUM_HEADS, ALPHA, DROPOUT),
            lambda i, o: [(i, R)] * NUM_HEADS + [(i, NUM_HEADS), (NUM_HEADS * R, o)]),
    Variant("reference r=8 N=4",
            lambda base: ReferenceHydraLoraLinear(base, R, NUM_HEADS, ALPHA, DROPOUT),
            lambda i, o: [(i, NUM_HEADS)] + [(i, R), (R, o)] * NUM_HEADS),
]


def gemm_flops(variant: Variant, fan_in: int, fan_out: int, tokens: int) -> int:
    """Matmul FLOPs of one forward+backward: the frozen base costs its forward and the input
    gradient (2 x 2·T·in·out), each trainable matmul also its weight gradient (3 x 2·T·k·n).
    Element-wise work is not counted: where time grows faster than this, it is the cause."""
    trainable = sum(k * n for k, n in variant.gemms(fan_in, fan_out))
    return 2 * tokens * (2 * fan_in * fan_out + 3 * trainable)


def fwd_bwd(layer: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> Callable[[], None]:
    """One training forward+backward through ``layer``; gradients reset so they never accumulate."""
    leaves = [x, *(p for p in layer.parameters() if p.requires_grad)]

    def step() -> None:
        for leaf in leaves:
            leaf.grad = None
        layer(x).backward(grad_out)

    return step


def top_operators(fn: Callable[[], None], device: str, limit: int = 10) -> list[dict[str, Any]]:
    """Operators taking the most self time over a few calls of ``fn`` (printed and returned)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(5):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
    attr = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    averages = prof.key_averages()
    print(averages.table(sort_by=attr, row_limit=limit))
    total = sum(getattr(e, attr) for e in averages) or 1.0
    ranked = sorted(averages, key=lambda e: getattr(e, attr), reverse=True)[:limit]
    return [{"op": e.key, "calls": e.count, "self_share": round(getattr(e, attr) / total, 3)}
            for e in ranked]


def overhead_ratio(times: dict[str, float], variant: str, reference: str) -> float | None:
    """Ratio of what two variants add to the frozen linear's time; None when either addition
    is not above zero, i.e. lost in the timing noise (common at 7B shapes on a busy CPU)."""
    added, added_ref = (times[v] - times["frozen linear"] for v in (variant, reference))
    return ratio(added, added_ref) if added > 0 and added_ref > 0 else None


def bench_shape(label: str, fan_in: int, fan_out: int, tokens: int, args: argparse.Namespace,
                dtype: torch.dtype) -> tuple[dict[str, Any], dict[str, Callable[[], None]]]:
    """Time every variant at one shape; returns the table row and the step functions."""
    torch.manual_seed(0)
    base = nn.Linear(fan_in, fan_out, bias=False, device=args.device,
                     dtype=dtype).requires_grad_(False)
    x = torch.randn(tokens, fan_in, device=args.device, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(tokens, fan_out, device=args.device, dtype=dtype)
    steps = {}
    for variant in VARIANTS:
        layer = variant.build(base)
        layer.train()  # as in fine-tuning: adapter dropout active
        steps[variant.name] = fwd_bwd(layer, x, grad_out)
    # Short windows, many rounds (see time_interleaved); a 7B-shape call alone takes ~50 ms+.
    min_run_time = 0.1 if fan_in * tokens < 2**22 else 0.25
    timings = time_interleaved(steps, rounds=args.rounds, min_run_time=min_run_time)
    times = {name: t.seconds for name, t in timings.items()}
    flops = {v.name: gemm_flops(v, fan_in, fan_out, tokens) for v in VARIANTS}
    lora8, hydra, ref = "lora r=8", "hydralora r=8 N=4", "reference r=8 N=4"
    moe, per_head = "loramoe r=8 N=4", "hydralora per-head dropout"
    row: dict[str, Any] = {"shape": label, "tokens": tokens}
    row |= {f"{name} ms": seconds * 1e3 for name, seconds in times.items()}
    row |= {f"{name} MiB": peak_memory_mib(step) for name, step in steps.items()}
    row |= {
        "hydra/lora8": ratio(times[hydra], times[lora8]),
        "ref/hydra": ratio(times[ref], times[hydra]),
        "moe/hydra": ratio(times[moe], times[hydra]),
        "per-head-dropout/hydra": ratio(times[per_head], times[hydra]),
        "per-head-dropout/hydra adapter-only": overhead_ratio(times, per_head, hydra),
        "hydra/lora8 adapter-only": overhead_ratio(times, hydra, lora8),
        "ref/hydra adapter-only": overhead_ratio(times, ref, hydra),
        "hydra/lora8 GEMM FLOPs": ratio(flops[hydra], flops[lora8]),
        "ref/hydra GEMM FLOPs": ratio(flops[ref], flops[hydra]),
        "moe/hydra GEMM FLOPs": ratio(flops[moe], flops[hydra]),
        "max spread": round(max(t.spread for t in timings.values()), 3),
    }
    return row, steps


def main() -> None:
    def options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--tokens", type=int, nargs="+", default=None,
                            help="token counts at the 7B shape (default 2048 4096 8192; quick: "
                                 "256 on CPU, 2048 on CUDA)")

    args = parse_args(__doc__.splitlines()[0], (6, 12), options)
    # bf16 as in the paper's GPU training; CPU matmuls are fastest (and most common) in fp32.
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    if args.tokens is None:
        quick_tokens = [2048] if args.device == "cuda" else [256]
        args.tokens = quick_tokens if args.quick else [2048, 4096, 8192]
    cases = [(*LLAMA7B, t) for t in args.tokens] + [(*TINY, 1024)]  # tiny: batch 8 x seq 128
    if not args.quick:
        cases.append((*TINY, 8192))

    rows, steps_at = [], {}
    for label, fan_in, fan_out, tokens in cases:
        print(f"timing {label}, {tokens} tokens ...", flush=True)
        row, steps = bench_shape(label, fan_in, fan_out, tokens, args, dtype)
        rows.append(row)
        steps_at[(label, tokens)] = steps
    time_cols = ["shape", "tokens", *(k for k in rows[0] if k.endswith(" ms"))]
    print_table(f"forward+backward of one projection, ms per call ({args.device}, {dtype})",
                [{k: r[k] for k in time_cols} for r in rows])
    ratio_cols = ["shape", "tokens", "hydra/lora8", "ref/hydra", "moe/hydra",
                  "per-head-dropout/hydra", "per-head-dropout/hydra adapter-only",
                  "hydra/lora8 adapter-only", "ref/hydra adapter-only", "hydra/lora8 GEMM FLOPs",
                  "ref/hydra GEMM FLOPs", "moe/hydra GEMM FLOPs", "max spread"]
    print_table("ratios (time / time)", [{k: r[k] for k in ratio_cols} for r in rows])
    if args.device == "cuda":
        mem_cols = ["shape", "tokens", *(k for k in rows[0] if k.endswith(" MiB"))]
        print_table("peak memory added by one call, MiB", [{k: r[k] for k in mem_cols}
                                                           for r in rows])
    else:
        print("\npeak memory: n/a on CPU (no per-call allocator peak)")

    profiled = None
    worst = max(rows, key=lambda r: r["hydra/lora8"])
    if worst["hydra/lora8"] > HYDRA_OVER_LORA_TARGET:
        print(f"\nHydraLoRA misses hydra/lora8 <= {HYDRA_OVER_LORA_TARGET} at {worst['shape']}, "
              f"{worst['tokens']} tokens ({worst['hydra/lora8']}): profiling it there")
        step = steps_at[(worst["shape"], worst["tokens"])]["hydralora r=8 N=4"]
        profiled = {"shape": worst["shape"], "tokens": worst["tokens"],
                    "top_operators": top_operators(step, args.device)}
        print(f"matmul FLOPs alone predict hydra/lora8 = {worst['hydra/lora8 GEMM FLOPs']} there "
              f"(the N*r-wide B and the router are extra arithmetic, not overhead)")

    head = next(r for r in reversed(rows) if r["shape"] == LLAMA7B[0])
    tiny = next(r for r in rows if r["shape"] == TINY[0])
    headline = {
        "hydra_over_lora_r8": head["hydra/lora8"],
        "reference_over_hydra": head["ref/hydra"],
        "hydra_over_lora_r8_adapter_only": head["hydra/lora8 adapter-only"],
        "reference_over_hydra_adapter_only": head["ref/hydra adapter-only"],
        "loramoe_over_hydra": head["moe/hydra"],  # the price of N A's instead of one shared
        # the price of the reference's separate dropout mask per head (hydralora docstring)
        "per_head_dropout_over_hydra": head["per-head-dropout/hydra"],
        "at": f"{head['shape']}, {head['tokens']} tokens",
        "tiny_hydra_over_lora_r8": tiny["hydra/lora8"],
        "tiny_reference_over_hydra": tiny["ref/hydra"],
        "targets_met": head["hydra/lora8"] <= HYDRA_OVER_LORA_TARGET
        and head["ref/hydra"] >= REFERENCE_OVER_HYDRA_TARGET,
        "device": args.device,
    }
    finish("bench_layer", headline, {"quick": args.quick, "dtype": str(dtype), "rows": rows,
                                     "hydralora_profile": profiled})


if __name__ == "__main__":
    main()
