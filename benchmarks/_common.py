"""Helpers shared by the benchmark scripts: arguments, timing, tables and the JSON report.

Every script prints a table and, as its last stdout line, one JSON object with its headline
figures; the same object plus the machine description (``hardware_summary()``), the torch thread
count and how many cores other processes kept busy meanwhile goes, written atomically, to
``reports/bench/<name>.json`` (under HYDRABENCH_REPORTS where set).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The benchmarks only use local files (the cached tiny model, the synthetic suite); offline mode
# makes an accidental hub lookup fail at once instead of retrying. Set before transformers loads.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from tabulate import tabulate
from torch.utils.benchmark import Timer

from hydrabench.atomic import write_json_atomic
from hydrabench.paths import reports_root
from hydrabench.training.metering import hardware_summary

REPORT_DIR = reports_root().resolve() / "bench"  # HYDRABENCH_REPORTS, as hydrabench's reports


def _cpu_snapshot() -> tuple[float, float, float] | None:
    """(wall, machine busy CPU-seconds, this process's and its children's CPU-seconds); None
    where there is no /proc/stat."""
    try:
        first = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, first[1:9])
    busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    own = sum(u.ru_utime + u.ru_stime for u in usage)
    return time.monotonic(), busy, own


# Taken when a benchmark script starts, to tell how much CPU other processes used meanwhile.
_START = _cpu_snapshot()


def other_cores_busy() -> float | None:
    """Mean number of cores that other processes (or the hypervisor) kept busy since the start.

    The load average cannot say this: it counts this benchmark's own threads too.
    """
    end = _cpu_snapshot()
    if _START is None or end is None or end[0] <= _START[0]:
        return None
    return max(0.0, ((end[1] - _START[1]) - (end[2] - _START[2])) / (end[0] - _START[0]))


class LoadWindow:
    """Cores other processes kept busy from its creation on, like `other_cores_busy`, leaving
    out CPU seconds the caller accounts for itself (a server's processes, which this process
    does not reap, so their time would count as other processes' load)."""

    def __init__(self) -> None:
        self.start = _cpu_snapshot()

    def others(self, own_cpu_s: float = 0.0) -> float | None:
        end = _cpu_snapshot()
        if self.start is None or end is None or end[0] <= self.start[0]:
            return None
        busy = (end[1] - self.start[1]) - (end[2] - self.start[2]) - own_cpu_s
        return max(0.0, busy / (end[0] - self.start[0]))


def parse_args(description: str, rounds: tuple[int, int],
               add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
               ) -> argparse.Namespace:
    """The options every benchmark has (--quick, --device, --rounds) plus script-specific ones.

    ``rounds`` is the default number of measurement rounds as (quick, default mode).
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true",
                        help="small sizes, about a minute on a 2-core CPU")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    parser.add_argument("--rounds", type=int, default=None,
                        help=f"measurement rounds per variant (default: {rounds[1]}, "
                             f"quick: {rounds[0]})")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="CPU threads for torch (default: all cores); on a shared machine "
                             "1 is far steadier, since a multi-threaded op waits for every thread")
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.rounds is None:
        args.rounds = rounds[0] if args.quick else rounds[1]
    if args.rounds < 1 or args.threads < 1:
        parser.error("--rounds and --threads must be at least 1")
    return args


@dataclass(frozen=True)
class Timing:
    """Seconds per call in the fastest timed block, and how much slower the median block was."""

    seconds: float
    spread: float  # (median block - fastest block) / fastest block: a noise indicator

    @property
    def ms(self) -> float:
        return self.seconds * 1e3


def _cuda_active() -> bool:
    # Only an existing CUDA context is synchronised: a CPU run on a GPU machine creates none.
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def time_interleaved(fns: Mapping[str, Callable[[], object]], *, rounds: int,
                     min_run_time: float, warmup: int = 2) -> dict[str, Timing]:
    """Time each zero-argument callable with ``torch.utils.benchmark.Timer``.

    Variants are measured in many short interleaved rounds (A, B, C, A, B, C, ...), and each
    keeps its fastest block: on a shared 2-core machine other processes only ever add time
    (measured slow-downs of 2-100x during someone else's job), so the minimum is the least
    disturbed estimate, and interleaving gives every variant the same chances of a quiet
    spell. The Timer synchronises CUDA itself.
    """
    for fn in fns.values():
        for _ in range(warmup):  # first calls pay for allocator growth and kernel selection
            fn()
    if _cuda_active():
        torch.cuda.synchronize()
    blocks: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            # Timer defaults to one thread; measure with the threads the workload really uses.
            timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
            blocks[name] += timer.blocked_autorange(min_run_time=min_run_time).times
    return {name: Timing(min(t), statistics.median(t) / min(t) - 1) for name, t in blocks.items()}


def peak_memory_mib(fn: Callable[[], object]) -> float | None:
    """Peak CUDA memory one call of ``fn`` adds on top of what is already allocated; None on CPU.

    CPU has no per-call allocator peak that torch exposes cheaply, so CPU rows say "n/a".
    """
    if not _cuda_active():
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def ratio(numerator: float, denominator: float) -> float:
    return round(numerator / denominator, 3)


def _cell(value: Any) -> Any:
    """Four significant digits; large values as whole numbers rather than in e-notation."""
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return value


def print_table(title: str, rows: Sequence[Mapping[str, Any]]) -> None:
    shown = [{k: _cell(v) for k, v in row.items()} for row in rows]
    print(f"\n{title}")
    # Numbers are pre-formatted strings: keep tabulate from re-parsing them, align them right.
    print(tabulate(shown, headers="keys", missingval="n/a", disable_numparse=True,
                   stralign="right"))


def finish(name: str, headline: dict[str, Any], details: dict[str, Any],
           others: float | None = None) -> None:
    """Write ``reports/bench/<name>.json`` (headline + hardware + details) and print the headline.

    ``others``: cores other processes kept busy, when the caller measured it over a narrower
    span than the whole run (default: ``other_cores_busy()`` now). The headline JSON is printed
    last so that callers can take the final stdout line.
    """
    others = other_cores_busy() if others is None else others
    write_json_atomic(REPORT_DIR / f"{name}.json",
                      {**headline, "hardware": hardware_summary(),
                       "threads": torch.get_num_threads(), "other_processes_cores_busy": others,
                       "details": details})
    print(f"\nreport: {REPORT_DIR / f'{name}.json'}")
    if others is not None and others > 0.25:
        print(f"warning: other processes kept {others:.2f} of {os.cpu_count()} cores busy while "
              f"this ran: the figures are disturbed (see --threads)")
    print(json.dumps(headline), flush=True)
