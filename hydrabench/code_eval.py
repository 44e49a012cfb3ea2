"""lm-eval functions of the code-generation tasks: tasks/offline/humaneval and tasks/tiny/tiny_code.

They replace lm-eval's built-in humaneval `utils.py`, whose metric is HF evaluate's `code_eval`
(downloaded from the hub when the task loads, so unusable offline), with the same interface and
the same scoring: each sample is `prompt + completion` (the `build_predictions` filter), the test
program is that sample, a newline and the target (`{{test}}\\ncheck({{entry_point}})`), a sample
passes when that program runs to its end within 3 s (code_eval's default timeout), and pass@k is
the unbiased estimator over a doc's samples. Samples run in `hydrabench.evaluation.sandbox`, which
refuses
to run anything unless the user opted in (HF_ALLOW_CODE_EVAL=1) and where the sandbox's walls
cannot be put up; it runs the target apart from the sample, in a judge that calls the sample's
functions, so that a sample cannot decide its own verdict (see its docstring).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from statistics import mean

from hydrabench.evaluation import sandbox

# HF evaluate's code_eval default, which the built-in humaneval task uses.
TIMEOUT_S = 3.0


def build_predictions(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """The built-in humaneval filter: prepend the prompt to every sample."""
    return [[doc["prompt"] + r for r in resp] for resp, doc in zip(resps, docs, strict=True)]


def build_predictions_instruct(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """The built-in humaneval_instruct filter: as build_predictions, cut at the first ```."""
    return [
        [doc["prompt"] + r.split("```", 1)[0] for r in resp]
        for resp, doc in zip(resps, docs, strict=True)
    ]


def pass_at_k(
    references: list[str], predictions: list[list[str]], k: int | list[int]
) -> dict[str, float]:
    """lm-eval metric: {"pass@K": mean over docs} for each K no larger than every doc's samples.

    references[i] is doc i's test code and predictions[i] its samples (code_eval's interface).
    """
    sandbox.require_opt_in()  # before anything else: no opt-in, no work
    sandbox.walls()  # nor without the sandbox
    ks = [k] if isinstance(k, int) else list(k)
    runs = [
        (sample, test)
        for test, samples in zip(references, predictions, strict=True)
        for sample in samples
    ]
    # The runs are independent child processes: run as many at once as there are cores.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        passed = list(pool.map(
            lambda run: sandbox.run_program(*run, timeout_s=TIMEOUT_S).passed, runs))
    verdicts = iter(passed)
    counts = [(len(samples), sum(next(verdicts) for _ in samples)) for samples in predictions]
    return {
        f"pass@{kk}": mean(sandbox.pass_at_k(n, c, kk) for n, c in counts)
        for kk in ks
        if all(n >= kk for n, _ in counts)
    }
