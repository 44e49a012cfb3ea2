"""`hydrabench protocols`: one model's MMLU under the protocols people report it with.

The paper's 38.88 for LLaMA-2-7B is zero-shot by its maintainers' word, Meta's 45.3 is
five-shot, OpenCompass's 46.78 five-shot read by perplexity: one model, three numbers. This scores
a model (or a run's artifact) under each protocol (lm-eval task YAML in
tasks/offline/mmlu_protocols over the local copies, tasks/hub/mmlu_protocols over the hub's
cais/mmlu: lm-eval's letter log-likelihood zero- and five-shot, OpenCompass's mmlu_ppl_ac766d
perplexity reading zero- and five-shot), on the same items, and writes one table:
every protocol's score with its 95% interval, the paired differences between protocols, and the
published LLaMA-2-7B figures beside them, marked as external.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hydrabench.errors import SpecError, did_you_mean
from hydrabench.evaluation.harness import read_samples
from hydrabench.evaluation.significance import PairedComparison, format_p, paired_comparison
from hydrabench.paths import (
    TASKS_DIR,
    data_dir,
    hub_datasets_offline,
    offline_mode,
    reports_root,
    slug,
)
from hydrabench.records.store import RunStore, checked_run_id

HUB_MMLU = "cais/mmlu"  # what lm-eval's built-in mmlu and tasks/hub/mmlu_protocols read
Z95 = 1.959963984540054  # the normal quantile of a two-sided 95% interval


@dataclass(frozen=True)
class Protocol:
    name: str  # what --protocols takes
    task: str  # the lm-eval group in tasks/{offline,hub}/mmlu_protocols
    label: str
    reading: str


PROTOCOLS = {p.name: p for p in (
    Protocol("lm-eval-0shot", "mmlu_lm_eval_0shot", "lm-eval, zero-shot",
             "log-likelihood of the answer letter after \"Answer:\"; most likely wins"),
    Protocol("lm-eval-5shot", "mmlu_lm_eval_5shot", "lm-eval, five-shot",
             "as zero-shot, after the subject's first five dev items"),
    Protocol("opencompass-ppl-0shot", "mmlu_opencompass_ppl_0shot",
             "OpenCompass mmlu_ppl_ac766d, zero-shot (ZeroRetriever)",
             "perplexity of the whole prompt with each answer; lowest wins"),
    Protocol("opencompass-ppl-5shot", "mmlu_opencompass_ppl_5shot",
             "OpenCompass mmlu_ppl_ac766d, five-shot (FixKRetriever, dev items 0-4)",
             "as zero-shot, the five dev items in the prompt"),
)}
BENCHMARKS = ("mmlu",)


@dataclass(frozen=True)
class Anchor:
    """A published MMLU figure: not scored here, shown for what it is."""

    model: str
    protocol: str
    value: float
    source: str


LLAMA2_7B_ANCHORS = (
    Anchor("LLaMA-2-7B", "zero-shot, the reference code's OpenCompass set-up", 38.88,
           "HydraLoRA paper, Table 2 (Base); zero-shot per the maintainers, "
           "Clin0212/HydraLoRA#16"),
    Anchor("LLaMA-2-7B", "five-shot", 45.3, "Meta, Llama 2 paper (arXiv 2307.09288), Table 3"),
    Anchor("LLaMA-2-7B", "five-shot, OpenCompass PPL", 46.78, "OpenCompass's results table"),
    Anchor("LLaMA-2-7B", "zero-shot, a user's reproduction", 38.89, "Clin0212/HydraLoRA#10"),
    Anchor("LLaMA-2-7B + HydraLoRA (r=8, 3 B, Dolly-15k)",
           "OpenCompass v0.2.0 mmlu_ppl_ac766d, a user's reproduction of 47.22", 40.12,
           "Clin0212/HydraLoRA#35"),
)


@dataclass
class ProtocolScore:
    protocol: Protocol
    value: float  # percent, lm-eval's group score (subjects weighted by size)
    outcomes: dict[tuple[str, int], float]  # (subject task, doc_id) → acc

    @property
    def interval(self) -> tuple[float, float]:
        """value ± 1.96 standard errors over the items, clipped to 0-100."""
        stderr = 100 * float(np.std(list(self.outcomes.values()), ddof=1)) / np.sqrt(
            len(self.outcomes)) if len(self.outcomes) > 1 else 0.0
        return max(0.0, self.value - Z95 * stderr), min(100.0, self.value + Z95 * stderr)


def check_request(benchmark: str, names: list[str], limit: int | None) -> list[Protocol]:
    """The protocols asked for; a SpecError for anything that cannot run, before any work."""
    if benchmark not in BENCHMARKS:
        raise did_you_mean("benchmark", benchmark, list(BENCHMARKS))
    for name in names:
        if name not in PROTOCOLS:
            raise did_you_mean("protocol", name, list(PROTOCOLS))
    if limit is not None and limit < 1:
        raise SpecError(f"--limit must be >= 1, got {limit}")
    if data_dir() is None and (offline_mode() or hub_datasets_offline()):
        raise SpecError("the hub is switched off (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE): set "
                        "HYDRABENCH_DATA_DIR to local MMLU files (e.g. ../shared/data)")
    return [PROTOCOLS[name] for name in names]


def protocol_task_folders() -> list[Path]:
    """What lm-eval indexes for the protocol groups. Offline: tasks/offline (the local copies'
    mmlu and tasks/offline/mmlu_protocols); else tasks/hub/mmlu_protocols and lm-eval's built-in
    mmlu, which read cais/mmlu from the hub. Only these, not all of lm-eval's tasks (~10 s)."""
    if offline_mode():
        return [TASKS_DIR / "offline"]
    import lm_eval

    return [Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "default",
            TASKS_DIR / "hub" / "mmlu_protocols"]


