"""Cost of the code sandbox per program (ms per run), and how it compares with the sandbox before.

Variants, timed in interleaved rounds (each keeps its fastest and its median run):

- ``python start-up``: the sandbox's interpreter running nothing (``python -I -S -c pass``),
  the floor under any per-program process;
- ``sandbox``: ``hydrabench.evaluation.sandbox.run_program`` on a one-function program and a
one-assert
  test: two bubblewrap sandboxes (the program and the judge), both interpreters, the pipes;
- ``sandbox, HumanEval/0``: ``check_completion`` with the canonical solution;
- ``old sandbox``: the sandbox as it was before the judge (one process under util-linux
  ``unshare``, which decided its own verdict), loaded from git: the parent of the commit that
  added ``hydrabench/evaluation/sandbox_child.py``. Skipped, with the reason, where git or that
  history is missing.

Then HumanEval's canonical solutions (all 164, ``--quick``: the first 24) scored the way lm-eval
scores them, as many runs at once as there are cores, by each sandbox: ms per program there is
wall time / programs (skipped, with the reason, without ``../shared/data``). The script opts in
to code execution for its own programs; where the sandbox cannot start it prints why and a JSON
line saying so, and measures nothing.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType

from _common import finish, parse_args, print_table, ratio

from hydrabench.evaluation import sandbox

REPO = Path(__file__).resolve().parents[1]
HUMANEVAL = REPO.parent / "shared" / "data" / "humaneval" / "HumanEval.jsonl.gz"
PROGRAM, TESTS = "def one():\n    return 1\n", "assert one() == 1\n"


def old_sandbox() -> tuple[ModuleType | None, str]:
    """The sandbox module before the judge, from git history; (None, why) where unavailable."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True,
                              check=True).stdout

    try:
        added = git("log", "--diff-filter=A", "--format=%H", "--",
                    "hydrabench/evaluation/sandbox_child.py").split()[-1]
        source = git("show", f"{added}^:hydrabench/evaluation/sandbox.py")
    except (OSError, subprocess.CalledProcessError, IndexError) as e:
        return None, f"old sandbox unavailable (needs git history): {e}"
    with tempfile.TemporaryDirectory(prefix="hydrabench-bench-") as folder:
        path = Path(folder, "old_sandbox.py")
        path.write_text(source, encoding="utf-8")
        spec = importlib.util.spec_from_file_location("old_sandbox", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
    return module, f"old sandbox: {added[:10]}^"


def time_rounds(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Seconds per call of each variant, over `rounds` interleaved rounds (after one warm-up)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def score_all(run_one: Callable[[tuple[str, str]], bool], runs: list[tuple[str, str]]
              ) -> tuple[float, int]:
    """(seconds, passed) for all runs, as many at once as there are cores (as code_eval does)."""
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        passed = sum(pool.map(run_one, runs))
    return time.perf_counter() - start, passed


def main() -> None:
    args = parse_args(__doc__.split("\n", 1)[0], rounds=(8, 30))
    os.environ[sandbox.OPT_IN_ENV] = "1"  # the programs below are the benchmark's own
    if (unavailable := sandbox.unavailable_reason()) is not None:
        print(unavailable)
        print(json.dumps({"skipped": unavailable}))
        return
    command = sandbox.walls().command
    python = command[command.index("-I") - 1]
    old, old_note = old_sandbox()
    print(old_note)
    problems = []
    if HUMANEVAL.is_file():
        with gzip.open(HUMANEVAL, "rt", encoding="utf-8") as f:
            problems = [json.loads(line) for line in f][:24 if args.quick else None]
    else:
        print(f"HumanEval rows skipped: {HUMANEVAL} not found")

    fns: dict[str, Callable[[], object]] = {
        "python start-up": lambda: subprocess.run([python, "-I", "-S", "-c", "pass"], check=True),
        "sandbox": lambda: sandbox.run_program(PROGRAM, TESTS),
    }
    if problems:
        fns["sandbox, HumanEval/0"] = lambda: sandbox.check_completion(
            problems[0], problems[0]["canonical_solution"])
    if old is not None:
        fns["old sandbox"] = lambda: old.run_program(PROGRAM + TESTS)
    times = time_rounds(fns, args.rounds)

    runs = [(p["prompt"] + p["canonical_solution"], f"{p['test']}\ncheck({p['entry_point']})\n")
            for p in problems]
    scored = {}
    if runs:
        scored["sandbox"] = score_all(lambda r: sandbox.run_program(*r, timeout_s=3.0).passed,
                                      runs)
    if runs and old is not None:
        scored["old sandbox"] = score_all(
            lambda r: old.run_program(r[0] + "\n" + r[1], timeout_s=3.0).passed, runs)

    rows = [{"variant": name, "fastest ms": min(t) * 1e3,
             "median ms": statistics.median(t) * 1e3} for name, t in times.items()]
    print_table(f"one run at a time ({args.rounds} rounds)", rows)
    pool_rows = [{"sandbox": name, "programs": len(runs), "passed": passed,
                  "ms per program": seconds / len(runs) * 1e3}
                 for name, (seconds, passed) in scored.items()]
    print_table(f"HumanEval canonical solutions, {os.cpu_count()} at once", pool_rows)

    best = {name: min(t) * 1e3 for name, t in times.items()}
    per_program = {name: round(seconds / len(runs) * 1e3, 1)
                   for name, (seconds, _) in scored.items()}
    headline = {
        "sandbox_ms": round(best["sandbox"], 1),
        "old_sandbox_ms": round(best["old sandbox"], 1) if old is not None else None,
        "sandbox_over_old": ratio(best["sandbox"], best["old sandbox"]) if old else None,
        "python_startup_ms": round(best["python start-up"], 1),
        "humaneval_ms_per_program": per_program.get("sandbox"),
        "old_humaneval_ms_per_program": per_program.get("old sandbox"),
        "all_canonical_passed": all(passed == len(runs) for _, passed in scored.values()),
    }
    details = {"quick": args.quick, "rounds": args.rounds, "old": old_note,
               "python": python, "rows": rows, "pool_rows": pool_rows}
    finish("bench_sandbox", headline, details)
    sys.exit(0 if headline["all_canonical_passed"] else 1)


if __name__ == "__main__":
    main()
