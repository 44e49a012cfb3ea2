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

from hydrabench.atomic import atomic_path, write_text_atomic
from hydrabench.profiles import load_profile
from hydrabench.report import (
    STAND_IN_NOTE,
    fmt,
    provenance_lines,
    runs_lines,
    spread_of,
    tidy_frame,
    write_table_files,
)
from hydrabench.store import RunRecord, RunStore
from hydrabench.tables import TableSpec, collect_cells, find_records, mean_ci

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


def _wrap(label: str) -> str:
    """Tick label lines: the parenthesised part on a line of its own, lines of <= 12 chars."""
    name, paren, rest = label.partition(" (")
    return "\n".join(textwrap.fill(part, 12) for part in (name, paren.strip() + rest) if part)


def _caption(table: TableSpec, profile: str, seeds: tuple[int, ...], error_bars: str,
             cells: pd.DataFrame) -> str:
    """Footer text: what the bars come from (stand-in tasks as the records `cells` come from
    say), and the paper's statements about the figure."""
    lines = [f"profile {profile} · model {load_profile(profile).model} · "
             f"seeds {','.join(map(str, seeds))} · error bars: {error_bars}"]
    if (cells["stand_in"] == True).any():  # noqa: E712
        lines.append(STAND_IN_NOTE)
    return "\n".join([*lines, *table.notes])


def _bars(ax: Axes, positions: list[float], values: list[float | None],
          errors: list[float | None], colors: list[str], missing: list[str], width: float,
          number: str, hatches: list[str | None] | None = None) -> None:
    """Bars where a value exists, each labelled with it; where none does, its `missing` text."""
    hatches = hatches or [None] * len(positions)
    for x, v, e, color, why, hatch in zip(positions, values, errors, colors, missing, hatches,
                                          strict=True):
        if pd.isna(v):
            ax.text(x, 0, why, rotation=90, ha="center", va="bottom", fontsize=8, color="dimgray")
            continue
        error = None if pd.isna(e) else e
        ax.bar(x, v, width, yerr=error, capsize=3, color=color, hatch=hatch, edgecolor="black",
               linewidth=0.6)
        # Above the error bar, which would otherwise strike through the number.
        ax.annotate(format(v, number), (x, v + (error or 0)), xytext=(0, 2),
                    textcoords="offset points", ha="center", va="bottom", fontsize=8)


def _save(fig: Figure, path: Path) -> None:
    """Render with Agg (no display needed) to a temp file renamed into place."""
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        # "tight" grows the canvas to take in the caption placed below the axes.
        fig.savefig(tmp, format=path.suffix[1:], dpi=150, bbox_inches="tight")


# -- Fig. 5 ------------------------------------------------------------------------------------


def plot_figure5(frame: pd.DataFrame, title: str, caption: str) -> Figure:
    fig = Figure(figsize=(11, 5.2), layout="constrained")
    ax_energy, ax_time = fig.subplots(1, 2)
    x = list(range(len(frame)))
    colors = [COLORS[i % len(COLORS)] for i in x]
    hatches = [ESTIMATED_HATCH if s == "estimated" else None for s in frame["energy_source"]]
    _bars(ax_energy, x, list(frame["energy_kwh"]), list(frame["energy_ci95"]), colors,
          list(frame["note"]), 0.7, ".3g", hatches)
    _bars(ax_time, x, list(frame["train_wall_s"]), list(frame["train_wall_ci95"]), colors,
          list(frame["note"]), 0.7, ".3g")
    for ax, ylabel in ((ax_energy, "training energy (kWh)"), (ax_time, "training time (s)")):
        ax.set_xticks(x, [_wrap(m) for m in frame["method"]], fontsize=9)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
        ax.margins(y=0.15)
    ax_energy.set_title("Energy")
    ax_time.set_title("Time (wall clock, measured)")
    fig.legend(handles=[
        Patch(facecolor="white", edgecolor="black", label="energy measured\n(NVML / RAPL)"),
        Patch(facecolor="white", edgecolor="black", hatch=ESTIMATED_HATCH,
              label="energy estimated\n(CodeCarbon model)")],
        fontsize=8, loc="outside right upper")
    fig.suptitle(title)
    fig.text(0.01, 0.0, caption, fontsize=7.5, va="top", ha="left", color="dimgray")
    return fig


def write_figure5(table: TableSpec, profile: str, seeds: tuple[int, ...], store: RunStore,
                  out_dir: Path) -> list[Path]:
    """reports/figure5.{png,pdf,csv,md}: training energy and time per method."""
    frame = figure5_frame(table, profile, seeds, store)
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
    """One panel per column; per variant our bar (mean, 95% CI) beside the paper's."""
    fig = Figure(figsize=(12, 5.2), layout="constrained")
    axes = fig.subplots(1, len(table.columns), sharey=True, squeeze=False)[0]
    labels = [r.label for r in table.rows]
    x = list(range(len(labels)))
    width = 0.38
    for ax, column in zip(axes, table.columns, strict=True):
        part = tidy[tidy["column"] == column.label].set_index("row").reindex(labels)
        _bars(ax, [p - width / 2 for p in x], list(part["value"]), list(spread_of(part)),
              [COLORS[0]] * len(x), ["no run"] * len(x), width, ".1f")
        _bars(ax, [p + width / 2 for p in x], list(part["paper_value"]), [None] * len(x),
              [PAPER_COLOR] * len(x), ["not in paper"] * len(x), width, ".1f")
        ax.set_title(column.label)
        ax.set_xticks(x, [_wrap(label) for label in labels], fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        ax.margins(y=0.12)
    axes[0].set_ylabel("score (%)")
    fig.legend(handles=[Patch(facecolor=COLORS[0], edgecolor="black", label="ours"),
                        Patch(facecolor=PAPER_COLOR, edgecolor="black", label="paper")],
               fontsize=8, loc="outside right upper")
    fig.suptitle(table.title)
    fig.text(0.01, 0.0, caption, fontsize=7.5, va="top", ha="left", color="dimgray")
    return fig


def write_figure6(table: TableSpec, profile: str, seeds: tuple[int, ...], store: RunStore,
                  out_dir: Path) -> list[Path]:
    """reports/figure6.{md,csv,tex} (the numbers, as a table report) plus .png and .pdf."""
    tidy = tidy_frame(collect_cells(table, profile, seeds, store))
    paths = write_table_files(table, tidy, profile, seeds, out_dir)
    fig = plot_figure6(table, tidy, _caption(table, profile, seeds,
                                             "95% CI over seeds (one seed: lm-eval stderr)", tidy))
    for ext in ("png", "pdf"):
        paths.append(out_dir / f"{table.name}.{ext}")
        _save(fig, paths[-1])
    return paths


FIGURES: dict[str, Callable[[TableSpec, str, tuple[int, ...], RunStore, Path], list[Path]]] = {
    "figure5": write_figure5, "figure6": write_figure6}