def _load(model: str | None, run_id: str | None, store: RunStore, trust_remote_code: bool = False
          ) -> tuple[Any, Any, str, str]:
    """(model, tokenizer, the tokenizer's name or path, a label) of --model or --run; a model
    repository's code runs only with `trust_remote_code` (this command line's flag)."""
    from hydrabench.serving.export import load_base_or_export, loaded_run

    if model is not None:
        base = load_base_or_export(model, trust_remote_code=trust_remote_code)
        return base.model, base.tokenizer, str(base.directory or model), model
    spec, adapted, base = loaded_run(checked_run_id(run_id or ""), store, trust_remote_code)
    return adapted, base.tokenizer, str(base.directory or spec.model), f"run {run_id}"


@contextmanager
def templates_compiled_once() -> Iterator[None]:
    """lm-eval 0.4.13 compiles a prompt's Jinja template again at every render (its
    apply_template; EleutherAI/lm-evaluation-harness#1286), seven times per five-shot MMLU item:
    a tenth of the time on a small model. Compile each template once."""
    from lm_eval import utils

    utils.env.from_string = functools.cache(utils.env.from_string)
    try:
        yield
    finally:
        del utils.env.from_string  # the Environment's own method again


def score_protocols(protocols: list[Protocol], model: Any, tokenizer: Any, tokenizer_name: str,
                    limit: int | None, output_root: Path) -> list[ProtocolScore]:
    """Each protocol scored by lm-eval (per-sample outputs under output_root/<protocol>)."""
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from hydrabench.evaluation.harness import run_lm_eval

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=32)
    # The perplexity reading counts and truncates tokens as the scoring model does, and only in
    # the documents lm-eval scores (its limit): a five-shot prompt is thousands of tokens.
    manager = TaskManager(include_path=[str(p) for p in protocol_task_folders()],
                          include_defaults=False,
                          metadata={"tokenizer": tokenizer_name, "max_length": lm.max_length,
                                    "limit": limit})
    scores = []
    for protocol in protocols:
        out = output_root / protocol.name
        with templates_compiled_once():
            group = run_lm_eval(lm, [protocol.task], batch_size=32, limit=limit, seed=0,
                                allow_code_execution=False, num_fewshot=None, output_dir=out,
                                manager=manager)[protocol.task]
        outcomes = {(task, row["doc_id"]): float(row["acc"]) for task, row in read_samples(out)}
        scores.append(ProtocolScore(protocol, 100 * group.value, outcomes))
    return scores


