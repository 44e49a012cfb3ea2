"""Table specs (tasks/tables/*.yaml): the runs a paper table needs and its cells from records.

A row names a method and its adapter settings; a column names a task (a column of the paper's
tables) or a parameter count. The run id of every cell follows from the spec, so a report finds
its records without searching, and a cell without a record stays empty ("—"), never invented.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from hydrabench.evaluate import TASKS_DIR
from hydrabench.spec import RunSpec, SpecError, did_you_mean, load_yaml, resolve_spec
from hydrabench.store import RunStore

TABLES_DIR = TASKS_DIR / "tables"


@dataclass(frozen=True)
class Row:
    label: str
    method: str
    adapter: dict[str, Any] = field(default_factory=dict)
    paper: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Column:
    key: str
    label: str
    kind: str  # "score": a task column scored by lm-eval; "param": %Param of the adapter


@dataclass(frozen=True)
class TableSpec:
    name: str
    title: str
    task: str  # the task whose runs fill param columns
    rows: tuple[Row, ...]
    columns: tuple[Column, ...]

    def run_specs(self, profile: str, seeds: tuple[int, ...] = (0,),
                  valid_methods: list[str] | None = None) -> list[tuple[Row, str, RunSpec]]:
        """(row, task, spec) for every run the table needs: rows × score columns × seeds."""
        tasks = [c.key for c in self.columns if c.kind == "score"] or [self.task]
        return [(row, task, resolve_spec(row.method, task, profile, seed,
                                         overrides={"adapter": row.adapter},
                                         valid_methods=valid_methods))
                for row in self.rows for task in tasks for seed in seeds]


def table_names() -> list[str]:
    return sorted(p.stem for p in TABLES_DIR.glob("*.yaml"))


def load_table(name: str) -> TableSpec:
    if name not in table_names():
        raise did_you_mean("table", name, table_names())
    raw = load_yaml(TABLES_DIR / f"{name}.yaml")
    try:
        return TableSpec(name=raw["name"], title=raw["title"], task=raw["task"],
                         rows=tuple(Row(**r) for r in raw["rows"]),
                         columns=tuple(Column(**c) for c in raw["columns"]))
    except (KeyError, TypeError) as err:
        raise SpecError(f"malformed table spec {TABLES_DIR / f'{name}.yaml'}: {err}") from None


@dataclass
class Cell:
    row: str
    column: str
    value: float | None
    stderr: float | None
    n: int | None
    paper: float | None
    run_ids: list[str]

    @property
    def delta(self) -> float | None:
        return None if self.value is None or self.paper is None else self.value - self.paper


def score_of(record: dict[str, Any]) -> tuple[float, float | None, int]:
    """A record's column score in percent: the mean of its tasks' primary metrics.

    Its stderr combines the tasks' stderrs as independent (sqrt of the sum of squares / k).
    """
    tasks = record["column_tasks"]
    metrics = [record["metrics"][t] for t in tasks]
    value = 100 * sum(m["value"] for m in metrics) / len(metrics)
    errors = [m["stderr"].get(m["primary"]) for m in metrics]
    stderr = (100 * math.sqrt(sum(e * e for e in errors)) / len(errors)
              if all(e is not None for e in errors) else None)
    return value, stderr, sum(m["n"] for m in metrics)


def _mean_ci(values: list[float]) -> tuple[float, float | None]:
    """Mean and the half-width of a 95% t-interval over seeds (None for one seed)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    from scipy import stats

    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return mean, stats.t.ppf(0.975, len(values) - 1) * sd / math.sqrt(len(values))


def collect_cells(table: TableSpec, profile: str, seeds: tuple[int, ...], store: RunStore,
                  valid_methods: list[str] | None = None) -> list[Cell]:
    runs = table.run_specs(profile, seeds, valid_methods)
    cells = []
    for row in table.rows:
        for column in table.columns:
            task = column.key if column.kind == "score" else table.task
            found = [store.load(spec.run_id) for r, t, spec in runs
                     if r is row and t == task and store.has(spec.run_id)]
            value = stderr = n = None
            if found and column.kind == "score":
                scores = [score_of(rec) for rec in found]
                value, ci = _mean_ci([s[0] for s in scores])
                stderr = ci if len(found) > 1 else scores[0][1]
                n = scores[0][2]
            elif found:
                value = found[0]["training"]["parameters"]["percent_param"]
            cells.append(Cell(row.label, column.label, value, stderr, n,
                              row.paper.get(column.key), [rec["run_id"] for rec in found]))
    return cells
