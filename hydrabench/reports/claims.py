"""A paper's claims as tests with verdicts (tasks/claims/*.yaml, `hydrabench claims`).

A claim names rows of a table spec (so claim runs and table runs share run ids), a column, and a
test: `paired` (every row of `a` against every row of `b`), `ordering` (rows in the claimed
order, best first: each against the next), `ratio` (an efficiency factor from the records'
training metering) or `analysis` (`analysis: ab-similarity`, Fig. 3's A/B matrices of the rows'
trained adapters: ab_analysis.py; without `analysis:` listed, not tested). Its verdict comes from
the records (and their artifacts) only: the measured effect with a 95% interval (paired
bootstrap over items, per-item differences averaged over seeds: significance.py's machinery;
over seeds for ratios; over layers and seeds for analyses), a p-value for "the effect is on the
margin", and Holm's correction over every claim tested together. docs/claims.md has the rule.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hydrabench.config.includes import included
from hydrabench.config.profiles import load_yaml
from hydrabench.config.tables import Column, TableSpec, load_table
from hydrabench.errors import SpecError, did_you_mean
from hydrabench.paths import TASKS_DIR
from hydrabench.progress import log
from hydrabench.records.store import RunRecord, RunStore

DEFAULT_CLAIMS = "hydralora"
DEFAULT_SEEDS = (0, 1, 2)
ALPHA = 0.05  # family-wise, after Holm's correction
POWER = 0.80  # for the smallest detectable effect
KINDS = ("paired", "ordering", "ratio", "analysis")
DIRECTIONS = ("higher", "lower")
# Ratio metrics: where the records' training metering keeps them, and whether less is better.
RATIO_METRICS: dict[str, tuple[tuple[str, str], bool]] = {
    "tokens_per_s": (("throughput", "tokens_per_s"), False),
    "wall_s": (("throughput", "wall_s"), True),
    "step_time_mean_s": (("throughput", "step_time_mean_s"), True),
    "peak_memory_bytes": (("throughput", "peak_memory_bytes"), True),
    "energy_kwh": (("energy", "total_kwh"), True),
}
VERDICTS = ("supported", "contradicted", "inconclusive", "not tested")


# -- the format --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    id: str
    words: str  # the paper's words
    where: str  # where they stand: "Table 1", "Fig. 5", "Sec. 3.2"
    kind: str
    table: str | None = None  # the table spec whose rows (and run ids) the claim uses
    column: str | None = None  # a column key of that table (default: the table's task)
    a: tuple[str, ...] = ()  # paired: rows claimed better; ratio: the row claimed cheaper
    b: tuple[str, ...] = ()  # paired/ratio: the rows they are compared with
    rows: tuple[str, ...] = ()  # ordering: best first
    direction: str = "higher"  # paired/ordering: A's score higher (or lower) than B's
    margin: float = 0.0  # points by which A must beat B; negative: "at least as good, within"
    metric: str | None = None  # ratio: a RATIO_METRICS name
    factor: float = 1.0  # ratio: A must be better than B by more than this factor
    paper: str | None = None  # the paper's numbers, where a table's `paper:` values lack them
    seeds: tuple[int, ...] | None = None
    equal_parameters: bool = False  # the claim is at equal budgets: the records' %Param checked
    analysis: str | None = None  # analysis: an ab_analysis.ANALYSES name (None: not tested)
    measure: str = "cosine"  # ab-similarity: an ab_analysis.MEASURES name

    def pairs(self) -> list[tuple[str, str]]:
        """The (A, B) row pairs whose effects must all be on the claimed side."""
        if self.kind == "ordering":
            return list(zip(self.rows, self.rows[1:], strict=False))
        return [(a, b) for a in self.a for b in self.b]

    def row_labels(self) -> list[str]:
        return list(dict.fromkeys([*self.a, *self.b, *self.rows]))


@dataclass(frozen=True)
class ClaimsFile:
    name: str
    title: str
    path: Path
    claims: tuple[Claim, ...]
    seeds: tuple[int, ...] = DEFAULT_SEEDS


def claims_files() -> dict[str, Path]:
    """Claims name → file: the shipped tasks/claims and the included folders' claims/."""
    found = {p.stem: p for p in sorted((TASKS_DIR / "claims").glob("*.yaml"))}
    for folder in included():
        for path in sorted((folder.root / "claims").glob("*.yaml")):
            if path.stem in found:
                raise SpecError(f"{path}: claims {path.stem} are already defined by "
                                f"{found[path.stem]}: give yours another name")
            found[path.stem] = path
    return found


