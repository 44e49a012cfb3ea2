"""`hydrabench report NAME`: a spec in tasks/tables becomes what its `render:` key says, a table
(hydrabench.reports.tables) or a figure (hydrabench.reports.figures): the dispatcher above
both."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from hydrabench.config.tables import load_table
from hydrabench.paths import reports_root
from hydrabench.records.store import RunStore
from hydrabench.reports.figures import FIGURES
from hydrabench.reports.tables import choose_seeds, write_table_report


def write_report(name: str, profile: str = "tiny", seeds: tuple[int, ...] | None = None,
                 store: RunStore | None = None, out_dir: Path | None = None,
                 reference: str | None = None,
                 say: Callable[[str], None] | None = None) -> list[Path]:
    """The report of one spec in tasks/tables: a table, or the figure its `render:` key names.
    Seeds None: every seed its records have; seeds with records left out are said to `say`."""
    table = load_table(name)
    store = store or RunStore()
    if table.render in FIGURES:
        seeds, note = choose_seeds(table, profile, store, seeds)
        if say is not None and "left out" in note:
            say(f"{name}: seeds {', '.join(map(str, seeds))} {note}")
        return FIGURES[table.render](table, profile, seeds, store, out_dir or reports_root())
    return write_table_report(table, profile, seeds, store, out_dir, reference, say)
