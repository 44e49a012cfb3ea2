"""`hydrabench report NAME`: a spec in tasks/tables becomes a table (hydrabench.report) or, for
the figure specs, a figure (hydrabench.figures, built on report): the dispatcher above both."""

from __future__ import annotations

from pathlib import Path

from hydrabench.figures import FIGURES
from hydrabench.paths import reports_root
from hydrabench.report import write_table_report
from hydrabench.store import RunStore
from hydrabench.tables import load_table


def write_report(name: str, profile: str = "tiny", seeds: tuple[int, ...] = (0,),
                 store: RunStore | None = None, out_dir: Path | None = None,
                 reference: str | None = None) -> list[Path]:
    """The report of one spec in tasks/tables: a table, or a figure for the figure specs."""
    table = load_table(name)
    if name in FIGURES:
        return FIGURES[name](table, profile, seeds, store or RunStore(), out_dir or reports_root())
    return write_table_report(table, profile, seeds, store, out_dir, reference)
