"""Figures a researcher can paste (issue 31): drawn at a paper's column width with no text on
other text or off the figure, stand-in scores never on the paper's axis, no negative energy
axis, and no figure at all (one line, exit 2, nothing written) where there are no records."""

import itertools
import struct
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.text import Text
from test_report import PROFILE, STAND_IN, fill, make_record, train_metering

from hydrabench.atomic import write_json_atomic
from hydrabench.cli import main
from hydrabench.config import includes
from hydrabench.config.tables import TableSpec, load_table
from hydrabench.errors import SpecError
from hydrabench.paths import TASKS_DIR
from hydrabench.pipeline.resolve import table_runs
from hydrabench.records.store import RunStore
from hydrabench.reports import write_report
from hydrabench.reports.cells import collect_cells
from hydrabench.reports.figures import (
    COLUMN_WIDTH_IN,
    DPI,
    NoFigureData,
    energy_unit,
    plot_figure5,
    plot_figure6,
    write_figure5,
    write_figure6,
)
from hydrabench.reports.tables import tidy_frame


def fill_stand_ins(store: RunStore, table: TableSpec, skip: set[str] = frozenset()) -> None:
    """Records of every row but `skip`, labelled as scored on stand-in tasks."""
    for i, (row, _, spec) in enumerate(table_runs(table, PROFILE)):
        if row.label not in skip:
            write_json_atomic(store.record_path(spec.run_id), {**make_record(spec, i), **STAND_IN})


def fill_costs(store: RunStore, cost: dict[str, tuple[float | None, float, bool]]) -> None:
    for row, _, spec in table_runs(load_table("figure5"), PROFILE):
        if row.label in cost:
            write_json_atomic(store.record_path(spec.run_id),
                              make_record(spec, 0, metering=train_metering(*cost[row.label])))


def _ticks(axis: Any) -> list[Text]:
    """The tick labels drawn: those of ticks inside the axis' view (the locator's others are
    never drawn)."""
    low, high = sorted(axis.get_view_interval())
    return [tick.label1 for tick in axis.get_major_ticks()
            if tick.get_loc() is not None and low - 1e-9 <= tick.get_loc() <= high + 1e-9]


def texts(fig: Figure) -> list[Text]:
    """Every piece of text drawn, after a draw (so tick labels are placed and laid out)."""
    FigureCanvasAgg(fig).draw()
    drawn = [fig.get_supxlabel() and fig._supxlabel, fig._suptitle]
    for legend in fig.legends:
        drawn += [*legend.get_texts(), legend.get_title()]
    for ax in fig.axes:
        drawn += [ax.title, ax.xaxis.label, ax.yaxis.label, *ax.texts,
                  *_ticks(ax.xaxis), *_ticks(ax.yaxis)]
    return [t for t in drawn if t is not None and t.get_visible() and t.get_text().strip()]


def assert_pasteable(fig: Figure) -> None:
    """At a column's width, every text inside the figure and no two texts on each other."""
    assert fig.get_size_inches()[0] == COLUMN_WIDTH_IN
    shown = texts(fig)
    renderer = fig.canvas.get_renderer()
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in shown]
    for text, box in boxes:
        assert fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1, f"{text!r} leaves the figure"
        assert fig.bbox.y0 <= box.y0 and box.y1 <= fig.bbox.y1, f"{text!r} leaves the figure"
    for (a, box_a), (b, box_b) in itertools.combinations(boxes, 2):
        assert not box_a.overlaps(box_b), f"{a!r} overlaps {b!r}"
    # The tick labels read across (no rotation) and are at least 6 pt.
    for ax in fig.axes:
        for label in _ticks(ax.xaxis) + _ticks(ax.yaxis):
            if label.get_visible() and label.get_text():
                assert label.get_rotation() == 0 and label.get_fontsize() >= 6


def png_width_px(path: Path) -> int:
    return struct.unpack(">I", path.read_bytes()[16:20])[0]


def bar_lengths(ax: Axes) -> list[float]:
    return [p.get_width() for p in ax.patches if isinstance(p, Rectangle)]


def test_figure6_of_stand_ins_pastes_with_paper_values_apart(store: RunStore,
                                                              tmp_path: Path) -> None:
    table = load_table("figure6")
    fill_stand_ins(store, table, skip={"w/o gate (uniform)"})
    tidy = tidy_frame(collect_cells(table, PROFILE, (0,), store))
    fig = plot_figure6(table, tidy, "caption")
    assert_pasteable(fig)
    ours, paper = fig.axes
    # The stand-in scores and the paper's are on two axes that share no scale.
    assert not ours.get_shared_x_axes().joined(ours, paper)
    assert "stand-in" in ours.get_title() and "stand-in" in ours.get_xlabel()
    assert "stand-in" not in paper.get_title()
    assert sorted(bar_lengths(ours)) == pytest.approx(sorted(tidy["value"].dropna()))
    assert sorted(bar_lengths(paper)) == pytest.approx(sorted(tidy["paper_value"].dropna()))
    assert 42.18 not in bar_lengths(ours) and 42.18 in bar_lengths(paper)
    # Rows without a record or a paper value say so in their row, and every row is labelled.
    shown = [t.get_text() for t in texts(fig)]
    assert shown.count(" no run") == 1 and shown.count(" not in paper") == 2
    assert {label.get_text().replace("\n", " ") for label in ours.get_yticklabels()} == {
        row.label for row in table.rows}
    # Both files, the PNG at the column's width (3.3 in at 300 dpi).
    paths = {p.suffix: p for p in write_figure6(table, PROFILE, (0,), store, tmp_path / "r")}
    assert paths[".pdf"].read_bytes().startswith(b"%PDF")
    assert png_width_px(paths[".png"]) == round(COLUMN_WIDTH_IN * DPI)


