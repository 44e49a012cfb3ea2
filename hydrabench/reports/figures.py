"""The paper's figures from run records: Fig. 5 (training cost) and Fig. 6 (ablation).

Each writes reports/<figure>.png and .pdf plus the numbers behind the bars (.csv) and a
Markdown page stating profile, model, seeds and run ids. A bar without a record is left out and
marked on the axis, never drawn from anything else; an energy bar is hatched unless every
component of it was measured.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from hydrabench.atomic import atomic_path, write_text_atomic
from hydrabench.config.profiles import load_profile
from hydrabench.config.tables import TableSpec
from hydrabench.errors import SpecError
from hydrabench.records.store import RunRecord, RunStore
from hydrabench.reports.cells import collect_cells, find_records, mean_ci
from hydrabench.reports.tables import (
    STAND_IN_NOTE,
    fmt,
    provenance_lines,
    runs_lines,
    spread_of,
    tidy_frame,
    write_table_files,
)

COLORS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3")
PAPER_COLOR = "#BBBBBB"
ESTIMATED_HATCH = "///"


# -- Fig. 5: numbers ---------------------------------------------------------------------------


def energy_source(energy: dict[str, Any]) -> str:
    """The source label of one phase's energy: measured, estimated or unavailable.

    A total with any estimated component (CodeCarbon's CPU or RAM model) counts as estimated.
    """
    if energy.get("total_kwh") is None:
        return "unavailable"
    return "measured" if energy.get("energy_measured") else "estimated"


def _component_sources(energies: list[dict[str, Any]]) -> str:
    """Each component's sources over the seeds, e.g. "gpu=measured:nvml; cpu=estimated:..."."""
    parts = []
    for part in ("gpu", "cpu", "ram"):
        sources = sorted({e.get(f"{part}_source") or "unknown" for e in energies})
        parts.append(f"{part}={','.join(sources)}")
    return "; ".join(parts)


def _mean_and_ci(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean, _, ci95 = mean_ci(values)
    return mean, ci95


def training_cost(label: str, records: list[RunRecord]) -> dict[str, Any]:
    """One bar pair of Fig. 5: training energy and wall time, mean and 95% CI over seeds."""
    phases = [rec.metering.train for rec in records]
    trained = [p for p in phases if p]
    energies = [p["energy"] for p in trained if p["energy"].get("total_kwh") is not None]
    sources = {energy_source(e) for e in energies}
    kwh, kwh_ci = _mean_and_ci([e["total_kwh"] for e in energies])
    wall, wall_ci = _mean_and_ci([p["throughput"]["wall_s"] for p in trained])
    tokens_per_s, _ = _mean_and_ci([p["throughput"]["tokens_per_s"] for p in trained])
    note = ("no record" if not records else "not trained" if not trained
            else "energy unavailable" if not energies else "")
    return {
        "method": label, "energy_kwh": kwh, "energy_ci95": kwh_ci,
        # Averaged over seeds, one estimate makes the mean an estimate.
        "energy_source": ("unavailable" if not energies
                          else "estimated" if "estimated" in sources else "measured"),
        "energy_components": _component_sources([p["energy"] for p in trained]) if trained else "",
        "train_wall_s": wall, "train_wall_ci95": wall_ci, "tokens_per_s": tokens_per_s,
        "n_seeds": len(trained), "run_id": ";".join(rec.run_id for rec in records),
        "note": note}


def figure5_frame(table: TableSpec, profile: str, seeds: tuple[int, ...],
                  store: RunStore) -> pd.DataFrame:
    found = find_records(table, profile, seeds, store)
    return pd.DataFrame([training_cost(row.label, found[(row.label, table.task)])
                         for row in table.rows])


# -- plotting helpers --------------------------------------------------------------------------

# One column of a two-column paper (ACL, NeurIPS, IEEE: 3.25-3.33 in): the figure is drawn at the
# size it is printed, so its 6-7 pt text stays readable when pasted, and saved at that size.
COLUMN_WIDTH_IN = 3.3
FONT_PT = 6.5
VALUE_PT = 5.0  # the numbers at the bars' ends
DPI = 300


class NoFigureData(SpecError):
    """No record to draw a figure from: one line, exit 2, nothing written."""


def _wrap(label: str, width: int = 16) -> str:
    """Tick label lines: the parenthesised part on a line of its own, lines of <= `width`."""
    name, paren, rest = label.partition(" (")
    return "\n".join(textwrap.fill(part, width) for part in (name, paren.strip() + rest) if part)


def _caption(table: TableSpec, profile: str, seeds: tuple[int, ...], error_bars: str,
             cells: pd.DataFrame) -> str:
    """Footer text, wrapped to the column: what the bars come from (stand-in tasks as the
    records `cells` come from say), and the paper's statements about the figure."""
    lines = [f"profile {profile} · model {load_profile(profile).model} · "
             f"seeds {','.join(map(str, seeds))} · error bars: {error_bars}"]
    if (cells["stand_in"] == True).any():  # noqa: E712
        lines.append(STAND_IN_NOTE)
    return "\n".join(textwrap.fill(line, 80) for line in [*lines, *table.notes])


def _no_data(table: TableSpec, profile: str, seeds: tuple[int, ...], store: RunStore,
             what: str) -> NoFigureData:
    return NoFigureData(
        f"{table.name}: no {what} for profile {profile}, seeds {','.join(map(str, seeds))} in "
        f"{store.root}; run `hydrabench reproduce {table.name} --profile {profile}` first "
        f"(nothing written)")


def energy_unit(largest_kwh: float | None) -> tuple[str, float]:
    """The unit (and factor from kWh) in which the largest bar is >= 1: a small run's 2e-5 kWh
    reads as 20 mWh, with short tick labels and no ×10⁻⁵ offset squeezed beside the axis."""
    for unit, scale in (("kWh", 1.0), ("Wh", 1e3), ("mWh", 1e6)):
        if largest_kwh is None or pd.isna(largest_kwh) or largest_kwh * scale >= 1:
            return unit, scale
    return "mWh", 1e6


def _hbars(ax: Axes, positions: list[float], values: list[float | None],
           errors: list[float | None], colors: list[str], height: float, number: str,
           hatches: list[str | None] | None = None) -> None:
    """Horizontal bars where a value exists, each labelled with it at its end."""
    hatches = hatches or [None] * len(positions)
    for y, v, e, color, hatch in zip(positions, values, errors, colors, hatches, strict=True):
        if pd.isna(v):
            continue
        error = None if pd.isna(e) else e
        ax.barh(y, v, height, xerr=error, capsize=1.5, color=color, hatch=hatch,
                edgecolor="black", linewidth=0.4, error_kw={"elinewidth": 0.6})
        # Past the error bar, which would otherwise strike through the number.
        ax.annotate(format(v, number), (v + (error or 0), y), xytext=(1.5, 0),
                    textcoords="offset points", ha="left", va="center", fontsize=VALUE_PT)


def _missing_text(ax: Axes, y: float, text: str) -> None:
    ax.text(0, y, f" {text}", ha="left", va="center", fontsize=VALUE_PT, color="dimgray")


def _style(ax: Axes, xlabel: str) -> None:
    ax.set_xlabel(xlabel, fontsize=FONT_PT)
    ax.tick_params(labelsize=FONT_PT, length=2, pad=1.5)
    # Three ticks at most: more would touch at a column's width.
    ax.xaxis.set_major_locator(MaxNLocator(nbins=3, min_n_ticks=2))
    ax.grid(axis="x", alpha=0.3, linewidth=0.4)
    ax.set_axisbelow(True)
    # Bars start at 0 and nothing is negative: the axis never shows what no value can be.
    if ax.has_data():
        ax.set_xlim(0, ax.get_xlim()[1] * 1.3)  # room for the numbers at the bars' ends
    else:  # nothing to measure: no scale either
        ax.set_xlim(0, 1)
        ax.set_xticks([])


def _rows(ax: Axes, labels: list[str], width: int) -> None:
    """The rows' labels, once, at the left, in the table's order top to bottom; room below the
    last row so that its label (two or three lines) stays clear of the x axis' first number."""
    ax.set_yticks(range(len(labels)), [_wrap(label, width) for label in labels])
    ax.set_ylim(len(labels) - 0.1, -0.6)


def _figure(height_in: float) -> Figure:
    return Figure(figsize=(COLUMN_WIDTH_IN, height_in), layout="constrained", dpi=DPI)


def _footer(fig: Figure, title: str, caption: str) -> None:
    """The title and provenance below the plot, inside the figure (supxlabel takes part in the
    constrained layout): a paper sets its own caption, and a title above would meet the legend."""
    fig.supxlabel(f"{title}\n{caption}", fontsize=VALUE_PT, x=0.0, ha="left", color="dimgray",
                  multialignment="left")


def _save(fig: Figure, path: Path) -> None:
    """Render with Agg (no display needed) to a temp file renamed into place, at the size drawn
    (the column width), not cropped or grown."""
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix[1:], dpi=DPI)


# -- Fig. 5 ------------------------------------------------------------------------------------


def plot_figure5(frame: pd.DataFrame, title: str, caption: str) -> Figure:
    """Energy and time panels side by side, one horizontal bar per method (labels read
    across, once, at the left); a method without a bar says why in its row."""
    fig = _figure(1.6 + 0.25 * len(frame))
    ax_energy, ax_time = fig.subplots(1, 2, sharey=True)
    y = list(range(len(frame)))
    colors = [COLORS[i % len(COLORS)] for i in y]
    hatches = [ESTIMATED_HATCH if s == "estimated" else None for s in frame["energy_source"]]
    unit, scale = energy_unit(frame["energy_kwh"].max())
    _hbars(ax_energy, y, list(frame["energy_kwh"] * scale), list(frame["energy_ci95"] * scale),
           colors, 0.7, ".3g", hatches)
    _hbars(ax_time, y, list(frame["train_wall_s"]), list(frame["train_wall_ci95"]), colors, 0.7,
           ".3g")
    for ax, column in ((ax_energy, "energy_kwh"), (ax_time, "train_wall_s")):
        for row, value, note in zip(y, frame[column], frame["note"], strict=True):
            if pd.isna(value):
                _missing_text(ax, row, note or "unavailable")
    _style(ax_energy, f"training energy ({unit})")
    _style(ax_time, "training time (s)")
    _rows(ax_energy, list(frame["method"]), 16)
    fig.legend(handles=[
        Patch(facecolor="white", edgecolor="black", label="measured (NVML / RAPL)"),
        Patch(facecolor="white", edgecolor="black", hatch=ESTIMATED_HATCH,
              label="estimated (CodeCarbon)")],
        fontsize=VALUE_PT, loc="outside upper center", ncols=2, frameon=False,
        title="energy", title_fontsize=VALUE_PT)
    _footer(fig, title, caption)
    return fig


def write_figure5(table: TableSpec, profile: str, seeds: tuple[int, ...], store: RunStore,
                  out_dir: Path) -> list[Path]:
    """reports/figure5.{png,pdf,csv,md}: training energy and time per method."""
    frame = figure5_frame(table, profile, seeds, store)
    if frame["train_wall_s"].isna().all():
        raise _no_data(table, profile, seeds, store, "trained run records")
    cells = tidy_frame(collect_cells(table, profile, seeds, store))  # what the records say
    paths = [out_dir / f"{table.name}.{ext}" for ext in ("png", "pdf", "csv", "md")]
    fig = plot_figure5(frame, f"{table.title} ({table.task})",
                       _caption(table, profile, seeds, "95% CI over seeds", cells))
    for path in paths[:2]:
        _save(fig, path)
    write_text_atomic(paths[2], frame.to_csv(index=False))
    shown = pd.DataFrame({
        "method": frame["method"],
        # 3 significant digits: a small run's energy is 1e-5 kWh, which 2 decimals would zero.
        "energy (kWh)": [fmt(v, e, ".3g") for v, e in zip(frame["energy_kwh"],
                                                          frame["energy_ci95"], strict=True)],
        "energy source": frame["energy_source"], "components": frame["energy_components"],
        "training time (s)": [fmt(v, e, ".3g") for v, e in zip(frame["train_wall_s"],
                                                               frame["train_wall_ci95"],
                                                               strict=True)],
        "tokens/s": [fmt(v, None, ".3g") for v in frame["tokens_per_s"]],
        "seeds": frame["n_seeds"],
        "note": frame["note"]})
    write_text_atomic(paths[3], "\n".join([
        f"# {table.title}", "", *provenance_lines(profile, seeds, cells),
        f"- training phase of the `{table.task}` runs; ± is the 95% CI over seeds",
        "- energy source: `measured` when every component came from hardware counters "
        "(NVML, RAPL), `estimated` when any came from CodeCarbon's model (bars hatched)",
        *(f"- {note}" for note in table.notes), *runs_lines(frame["run_id"]),
        f"![{table.title}]({paths[0].name})", "",
        shown.to_markdown(index=False, disable_numparse=True), ""]))
    return paths


# -- Fig. 6 ------------------------------------------------------------------------------------


def plot_figure6(table: TableSpec, tidy: pd.DataFrame, caption: str) -> Figure:
    """Two panels, ours and the paper's, each with a group of horizontal bars per variant (one
    bar per column). Scores of stand-in tasks get their own axis: they measure something else
    than the paper's, so no axis puts them side by side; real tasks share the paper's axis."""
    stand_in = bool((tidy["stand_in"] == True).any())  # noqa: E712
    labels = [r.label for r in table.rows]
    fig = _figure(1.5 + 0.32 * len(labels))
    ax_ours, ax_paper = fig.subplots(1, 2, sharey=True, sharex=not stand_in)
    n = len(table.columns)
    height = 0.8 / n
    for k, column in enumerate(table.columns):
        part = tidy[tidy["column"] == column.label].set_index("row").reindex(labels)
        y = [i - 0.4 + height * (k + 0.5) for i in range(len(labels))]
        color = [COLORS[k % len(COLORS)]] * len(labels)
        _hbars(ax_ours, y, list(part["value"]), list(spread_of(part)), color, height, ".1f")
        _hbars(ax_paper, y, list(part["paper_value"]), [None] * len(labels), color, height,
               ".1f")
    for ax, key, why in ((ax_ours, "value", "no run"), (ax_paper, "paper_value", "not in paper")):
        have = tidy.pivot_table(index="row", columns="column", values=key, aggfunc="count",
                                dropna=False).reindex(labels).fillna(0).sum(axis=1)
        for i, label in enumerate(labels):
            if have[label] == 0:
                _missing_text(ax, i, why)
    _style(ax_ours, "stand-in score (%)" if stand_in else "score (%)")
    _style(ax_paper, "score (%)")
    ax_ours.set_title("ours, stand-in tasks" if stand_in else "ours", fontsize=FONT_PT)
    ax_paper.set_title("paper", fontsize=FONT_PT)
    _rows(ax_ours, labels, 18)
    fig.legend(handles=[Patch(facecolor=COLORS[k % len(COLORS)], edgecolor="black",
                              label=column.label) for k, column in enumerate(table.columns)],
               fontsize=VALUE_PT, loc="outside upper center", ncols=n, frameon=False)
    _footer(fig, table.title, caption)
    return fig


def write_figure6(table: TableSpec, profile: str, seeds: tuple[int, ...], store: RunStore,
                  out_dir: Path) -> list[Path]:
    """reports/figure6.{md,csv,tex} (the numbers, as a table report) plus .png and .pdf."""
    tidy = tidy_frame(collect_cells(table, profile, seeds, store))
    if tidy["value"].isna().all():
        raise _no_data(table, profile, seeds, store, "scored run records")
    fig = plot_figure6(table, tidy, _caption(table, profile, seeds,
                                             "95% CI over seeds (one seed: lm-eval stderr)", tidy))
    paths = write_table_files(table, tidy, profile, seeds, out_dir)
    for ext in ("png", "pdf"):
        paths.append(out_dir / f"{table.name}.{ext}")
        _save(fig, paths[-1])
    return paths


# A table spec's `render:` kind → the writer of its figure.
FIGURES: dict[str, Callable[[TableSpec, str, tuple[int, ...], RunStore, Path], list[Path]]] = {
    "training-cost": write_figure5, "ablation-bars": write_figure6}