def paired_differences(scores: list[ProtocolScore]
                       ) -> list[tuple[ProtocolScore, ProtocolScore, PairedComparison]]:
    """Every pair of protocols on the items both scored (all of them: one item set)."""
    pairs = []
    for a, b in itertools.combinations(scores, 2):
        if a.outcomes.keys() != b.outcomes.keys():
            raise RuntimeError(f"{a.protocol.name} and {b.protocol.name} scored different items")
        keys = sorted(a.outcomes)
        result = paired_comparison([np.array([[b.outcomes[k] for k in keys]])],
                                   [np.array([[a.outcomes[k] for k in keys]])])
        pairs.append((a, b, result))
    return pairs


def protocol_frame(model_label: str, scores: list[ProtocolScore]) -> pd.DataFrame:
    """One row per protocol, per pair of protocols (Δ = second − first), per external figure."""
    rows = [{"kind": "score", "label": s.protocol.label, "model": model_label,
             "value": s.value, "ci_low": s.interval[0], "ci_high": s.interval[1],
             "n": len(s.outcomes), "p_mcnemar": None,
             "source": f"hydrabench, lm-eval task {s.protocol.task}: {s.protocol.reading}"}
            for s in scores]
    rows += [{"kind": "paired Δ", "label": f"{b.protocol.label} − {a.protocol.label}",
              "model": model_label, "value": r.delta, "ci_low": r.ci_low, "ci_high": r.ci_high,
              "n": r.n_items, "p_mcnemar": r.p_value,
              "source": "paired bootstrap over items; McNemar's exact test"}
             for a, b, r in paired_differences(scores)]
    rows += [{"kind": "external figure", "label": a.protocol, "model": a.model,
              "value": a.value, "ci_low": None, "ci_high": None, "n": None, "p_mcnemar": None,
              "source": a.source} for a in LLAMA2_7B_ANCHORS]
    return pd.DataFrame(rows).astype({"n": "Int64"})


def _interval(low: float | None, high: float | None, signed: bool) -> str:
    if low is None or pd.isna(low):
        return "—"
    number = "+.2f" if signed else ".2f"
    return f"[{format(low, number)}, {format(high, number)}]"


def shown_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """The table as printed: numbers formatted, missing ones as "—"."""
    signed = frame["kind"] == "paired Δ"
    return pd.DataFrame({
        "kind": frame["kind"], "protocol": frame["label"], "model": frame["model"],
        "score / Δ": [f"{v:+.2f}" if s else f"{v:.2f}" for v, s in zip(frame["value"], signed,
                                                                       strict=True)],
        "95% CI": [_interval(lo, hi, s) for lo, hi, s in zip(frame["ci_low"], frame["ci_high"],
                                                            signed, strict=True)],
        "n": ["—" if pd.isna(n) else str(n) for n in frame["n"]],
        "McNemar p": ["—" if p is None or pd.isna(p) else format_p(p)
                      for p in frame["p_mcnemar"]],
        "source": frame["source"]})


def report_lines(model_label: str, limit: int | None, n_items: int) -> list[str]:
    which = "all test items" if limit is None else f"the first {limit} of each subject"
    source = (f"local copies in {data_dir()}; scored by lm-eval (tasks/offline/mmlu_protocols)"
              if offline_mode() else
              f"{HUB_MMLU} from the Hugging Face hub; scored by lm-eval (tasks/hub/mmlu_protocols)")
    return [
        f"# MMLU under several protocols: {model_label}", "",
        f"- items: {n_items} ({which}), {source}",
        "- score: acc in percent over all items (lm-eval's mmlu group, subjects weighted by "
        "size); 95% CI: ± 1.96 standard errors over the items, clipped to 0-100",
        "- paired Δ: second protocol minus first on the same items, with its 95% paired "
        "bootstrap interval and McNemar's exact p on the items one protocol got right and the "
        "other wrong",
        "- **external figure**: a published number, not scored here and not for this model "
        "unless it is LLaMA-2-7B; shown for the protocol it was scored with", "", ""]


