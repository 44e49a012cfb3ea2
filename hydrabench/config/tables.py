"""Table specs (tasks/tables/*.yaml): the rows, columns and seeds a paper table needs.

A row names a method and its adapter settings, and, where its paper numbers come from another
paper, model or protocol than the table's, that source; a column names a task (a column of the
paper's tables), optionally one metric of it, or a parameter count (total, or what one token
activates). The runs a table needs follow from the spec (hydrabench.pipeline.resolve.table_runs),
so a report finds its records without searching. Figures are specs too (`render:`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydrabench.config.includes import table_files
from hydrabench.config.profiles import load_yaml
from hydrabench.errors import SpecError, did_you_mean

# `render:` values of a table spec: the table itself, Fig. 5's training energy and time bars,
# Fig. 6's ablation bars (reports/figures.py draws the last two).
RENDER_KINDS = ("table", "training-cost", "ablation-bars")


@dataclass(frozen=True)
class Row:
    label: str
    method: str
    adapter: dict[str, Any] = field(default_factory=dict)
    paper: dict[str, float] = field(default_factory=dict)
    # Where `paper` comes from when not from the table's own paper: "paper, table, model,
    # protocol". Reports mark the row's paper numbers and print the source under the table.
    source: str = ""


# Column kinds: a task's score; the adapter's %Param (its total); the %Param one token's forward
# uses (differs from the total for methods that select per token: top-k experts, FlyLoRA).
COLUMN_KINDS = ("score", "param", "param-active")


# The record's parameter count each parameter column reads (Method.parameter_counts).
PARAM_KEYS = {"param": "percent_param", "param-active": "percent_param_active"}


@dataclass(frozen=True)
class Column:
    key: str  # names the column in rows' `paper` values
    label: str
    kind: str  # one of COLUMN_KINDS
    task: str | None = None  # the task whose runs score it (default: key; param: the table's)
    # An lm-eval metric name ("pass@10") or "metric,filter" key, instead of each task's primary
    # metric: one task can then fill several columns (HumanEval P@1 and P@10).
    metric: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in COLUMN_KINDS:
            raise SpecError(f"column {self.key!r}: kind must be one of {', '.join(COLUMN_KINDS)}"
                            f", got {self.kind!r}")


@dataclass(frozen=True)
class TableSpec:
    name: str
    title: str
    task: str  # the task whose runs fill param columns
    rows: tuple[Row, ...]
    columns: tuple[Column, ...]
    notes: tuple[str, ...] = ()  # printed under the report's header
    # Eval settings every run of a task needs, e.g. {code: {allow_code_execution: true}}. They
    # are part of the run id, so reproduce and report resolve the same runs from the spec.
    eval_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    # What `report` draws from the cells: a table (md, csv, tex) or one of the figure kinds.
    render: str = "table"
    # The seeds `reproduce` and `sweep` run when --seeds is not given.
    seeds: tuple[int, ...] = (0,)

    def __post_init__(self) -> None:
        if self.render not in RENDER_KINDS:
            raise SpecError(f"render must be one of {', '.join(RENDER_KINDS)}, "
                            f"got {self.render!r}")
        if len({row.source for row in self.rows if row.source}) > len(SOURCE_MARKS):
            raise SpecError(f"at most {len(SOURCE_MARKS)} distinct row sources")
        if not self.seeds or not all(type(s) is int and s >= 0 for s in self.seeds):
            raise SpecError(f"seeds must be a non-empty list of integers >= 0, got "
                            f"{list(self.seeds)}")

    def task_of(self, column: Column) -> str:
        return column.task or (column.key if column.kind == "score" else self.task)

    def sources(self) -> dict[str, str]:
        """Each distinct row source → its mark (a, b, ...), in row order."""
        found = dict.fromkeys(row.source for row in self.rows if row.source)
        return {source: SOURCE_MARKS[i] for i, source in enumerate(found)}

    def tasks(self) -> list[str]:
        """The tasks the table's runs cover, in column order, each once."""
        return list(dict.fromkeys(self.task_of(c) for c in self.columns))


# What marks a row's paper numbers taken from another paper or setup: a superscript letter,
# which reads in Markdown and LaTeX alike.
SOURCE_MARKS = "ᵃᵇᶜᵈᵉᶠᵍʰⁱʲᵏˡᵐⁿᵒᵖʳˢᵗᵘᵛʷˣʸᶻ"


def table_names() -> list[str]:
    """The shipped tables and figures (tasks/tables) and the included folders' (their tables/)."""
    return sorted(table_files())


def load_table(name: str) -> TableSpec:
    files = table_files()
    if name not in files:
        raise did_you_mean("table", name, sorted(files))
    raw = load_yaml(files[name])
    try:
        return TableSpec(name=raw["name"], title=raw["title"], task=raw["task"],
                         rows=tuple(Row(**r) for r in raw["rows"]),
                         columns=tuple(Column(**c) for c in raw["columns"]),
                         notes=tuple(raw.get("notes", ())),
                         eval_overrides=raw.get("eval_overrides", {}),
                         render=raw.get("render", "table"),
                         seeds=tuple(raw.get("seeds", (0,))))
    except (KeyError, TypeError, SpecError) as err:
        raise SpecError(f"malformed table spec {files[name]}: {err}") from None