def _labels(value: Any, what: str) -> tuple[str, ...]:
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise SpecError(f"{what} must be a row label or a list of them")
    return tuple(values)


def _seeds(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not value or not all(
            isinstance(s, int) and not isinstance(s, bool) for s in value):
        raise SpecError(f"{what}: seeds must be a non-empty list of integers")
    return tuple(value)


CLAIM_KEYS = {"id", "words", "where", "kind", "table", "column", "a", "b", "rows", "direction",
              "margin", "metric", "factor", "paper", "seeds", "equal_parameters", "analysis",
              "measure"}


def parse_claim(raw: Any, where: str) -> Claim:
    """One claim of a claims file, checked against its table spec (rows, column) now."""
    if not isinstance(raw, dict):
        raise SpecError(f"{where}: a claim must be a mapping")
    unknown = sorted(set(raw) - CLAIM_KEYS)
    if unknown:
        raise SpecError(f"{where}: unknown key(s) {unknown}; valid: {sorted(CLAIM_KEYS)}")
    for key in ("id", "words", "where", "kind"):
        if not isinstance(raw.get(key), str) or not raw[key].strip():
            raise SpecError(f"{where}: `{key}` is required (a string)")
    where = f"{where} ({raw['id']})"
    kind = raw["kind"]
    if kind not in KINDS:
        raise did_you_mean(f"claim kind in {where}", kind, list(KINDS))
    try:
        claim = Claim(
            id=raw["id"], words=raw["words"], where=raw["where"], kind=kind,
            table=raw.get("table"), column=raw.get("column"),
            a=_labels(raw.get("a", []), f"{where}: a"), b=_labels(raw.get("b", []), f"{where}: b"),
            rows=_labels(raw.get("rows", []), f"{where}: rows"),
            direction=raw.get("direction", "higher"), margin=float(raw.get("margin", 0.0)),
            metric=raw.get("metric"), factor=float(raw.get("factor", 1.0)),
            paper=None if raw.get("paper") is None else str(raw["paper"]),
            seeds=None if raw.get("seeds") is None else _seeds(raw["seeds"], where),
            equal_parameters=bool(raw.get("equal_parameters", False)),
            analysis=raw.get("analysis"), measure=raw.get("measure", "cosine"))
    except (TypeError, ValueError) as err:
        raise SpecError(f"{where}: {err}") from None
    if kind == "analysis" and claim.analysis is None:
        return claim  # the paper's words, listed; nothing here computes them
    if claim.direction not in DIRECTIONS:
        raise did_you_mean(f"direction in {where}", claim.direction, list(DIRECTIONS))
    if claim.table is None:
        raise SpecError(f"{where}: `table` is required for a {kind} claim")
    table = load_table(claim.table)
    if kind == "ordering" and len(claim.rows) < 2:
        raise SpecError(f"{where}: an ordering needs `rows`, two or more, best first")
    if kind in ("paired", "ratio") and not (claim.a and claim.b):
        raise SpecError(f"{where}: a {kind} claim needs rows `a` and `b`")
    if kind == "ratio" and claim.metric not in RATIO_METRICS:
        raise did_you_mean(f"ratio metric in {where}", str(claim.metric), list(RATIO_METRICS))
    if kind == "ratio" and claim.factor <= 0:
        raise SpecError(f"{where}: factor must be positive")
    if kind == "analysis":
        check_analysis(claim, where)
    labels = [row.label for row in table.rows]
    for label in claim.row_labels():
        if label not in labels:
            raise did_you_mean(f"row of table {table.name} in {where}", label, labels)
    if kind == "analysis":
        from hydrabench.reports.ab_analysis import analysable

        for row in table.rows:
            if row.label in claim.rows and not analysable(row.method):
                raise SpecError(f"{where}: row {row.label!r} ({row.method}) has no per-adapter "
                                "A and B to compare (lora-split-sum, lora-split-routed or "
                                "HydraLoRA's layer format have)")
    claim_column(claim, table, where)
    return claim


def check_analysis(claim: Claim, where: str) -> None:
    from hydrabench.reports.ab_analysis import ANALYSES, MEASURES

    if claim.analysis not in ANALYSES:
        raise did_you_mean(f"analysis in {where}", str(claim.analysis), list(ANALYSES))
    if claim.measure not in MEASURES:
        raise did_you_mean(f"measure in {where}", str(claim.measure), list(MEASURES))
    if not claim.rows:
        raise SpecError(f"{where}: an analysis needs `rows`: the rows whose adapters it reads")


def claim_column(claim: Claim, table: TableSpec, where: str = "") -> Column:
    """The score column the claim reads (by key; default: the one scoring the table's task)."""
    key = claim.column or table.task
    scores = [c for c in table.columns if c.kind == "score"]
    for column in scores:
        if column.key == key:
            return column
    raise did_you_mean(f"score column of table {table.name} in {where or claim.id}", key,
                       [c.key for c in scores])


def load_claims(name_or_path: str = DEFAULT_CLAIMS) -> ClaimsFile:
    """A claims file by name (tasks/claims, an included folder's claims/) or path; every claim
    is checked before any work."""
    files = claims_files()
    path = Path(name_or_path)
    if name_or_path in files:
        path = files[name_or_path]
    elif not (path.suffix in (".yaml", ".yml") and path.is_file()):
        raise did_you_mean("claims", name_or_path, sorted(files))
    raw = load_yaml(path)
    if not isinstance(raw.get("claims"), list) or not raw["claims"]:
        raise SpecError(f"malformed claims file {path}: `claims` must be a non-empty list")
    claims = tuple(parse_claim(c, f"{path}: claim {i}") for i, c in enumerate(raw["claims"], 1))
    ids = [c.id for c in claims]
    if len(set(ids)) != len(ids):
        raise SpecError(f"malformed claims file {path}: claim ids repeat: "
                        f"{sorted({i for i in ids if ids.count(i) > 1})}")
    seeds = _seeds(raw["seeds"], str(path)) if "seeds" in raw else DEFAULT_SEEDS
    return ClaimsFile(name=str(raw.get("name", path.stem)), title=str(raw.get("title", path.stem)),
                      path=path, claims=claims, seeds=seeds)


# -- statistics --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Effect:
    """One pair's measured effect, oriented as A − B (points) or as A's factor over B (ratio)."""

    a: str
    b: str
    value: float
    low: float  # 95% interval
    high: float
    se: float | None  # standard error on the test's scale (points; log factor for ratios)
    z: float | None  # (claimed-side effect − margin) / se: > 0 on the claimed side
    df: int | None  # t distribution's degrees of freedom (ratio over seeds); None: normal
    n_seeds: int
    n_items: int | None = None
    scale_log: bool = False  # value, low, high are factors; se and margin on their log

    def p_one_sided(self, claimed: bool) -> float:
        """P of an effect at least this far past the margin if it were on the margin: toward the
        claimed side (claimed=True) or away from it."""
        from scipy import stats

        assert self.z is not None
        z = self.z if claimed else -self.z
        if math.isinf(z):
            return 0.0 if z > 0 else 1.0
        dist = stats.t(self.df) if self.df else stats.norm
        return float(dist.sf(z))

    def mde(self) -> float | None:
        """Smallest true distance from the margin detected with POWER at ALPHA (two-sided), on
        the test's scale."""
        from scipy import stats

        if self.se is None:
            return None
        dist = stats.t(self.df) if self.df else stats.norm
        return float(dist.ppf(1 - ALPHA / 2) + dist.ppf(POWER)) * self.se


def _z(distance: float, se: float) -> float:
    if se > 0:
        return distance / se
    return math.inf if distance > 0 else -math.inf if distance < 0 else 0.0


def paired_effect(a: str, b: str, comparison: Any, claim: Claim) -> Effect:
    """A significance.PairedComparison as an Effect: its standard error from the width of its
    95% bootstrap interval (normal), the distance of the claimed-side effect from the margin."""
    sign = 1.0 if claim.direction == "higher" else -1.0
    se = (comparison.ci_high - comparison.ci_low) / (2 * 1.959963984540054)
    return Effect(a, b, comparison.delta, comparison.ci_low, comparison.ci_high, se,
                  _z(sign * comparison.delta - claim.margin, se), None, comparison.n_seeds,
                  comparison.n_items)


def ratio_effect(a: str, b: str, values_a: dict[int, float], values_b: dict[int, float],
                 claim: Claim) -> Effect | None:
    """A's improvement factor over B per seed both have (B/A where less is better), its mean
    on the log scale with a t-interval over seeds; None without a shared seed."""
    from hydrabench.reports.cells import mean_ci

    _, lower_better = RATIO_METRICS[str(claim.metric)]
    seeds = sorted(set(values_a) & set(values_b))
    logs = [math.log(values_b[s] / values_a[s]) if lower_better
            else math.log(values_a[s] / values_b[s]) for s in seeds]
    if not logs:
        return None
    mean, sem, ci95 = mean_ci(logs)
    low, high = (mean, mean) if ci95 is None else (mean - ci95, mean + ci95)
    return Effect(a, b, math.exp(mean), math.exp(low), math.exp(high), sem,
                  None if sem is None else _z(mean - math.log(claim.factor), sem),
                  len(logs) - 1 if sem is not None else None, len(logs), scale_log=True)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (in the input's order): the i-th smallest times
    (m − i + 1), kept monotone, capped at 1."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted = [1.0] * len(p_values)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


@dataclass
class Verdict:
    claim: Claim
    effects: list[Effect] = field(default_factory=list)
    note: str = ""  # why it is not tested, or what is missing
    p_supported: float | None = None  # every pair on the claimed side (largest one-sided p)
    p_contradicted: float | None = None  # some pair on the other side (Bonferroni over pairs)
    p: float | None = None  # two-sided: 2 × the smaller of the two
    p_holm: float | None = None
    verdict: str = "not tested"
    stand_in: bool | None = None
    data_source: str | None = None  # as the records state it
    run_ids: list[str] = field(default_factory=list)
    paper: str = ""
    analysis: Any = None  # what an analysis measured (ab_analysis.AbResult), for its figure

    @property
    def binding(self) -> Effect | None:
        """The pair that decides: the least supported one, or the most contradicting one."""
        if not self.effects or any(e.z is None for e in self.effects):
            return self.effects[0] if self.effects else None
        if self.verdict == "contradicted":
            return min(self.effects, key=lambda e: e.p_one_sided(claimed=False))
        return max(self.effects, key=lambda e: e.p_one_sided(claimed=True))


def pair_p_values(verdict: Verdict) -> None:
    """The claim's p-values from its pairs' effects (before Holm): supported needs every pair
    past the margin on the claimed side (the largest p, an intersection-union test);
    contradicted needs one pair past it on the other side (the smallest p, times the pairs)."""
    if not verdict.effects or any(e.z is None for e in verdict.effects):
        return
    verdict.p_supported = max(e.p_one_sided(claimed=True) for e in verdict.effects)
    verdict.p_contradicted = min(1.0, len(verdict.effects) * min(
        e.p_one_sided(claimed=False) for e in verdict.effects))
    verdict.p = min(1.0, 2 * min(verdict.p_supported, verdict.p_contradicted))


def decide(verdicts: Sequence[Verdict]) -> None:
    """Holm's correction over the claims that have a p-value, then each one's verdict."""
    for v in verdicts:  # measured, but without a spread (one seed of a ratio)
        if v.effects and v.p is None:
            v.verdict = "inconclusive"
    tested = [v for v in verdicts if v.p is not None]
    for v, adjusted in zip(tested, holm([v.p for v in tested]), strict=True):  # type: ignore[misc]
        v.p_holm = adjusted
        if adjusted >= ALPHA:
            v.verdict = "inconclusive"
        elif v.p_supported <= v.p_contradicted:  # type: ignore[operator]
            v.verdict = "supported"
        else:
            v.verdict = "contradicted"


def needed(verdict: Verdict) -> str:
    """For an inconclusive claim: how much more data would detect the measured distance from the
    margin (the spread falling as 1/sqrt(data): a rough guide, not a power analysis)."""
    effect = verdict.binding
    if effect is None or effect.se is None or effect.z is None:
        return ""  # no spread: the claim's note says why
    mde = effect.mde()
    distance = abs(effect.z) * effect.se
    if distance == 0 or mde is None:
        return "the effect sits on the margin: no amount of data decides it"
    scale = (mde / distance) ** 2
    items = f" at {effect.n_items} items" if effect.n_items else ""
    return (f"≈{scale:.1f}× the data would detect the measured effect, e.g. "
            f"{math.ceil(effect.n_seeds * scale)} seeds{items}")


# -- from records ------------------------------------------------------------------------------


def restricted(table: TableSpec, claim: Claim) -> TableSpec:
    """The table with only the claim's rows and column: the same run ids, fewer runs."""
    labels = claim.row_labels()
    return replace(table, rows=tuple(r for r in table.rows if r.label in labels),
                   columns=(claim_column(claim, table),))


def _metering_value(record: RunRecord, metric: str) -> float | None:
    (section, key), _ = RATIO_METRICS[metric]
    value = ((record.metering.train or {}).get(section) or {}).get(key)
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


def _paper_text(claim: Claim, table: TableSpec, column: Column) -> str:
    if claim.paper is not None:
        return claim.paper
    values = {row.label: row.paper.get(column.key) for row in table.rows}
    deltas = [f"{values[a] - values[b]:+.2f}" for a, b in claim.pairs()
              if values.get(a) is not None and values.get(b) is not None]
    return f"Δ {', '.join(deltas)}" if deltas else ""


def judge_claim(claim: Claim, profile: str, seeds: tuple[int, ...], store: RunStore) -> Verdict:
    """A claim's effects from the records in `store` (nothing is run); p-values before Holm."""
    from hydrabench.reports.cells import find_records

    verdict = Verdict(claim, paper=claim.paper or "")
    if claim.kind == "analysis" and claim.analysis is None:
        verdict.note = "an analysis claim without `analysis:` is listed, not tested"
        return verdict
    full = load_table(str(claim.table))
    table = restricted(full, claim)
    column = claim_column(claim, table)
    verdict.paper = _paper_text(claim, full, column)
    task = table.task_of(column)
    found = find_records(table, profile, seeds, store)
    records = {label: found[(label, task)] for label in claim.row_labels()}
    used = [rec for recs in records.values() for rec in recs]
    verdict.run_ids = [rec.run_id for rec in used]
    labelled = [rec.stand_in for rec in used if rec.stand_in is not None]
    verdict.stand_in = any(labelled) if labelled else None
    sources = sorted({rec.data_source for rec in used if rec.data_source})
    verdict.data_source = " | ".join(sources) or None
    missing = [label for label, recs in records.items() if not recs]
    if missing:
        verdict.note = f"no records for {', '.join(missing)}"
        return verdict
    if claim.kind == "analysis":
        judge_ab(claim, records, store, verdict)
        pair_p_values(verdict)
        return verdict
    for a, b in claim.pairs():
        effect = _pair_effect(claim, a, b, records[a], records[b], store, column)
        if effect is None:
            verdict.note = (f"{a} vs {b}: no per-item outputs on shared seeds" if
                            claim.kind != "ratio" else
                            f"{a} vs {b}: no {claim.metric} in the training metering")
            verdict.effects = []
            return verdict
        verdict.effects.append(effect)
    pair_p_values(verdict)
    if claim.equal_parameters:
        verdict.note = "; ".join(filter(None, [verdict.note, *unequal_budgets(claim, records)]))
    if verdict.p is None:
        verdict.note = "one seed: a ratio's spread needs 2 or more seeds"
    if claim.metric == "energy_kwh" and not all(
            (rec.metering.train or {}).get("energy", {}).get("energy_measured") for rec in used):
        verdict.note = "; ".join(filter(None, [verdict.note, "energy estimated, not all "
                                               "measured (the records' energy sources)"]))
    return verdict


def judge_ab(claim: Claim, records: dict[str, list[RunRecord]], store: RunStore,
             verdict: Verdict) -> None:
    """The ab-similarity claim's effect and note from its rows' artifacts (nothing is run)."""
    from hydrabench.reports.ab_analysis import (
        AbResult,
        NoFactors,
        ab_difference,
        ab_note,
        analyse,
        artifact_factors,
    )

    result = AbResult()
    problems = []
    for row, recs in records.items():
        for record in recs:
            try:
                analyse(row, record, artifact_factors(record, store), result)
            except NoFactors as err:
                problems.append(str(err))
    if problems:
        verdict.note = "; ".join(problems)
        return
    diff = ab_difference(result.units, claim.measure)
    verdict.analysis = result
    verdict.note = ab_note(result.units, claim.measure)
    if diff is None:
        verdict.note = "; ".join([verdict.note, "no row has an A per adapter"])
        return
    sign = 1.0 if claim.direction == "higher" else -1.0
    verdict.effects.append(Effect("A's", "B's", diff.mean, diff.low, diff.high, diff.se,
                                  None if diff.se is None else _z(sign * diff.mean - claim.margin,
                                                                  diff.se),
                                  diff.df, diff.n_seeds))
    if diff.se is None:
        verdict.note = "; ".join([verdict.note, "one layer-module: no spread"])


def figure_stems(verdicts: Sequence[Verdict], stem: str) -> dict[str, str]:
    """Claim id → its figure's file stem: <stem>-fig3 for a file's one ab-similarity claim,
    <stem>-fig3-<id> where there are several."""
    ids = [v.claim.id for v in verdicts if v.claim.analysis == "ab-similarity"]
    return {i: f"{stem}-fig3" if len(ids) == 1 else f"{stem}-fig3-{i}" for i in ids}


def unequal_budgets(claim: Claim, records: dict[str, list[RunRecord]]) -> list[str]:
    """The pairs whose records' %Param differ by more than 1% (the claim's premise fails)."""
    def budget(label: str) -> float | None:
        return next((rec.training.percent_param for rec in records[label]
                     if rec.training.percent_param is not None), None)

    notes = []
    for a, b in claim.pairs():
        pa, pb = budget(a), budget(b)
        if pa is not None and pb is not None and abs(pa - pb) > 0.01 * max(pa, pb):
            notes.append(f"unequal budgets: {a} {pa:.4g} %Param, {b} {pb:.4g}")
    return notes


def _pair_effect(claim: Claim, a: str, b: str, records_a: list[RunRecord],
                 records_b: list[RunRecord], store: RunStore, column: Column) -> Effect | None:
    if claim.kind == "ratio":
        metric = str(claim.metric)
        values = [{rec.seed: v for rec in recs
                   if (v := _metering_value(rec, metric)) is not None}
                  for recs in (records_a, records_b)]
        return ratio_effect(a, b, values[0], values[1], claim)
    from hydrabench.evaluation.significance import compare_records

    comparison = compare_records(records_a, records_b, store, column.metric)
    return None if comparison is None else paired_effect(a, b, comparison, claim)


def judge_claims(claims: ClaimsFile, profile: str, seeds: tuple[int, ...] | None,
                 store: RunStore) -> list[Verdict]:
    """Every claim's verdict, Holm-corrected over the claims tested together."""
    verdicts = [judge_claim(c, profile, seeds or c.seeds or claims.seeds, store)
                for c in claims.claims]
    decide(verdicts)
    return verdicts


# -- running what the claims need --------------------------------------------------------------


def plan_claim_runs(claims: ClaimsFile, profile: str, seeds: tuple[int, ...] | None,
                    execute: Callable[..., Any], allow_code_execution: bool = False) -> list[Any]:
    """The sweeps (hydrabench.pipeline.sweep) that make every claim's records: per table and seeds,
    the claims' rows on their columns only. Run ids are the table's, so finished runs are reused."""
    from hydrabench.pipeline.sweep import plan_sweep

    wanted: dict[tuple[str, tuple[int, ...]], tuple[set[str], set[str]]] = {}
    for claim in claims.claims:
        if claim.kind == "analysis" and claim.analysis is None:
            continue
        table = load_table(str(claim.table))
        rows, columns = wanted.setdefault(
            (table.name, seeds or claim.seeds or claims.seeds), (set(), set()))
        rows.update(claim.row_labels())
        columns.add(claim_column(claim, table).key)
    sweeps = []
    for (name, run_seeds), (rows, columns) in wanted.items():
        table = load_table(name)
        table = replace(table, columns=tuple(c for c in table.columns if c.key in columns))
        numbers = [n for n, row in enumerate(table.rows, start=1) if row.label in rows]
        sweeps.append(plan_sweep(table, profile, run_seeds, execute, rows=numbers,
                                 allow_code_execution=allow_code_execution))
    return sweeps


def run_claim_runs(sweeps: list[Any], claims: ClaimsFile, jobs: int) -> None:
    """The sweeps here, `jobs` runs at a time; the tables of timing claims first, alone."""
    from hydrabench.pipeline.sweep import check_sweeps_parallel, run_sweeps_in_processes

    timed = {load_table(str(c.table)).name for c in claims.claims if c.kind == "ratio"}
    check_sweeps_parallel(sweeps, jobs)
    for sweep in sweeps:
        if jobs == 1 or sweep.table.name in timed:
            sweep.run_local()
    if jobs > 1:
        run_sweeps_in_processes([s for s in sweeps if s.table.name not in timed], jobs)


def submit_claim_runs(sweeps: list[Any], wait: bool) -> bool:
    """Each sweep's job array on Slurm (a run another sweep queued is not submitted twice);
    with `wait`, block until they have left the queue. True when every run is finished."""
    from hydrabench.pipeline.sweep import format_status

    for sweep in sweeps:
        sweep.submit_slurm()
    if not wait:
        log("when the jobs have finished, the same command with --report-only writes the "
            "report; `hydrabench sweep TABLE --status` shows where each table's runs stand")
        return False
    failed: set[str] = set()  # run ids: a run two tables share counts once
    for sweep in sweeps:
        statuses = sweep.wait()
        if any(s.state == "failed" for s in statuses):
            print(format_status(statuses), file=sys.stderr, flush=True)
        failed |= {s.run.spec.run_id for s in statuses if s.state == "failed"}
    if failed:
        raise SpecError(f"{len(failed)} run(s) failed on Slurm; their logs are named above: no "
                        "report written (--report-only writes one from the records there are)")
    return True


# -- the report --------------------------------------------------------------------------------


def _number(value: Any, ratio: bool) -> str:
    if value is None or value != value:  # None, or NaN read back from a frame
        return ""
    return f"{value:.2f}×" if ratio else f"{value:+.2f}"


def claim_row(v: Verdict) -> dict[str, Any]:
    """One line of the report (the CSV keeps numbers): the paper's words and numbers, ours,
    interval, smallest detectable effect, p after Holm, verdict, stand-in mark, run ids."""
    effect = v.binding
    ratio = v.claim.kind == "ratio"
    mde = effect.mde() if effect is not None else None
    if mde is not None and effect is not None and effect.scale_log:
        mde = math.exp(mde)  # as a factor, like the effect
    return {
        "id": v.claim.id, "where": v.claim.where, "claim": v.claim.words,
        "test": _test_text(v.claim), "paper": v.paper,
        "unit": "factor" if ratio else "similarity" if v.claim.kind == "analysis" else "points",
        "pair": "" if effect is None else f"{effect.a} vs {effect.b}",
        "effect": None if effect is None else effect.value,
        # No interval without a spread (a ratio on one seed).
        "ci_low": None if effect is None or effect.se is None else effect.low,
        "ci_high": None if effect is None or effect.se is None else effect.high,
        "n_seeds": None if effect is None else effect.n_seeds,
        "n_items": None if effect is None else effect.n_items,
        "mde": mde, "p": v.p, "p_holm": v.p_holm, "verdict": v.verdict,
        "stand_in": v.stand_in,
        "note": "; ".join(filter(None, [v.note, needed(v) if v.verdict == "inconclusive"
                                        else ""])),
        "run_id": ";".join(v.run_ids), "data_source": v.data_source}


def shown_rows(frame: Any) -> Any:
    """The Markdown/LaTeX view of verdict_frame: numbers as text, the interval in one cell."""
    ratio = frame["unit"] == "factor"
    return frame.assign(
        ours=[_number(e, r) for e, r in zip(frame["effect"], ratio, strict=True)],
        ci95=["" if lo is None or lo != lo else f"[{_number(lo, r)}, {_number(hi, r)}]"
              for lo, hi, r in zip(frame["ci_low"], frame["ci_high"], ratio, strict=True)],
        mde=[_number(m, r).lstrip("+") for m, r in zip(frame["mde"], ratio, strict=True)],
        seeds=["" if n is None or n != n else str(int(n)) for n in frame["n_seeds"]],
        p_holm=["" if p is None or p != p else f"{p:.2g}" for p in frame["p_holm"]],
        **{"stand-in": ["stand-in" if s is True else "" for s in frame["stand_in"]]})[
        ["id", "where", "claim", "paper", "ours", "ci95", "pair", "seeds", "mde", "p_holm",
         "verdict", "stand-in", "note"]]


def _test_text(claim: Claim) -> str:
    side = ">" if claim.direction == "higher" else "<"
    if claim.kind == "analysis":
        return (f"{claim.analysis}: A's − B's {claim.measure} similarity {side} "
                f"{claim.margin:+g} ({', '.join(claim.rows)})" if claim.analysis else "")
    if claim.kind == "ratio":
        return f"{claim.metric}: A better than B by > {claim.factor:g}×"
    if claim.kind == "ordering":
        return f" {side} ".join(claim.rows)
    margin = claim.margin if claim.direction == "higher" else -claim.margin
    return f"A − B {side} {margin:+g} (A: {', '.join(claim.a)}; B: {', '.join(claim.b)})"


LEGEND = [
    "ours: the effect of the deciding pair (the least supported one, or the most "
    "contradicting): A − B in points (paired, ordering), or A's factor over B (ratio: B/A where "
    "less is better), with its 95% interval: paired bootstrap over items, per-item differences "
    "averaged over the seeds both have (significance.py); for ratios a t-interval of the log "
    "factor over seeds",
    "verdict: each claim's p is two-sided for \"the effect sits on the margin\" (normal from the "
    "bootstrap interval; t over seeds for ratios); supported needs every pair past the margin "
    "on the claimed side, contradicted one pair past it on the other side (Bonferroni over the "
    "pairs); Holm's correction over all claims tested together at α = 0.05 (p_holm); otherwise "
    "inconclusive",
    "mde: the smallest distance from the margin the runs detect with 80% power at α = 0.05 "
    "(2.80 standard errors); an inconclusive note says how much more data would detect the "
    "measured effect (spread falling as 1/√data: a rough guide)",
    "analysis (ab-similarity, Fig. 3): per layer and module, the mean pairwise similarity of "
    "the A's minus that of the B's of the per-component adapters (|cosine| of the flattened "
    "matrices, or mean cos² of the principal angles between their row/column spaces), averaged "
    "over layers, modules and seeds with a 95% t-interval over them (units taken as "
    "independent: a rough interval); the plot is a PCA of the flattened matrices",
    "not tested: analysis claims without `analysis:`, or claims whose runs have no records "
    "(or no artifact to read)",
]


def verdict_frame(verdicts: Sequence[Verdict]) -> Any:
    import pandas as pd

    return pd.DataFrame([claim_row(v) for v in verdicts])


def write_claims_report(claims: ClaimsFile, verdicts: Sequence[Verdict], profile: str,
                        seeds: tuple[int, ...], out_dir: Path,
                        skipped: Sequence[str] = ()) -> list[Path]:
    """reports/claims.{md,csv,tex} (claims-<name> for another file than the default)."""
    from hydrabench.atomic import write_text_atomic
    from hydrabench.reports.ab_analysis import write_ab_figure
    from hydrabench.reports.tables import latex_escape, provenance_lines, runs_lines, skipped_lines

    frame = verdict_frame(verdicts)
    stem = "claims" if claims.name == DEFAULT_CLAIMS else f"claims-{claims.name}"
    paths = [out_dir / f"{stem}.{ext}" for ext in ("md", "csv", "tex")]
    stems = figure_stems(verdicts, stem)
    figures = [write_ab_figure(v.analysis, f"{v.claim.where}: {v.claim.words}",
                               out_dir / stems[v.claim.id],
                               f"profile {profile} · seeds {','.join(map(str, seeds))}")
               for v in verdicts if v.claim.id in stems]
    counts = ", ".join(f"{(frame['verdict'] == k).sum()} {k}" for k in VERDICTS
                       if (frame["verdict"] == k).any())
    shown = shown_rows(frame)
    md = [f"# {claims.title}", "", f"- claims: `{claims.path}`; {counts}",
          *provenance_lines(profile, seeds, frame), *(f"- {line}" for line in LEGEND),
          *runs_lines(frame["run_id"]), *(f"- {line}" for line in skipped_lines(skipped)),
          *(f"![{v.claim.where}]({f[0].name})\n" for v, f in zip(
              [v for v in verdicts if v.claim.id in stems], figures, strict=True) if f),
          shown.to_markdown(index=False, disable_numparse=True)]
    write_text_atomic(paths[0], "\n".join(md) + "\n")
    write_text_atomic(paths[1], frame.to_csv(index=False))
    columns = ["id", "where", "paper", "ours", "ci95", "p_holm", "verdict"]
    tex = [r"\begin{table}[htbp]", r"\centering", r"\footnotesize",
           rf"\caption{{{latex_escape(claims.title)}}}", rf"\label{{tab:claims-{claims.name}}}",
           r"\begin{tabular}{llllllll}", r"\toprule",
           " & ".join(latex_escape(c) for c in columns) + r" & stand-in \\", r"\midrule",
           *(" & ".join(latex_escape(str(row[c])) for c in columns) + " & "
             + ("yes" if row["stand-in"] else "") + r" \\"
             for _, row in shown.iterrows()),
           r"\bottomrule", r"\end{tabular}",
           r"\par\smallskip{\scriptsize " + r" \par ".join(latex_escape(x) for x in LEGEND)
           + "}", r"\end{table}"]
    write_text_atomic(paths[2], "\n".join(tex) + "\n")
    return paths + [p for f in figures for p in f]


def run_claims(name_or_path: str = DEFAULT_CLAIMS, profile: str = "tiny",
               seeds: tuple[int, ...] | None = None, *, report_only: bool = False,
               allow_code_execution: bool = False, store: RunStore | None = None,
               out_dir: Path | None = None, jobs: int = 1, executor: str = "local",
               wait: bool = False) -> list[Path]:
    """`hydrabench claims`: run what the claims need (unless report_only), then the report.
    `jobs` > 1: that many runs at once, but the tables of timing claims (kind ratio) first and
    one at a time, so that what they measure had the machine to itself. `executor` "slurm":
    submit them as the tables' sweeps do; the report only with `wait` (none if a run failed)."""
    from hydrabench.paths import reports_root

    claims = load_claims(name_or_path)  # every claim checked before any work
    store = store or RunStore()
    if not report_only:
        from hydrabench.pipeline.run import execute

        sweeps = plan_claim_runs(claims, profile, seeds, execute, allow_code_execution)
        if executor == "slurm":
            if not submit_claim_runs(sweeps, wait):
                return []
        else:
            run_claim_runs(sweeps, claims, jobs)
    verdicts = judge_claims(claims, profile, seeds, store)
    shown_seeds = seeds or claims.seeds
    return write_claims_report(claims, verdicts, profile, shown_seeds, out_dir or reports_root(),
                               store.corrupt_records())