def test_figure6_of_real_tasks_shares_the_papers_axis(store: RunStore) -> None:
    table = load_table("figure6")
    fill(store, table)  # records that say nothing of stand-ins
    fig = plot_figure6(table, tidy_frame(collect_cells(table, PROFILE, (0,), store)), "caption")
    assert_pasteable(fig)
    ours, paper = fig.axes
    assert ours.get_shared_x_axes().joined(ours, paper)
    assert "stand-in" not in ours.get_title() + ours.get_xlabel()


@pytest.mark.parametrize("cost", [
    # A small run's energy (2e-5 kWh), one estimated, one without energy, one without a record.
    {"LoRA (r=8)": (2e-5, 30.0, True), "LoRA (r=16)": (3e-5, 40.0, False),
     "LoRA-Split (4×8)": (None, 80.0, False), "HydraLoRA (r=8, N=auto)": (2.5e-5, 35.0, True)},
    # No energy at all (CodeCarbon off, no counters): the axis still starts at 0.
    {"LoRA (r=8)": (None, 30.0, False), "LoRA (r=16)": (None, 40.0, False)},
])
def test_figure5_pastes_and_its_energy_axis_is_never_negative(
        store: RunStore, tmp_path: Path, cost: dict[str, Any]) -> None:
    fill_costs(store, cost)
    paths = write_figure5(load_table("figure5"), PROFILE, (0,), store, tmp_path)
    frame = pd.read_csv(paths[2])
    fig = plot_figure5(frame, "title", "caption")
    assert_pasteable(fig)
    energy, time = fig.axes
    for ax in (energy, time):
        assert ax.get_xlim()[0] == 0 and ax.get_xlim()[1] > 0
        assert all(tick >= 0 for tick in ax.get_xticks() if ax.get_xlim()[0] <= tick)
    unit, scale = energy_unit(frame["energy_kwh"].max())
    assert unit in energy.get_xlabel()
    assert sorted(bar_lengths(energy)) == pytest.approx(sorted(frame["energy_kwh"].dropna()
                                                               * scale))
    assert png_width_px(paths[0]) == round(COLUMN_WIDTH_IN * DPI)
    assert paths[1].read_bytes().startswith(b"%PDF")


def test_energy_unit_keeps_numbers_short() -> None:
    assert energy_unit(2e-5) == ("mWh", 1e6)
    assert energy_unit(0.004) == ("Wh", 1e3)
    assert energy_unit(1.5) == ("kWh", 1.0)
    assert energy_unit(float("nan")) == ("kWh", 1.0)


@pytest.mark.parametrize("name", ["figure5", "figure6"])
def test_no_figure_from_no_records(name: str, store_env: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", name]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.splitlines()
    assert line.startswith(f"hydrabench: error: {name}: no ") and "hydrabench reproduce" in line
    reports = store_env / "reports"
    assert not reports.exists() or not [p for p in reports.iterdir()
                                        if not p.name.startswith(".")]


def test_no_figure_from_untrained_records(store: RunStore, tmp_path: Path) -> None:
    """Records without a training phase give Fig. 5 nothing to draw either."""
    for _, _, spec in table_runs(load_table("figure5"), PROFILE):
        write_json_atomic(store.record_path(spec.run_id), make_record(spec, 0))
    with pytest.raises(NoFigureData, match="figure5: no trained run records"):
        write_figure5(load_table("figure5"), PROFILE, (0,), store, tmp_path)
    assert list(tmp_path.iterdir()) == [tmp_path / "results"]



def test_a_figure_is_chosen_by_the_spec_s_render_key_not_its_name(tmp_path: Path) -> None:
    """Fig. 5's spec under another name, in a user's folder, is still drawn as Fig. 5: the
    dispatcher reads `render:`, not the name (no records: the figure's own refusal)."""
    raw = yaml.safe_load((TASKS_DIR / "tables" / "figure5.yaml").read_text(encoding="utf-8"))
    (tmp_path / "tables").mkdir()
    (tmp_path / "tables" / "my_costs.yaml").write_text(
        yaml.safe_dump({**raw, "name": "my_costs"}), encoding="utf-8")
    includes.use_only([tmp_path], "--include-path")
    try:
        assert load_table("my_costs").render == "training-cost"
        with pytest.raises(NoFigureData, match="my_costs: no "):
            write_report("my_costs", PROFILE, (0,), RunStore(tmp_path / "results"),
                         tmp_path / "out")
    finally:
        includes.use_only([], "--include-path")


def test_an_unknown_render_kind_is_one_line() -> None:
    with pytest.raises(SpecError, match="render must be one of table, training-cost, "
                                        "ablation-bars, got 'pie'"):
        replace(load_table("table1"), render="pie")
