"""A table's cells from the records the store holds: a cell without a record stays empty ("—"),
never invented; bold and Δ come from paired tests on the per-item outputs."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from hydrabench.config.tables import PARAM_KEYS, Column, Row, TableSpec
from hydrabench.errors import did_you_mean
from hydrabench.pipeline.resolve import table_runs
from hydrabench.records.store import RunRecord, RunStore, hardware_text


def find_records(table: TableSpec, profile: str, seeds: tuple[int, ...],
                 store: RunStore) -> dict[tuple[str, str], list[RunRecord]]:
    """(row label, task) → the finished records of its runs, one per seed that has one."""
    found: dict[tuple[str, str], list[RunRecord]] = {}
    for row, task, spec in table_runs(table, profile, seeds):
        records = found.setdefault((row.label, task), [])
        if store.has(spec.run_id):
            records.append(store.load(spec.run_id))
    return found


def seeds_with_records(table: TableSpec, profile: str, store: RunStore) -> tuple[int, ...]:
    """The seeds for which the store holds a finished record of at least one of the table's
    runs: what a report with no --seeds covers (records of other tables' seeds not counted)."""
    methods = {row.method for row in table.rows}
    candidates = sorted({rec.seed for rec in store.records() if rec.method in methods})
    return tuple(seed for seed in candidates
                 if any(store.has(spec.run_id) for _, _, spec in table_runs(table, profile,
                                                                                  (seed,))))


def hardware_of(record: RunRecord) -> str:
    """The machine a record came from (store.hardware_text), or that it does not say."""
    text = hardware_text(record.provenance.hardware if record.provenance else None)
    return text or NOT_RECORDED


NOT_RECORDED = "hardware not recorded"


# Every score column is a percentage: intervals are shown within it.
SCORE_RANGE = (0.0, 100.0)


@dataclass
class Cell:
    row: str
    column: str
    value: float | None
    stderr: float | None  # lm-eval's (one seed) or the standard error of the mean over seeds
    n: int | None
    paper: float | None
    run_ids: list[str]
    ci95: float | None = None  # half-width of the 95% t-interval over seeds (two or more)
    n_seeds: int = 0  # seeds whose records gave the value
    # What the records say they scored (scores_stand_ins, data_source); None: no record, or one
    # that predates them.
    stand_in: bool | None = None
    data_source: str | None = None
    # Paired tests on the per-item outputs (judge_columns).
    bold: bool = False  # beats the column's runner-up with McNemar p < 0.05
    p_vs_runner_up: float | None = None
    delta_vs_ref: float | None = None  # minus the reference row, with its 95% paired interval
    delta_vs_ref_low: float | None = None
    delta_vs_ref_high: float | None = None
    hardware: list[str] = field(default_factory=list)  # hardware_of each record, as run_ids

    @property
    def delta(self) -> float | None:
        return None if self.value is None or self.paper is None else self.value - self.paper

    @property
    def interval(self) -> tuple[float | None, float | None]:
        """The 95% CI over seeds, clipped to the score range (None without one)."""
        if self.value is None or self.ci95 is None:
            return None, None
        low, high = SCORE_RANGE
        return max(low, self.value - self.ci95), min(high, self.value + self.ci95)


def _cell_labels(records: list[RunRecord]) -> tuple[bool | None, str | None]:
    labelled = [rec for rec in records if rec.stand_in is not None]
    if not labelled:
        return None, None
    return (any(rec.stand_in for rec in labelled),
            " | ".join(sorted({rec.data_source or "" for rec in labelled})))


def score_of(record: RunRecord,
             metric: str | None = None) -> tuple[float, float | None, int] | None:
    """A record's column score in percent: the mean of its tasks' metric (default: primary).

    Its stderr combines the tasks' stderrs as independent (sqrt of the sum of squares / k).
    None when a task did not report the metric (pass@10 needs k=10 samples per problem).
    """
    values, errors = [], []
    for task in record.column_tasks:
        task_metrics = record.metrics[task]
        key = task_metrics.key(metric)
        if key is None:
            return None
        values.append(task_metrics.metrics[key])
        errors.append(task_metrics.stderr.get(key))
    value = 100 * sum(values) / len(values)
    stderr = (100 * math.sqrt(sum(e * e for e in errors)) / len(errors)
              if all(e is not None for e in errors) else None)
    n = sum(record.metrics[t].n for t in record.column_tasks)
    return value, stderr, n


def mean_ci(values: list[float]) -> tuple[float, float | None, float | None]:
    """Mean, its standard error and the half-width of a 95% t-interval over seeds.

    The spread is None for one seed: one value says nothing about the seed-to-seed variation.
    """
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None, None
    from scipy import stats

    sem = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))
    return mean, sem, float(stats.t.ppf(0.975, len(values) - 1)) * sem