def write_protocols_report(scores: list[ProtocolScore], model_label: str, limit: int | None,
                           out_dir: Path, name: str) -> list[Path]:
    """reports/<name>.md, .csv and .tex."""
    from hydrabench.atomic import write_text_atomic
    from hydrabench.reports.tables import latex_escape

    frame = protocol_frame(model_label, scores)
    shown = shown_frame(frame)
    paths = [out_dir / f"{name}.{ext}" for ext in ("md", "csv", "tex")]
    lines = report_lines(model_label, limit, len(scores[0].outcomes))
    write_text_atomic(paths[0], "\n".join(lines) + shown.to_markdown(index=False,
                                                             disable_numparse=True) + "\n")
    write_text_atomic(paths[1], frame.to_csv(index=False))
    body = [" & ".join(latex_escape(str(v)) for v in row) + r" \\"
            for row in shown.drop(columns="source").itertuples(index=False)]
    write_text_atomic(paths[2], "\n".join([
        r"\begin{table}[htbp]", r"\centering", r"\footnotesize",
        rf"\caption{{{latex_escape(lines[0][2:])}}}", r"\begin{tabular}{lllrrrr}", r"\toprule",
        " & ".join(latex_escape(c) for c in shown.columns[:-1]) + r" \\", r"\midrule", *body,
        r"\bottomrule", r"\end{tabular}",
        r"\par\smallskip{\scriptsize " + latex_escape(
            "External figures are published numbers, not scored here; sources in the CSV. "
            "Paired differences: bootstrap 95% interval over items, McNemar's exact test.")
        + "}", r"\end{table}"]) + "\n")
    return paths


# Beside a model's per-sample outputs: which model they are of (its content fingerprint).
SCORED_MODEL = "scored_model.json"


def output_name(benchmark: str, label: str, limit: int | None, root: Path,
                fingerprint: str | None = None) -> str:
    """The name of the report and of the outputs folder under `root`: the model's folder name
    (or the run id), readable; a model (its `fingerprint`) other than the one whose outputs
    hold that name (another folder or hub organisation, same name) gets a digest of its
    fingerprint added, so neither overwrites the other."""
    tail = f"-limit{limit}" if limit else ""
    name = f"protocols-{benchmark}-{slug(label)}"
    if fingerprint is None:
        return name + tail
    try:
        free = json.loads((root / f"{name}{tail}" / SCORED_MODEL).read_text())[
            "fingerprint"] == fingerprint
    except FileNotFoundError:
        free = True
    except (OSError, ValueError, KeyError, TypeError):  # unreadable: not known to be this model
        free = False
    digest = hashlib.sha256(fingerprint.encode()).hexdigest()[:12]
    return f"{name}{tail}" if free else f"{name}-{digest}{tail}"


def run_protocols(*, model: str | None = None, run_id: str | None = None,
                  benchmark: str = "mmlu", limit: int | None = None,
                  names: list[str] | None = None, store: RunStore | None = None,
                  out_dir: Path | None = None, trust_remote_code: bool = False) -> list[Path]:
    """`hydrabench protocols`: score, then write the table; returns the report's paths."""
    protocols = check_request(benchmark, names or list(PROTOCOLS), limit)
    store = store or RunStore()
    loaded, tokenizer, tokenizer_name, label = _load(model, run_id, store, trust_remote_code)
    root = store.root / "protocols"
    if model is None:
        name = output_name(benchmark, run_id or "", limit, root)
    else:
        from hydrabench.atomic import write_json_atomic
        from hydrabench.records.provenance import model_fingerprint

        fingerprint = model_fingerprint(model)
        name = output_name(benchmark, model, limit, root, fingerprint)
        write_json_atomic(root / name / SCORED_MODEL, {"model": model, "fingerprint": fingerprint})
    scores = score_protocols(protocols, loaded, tokenizer, tokenizer_name, limit, root / name)
    return write_protocols_report(scores, label, limit, out_dir or reports_root(), name)