def _score_cell(row: Row, column: Column, records: list[RunRecord]) -> Cell:
    scores = [s for s in (score_of(rec, column.metric) for rec in records) if s is not None]
    value = stderr = ci95 = n = None
    if scores:
        value, stderr, ci95 = mean_ci([s[0] for s in scores])
        n = scores[0][2]
        if len(scores) == 1:
            stderr = scores[0][1]
    return Cell(row.label, column.label, value, stderr, n, row.paper.get(column.key),
                [rec.run_id for rec in records], ci95, len(scores), *_cell_labels(records),
                hardware=[hardware_of(rec) for rec in records])


def _param_cell(row: Row, column: Column, records: list[RunRecord]) -> Cell:
    # An untrained model (the base row) has no adapter: its %Param is not applicable, not 100.
    # A record that predates a count (percent_param_active) leaves the cell empty, not guessed.
    trained = [rec for rec in records if rec.training.trained is not False]
    value = trained[0].training.parameters.get(PARAM_KEYS[column.kind]) if trained else None
    stand_in, data_source = _cell_labels(records)
    return Cell(row.label, column.label, value, None, None, row.paper.get(column.key),
                [rec.run_id for rec in records], n_seeds=len(trained), stand_in=stand_in,
                data_source=data_source, hardware=[hardware_of(rec) for rec in records])


def collect_cells(table: TableSpec, profile: str, seeds: tuple[int, ...], store: RunStore,
                  reference: str | None = None) -> list[Cell]:
    """Every cell of the table, row by row, from the records the store holds, judged by paired
    tests (bold; Δ against the `reference` row's cell when one is named)."""
    labels = [row.label for row in table.rows]
    if reference is not None and reference not in labels:
        raise did_you_mean(f"reference row of {table.name}", reference, labels)
    found = find_records(table, profile, seeds, store)
    make = {"score": _score_cell, "param": _param_cell, "param-active": _param_cell}
    cells = [make[column.kind](row, column, found[(row.label, table.task_of(column))])
             for row in table.rows for column in table.columns]
    judge_columns(table, cells, found, store, reference)
    return cells


def judge_columns(table: TableSpec, cells: list[Cell],
                  found: dict[tuple[str, str], list[RunRecord]], store: RunStore,
                  reference: str | None) -> None:
    """Per score column: bold the best cell only when it beats the runner-up with McNemar's
    p < 0.05 on the items both scored (a tie is never bold); Δ and its paired 95% interval
    against the reference row. Cells without per-sample outputs are not judged."""
    from hydrabench.evaluation.significance import compare_records

    for column in table.columns:
        if column.kind != "score":
            continue
        task = table.task_of(column)
        filled = sorted((c for c in cells if c.column == column.label and c.value is not None),
                        key=lambda c: -c.value)  # type: ignore[operator]
        if len(filled) >= 2 and filled[0].value > filled[1].value:  # type: ignore[operator]
            best = compare_records(found[(filled[0].row, task)], found[(filled[1].row, task)],
                                   store, column.metric)
            if best is not None:
                filled[0].p_vs_runner_up = best.p_value
                filled[0].bold = best.significant and best.delta > 0
        if reference is None:
            continue
        for cell in filled:
            if cell.row == reference:
                continue
            result = compare_records(found[(cell.row, task)], found[(reference, task)], store,
                                     column.metric)
            if result is not None:
                cell.delta_vs_ref = result.delta
                cell.delta_vs_ref_low, cell.delta_vs_ref_high = result.ci_low, result.ci_high
