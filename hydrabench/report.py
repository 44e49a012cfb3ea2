"""Records → pandas → reports/<table>.md, .csv and .tex, with the paper's numbers beside ours."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from hydrabench.spec import load_profile
from hydrabench.store import RunStore
from hydrabench.tables import Cell, TableSpec, collect_cells, load_table

DASH = "—"
PARTIAL = "†"


def reports_root() -> Path:
    return Path(os.environ.get("HYDRABENCH_REPORTS", "reports"))


def tidy_frame(cells: list[Cell]) -> pd.DataFrame:
    """One row per cell: value, stderr, 95% CI, n, seeds found, paper value, Δ, run ids."""
    return pd.DataFrame([{
        "row": c.row, "column": c.column, "value": c.value, "stderr": c.stderr, "ci95": c.ci95,
        "n": c.n, "n_seeds": c.n_seeds, "paper_value": c.paper, "delta": c.delta,
        "run_id": ";".join(c.run_ids)} for c in cells]).astype({"n": "Int64"})


def _missing(value: float | None) -> bool:
    return value is None or pd.isna(value)


# Scores with 2 decimals as the paper; %Param with 4 significant digits, as it spans 0.001–100.
NUMBER_FORMAT = {"score": ".2f", "param": ".4g"}


def fmt(value: float | None, spread: float | None = None, number: str = ".2f") -> str:
    """A number as reports print it, "± spread" when there is one, "—" when missing."""
    if _missing(value):
        return DASH
    text = format(value, number)
    return text if _missing(spread) else f"{text} ± {format(spread, number)}"


def spread_of(cells: pd.DataFrame) -> pd.Series:
    """The ± a cell shows: the 95% CI over seeds where there is one, else the stderr."""
    return cells["ci95"].combine_first(cells["stderr"])


def wide_frame(table: TableSpec, tidy: pd.DataFrame, n_seeds: int) -> pd.DataFrame:
    """Method rows × (ours, paper) columns, best score per column in bold (highest is best).

    Ours is "mean ± 95% CI" over several seeds, "value ± stderr" for one, and marked with
    PARTIAL where fewer than the `n_seeds` requested had a record.
    """
    out = pd.DataFrame({"Method": [r.label for r in table.rows]})
    for column in table.columns:
        part = tidy[tidy["column"] == column.label].set_index("row").reindex(out["Method"])
        number = NUMBER_FORMAT[column.kind]
        ours = [fmt(v, s, number) + (PARTIAL if 0 < k < n_seeds else "")
                for v, s, k in zip(part["value"], spread_of(part), part["n_seeds"], strict=True)]
        if column.kind == "score" and part["value"].notna().any():
            best = part["value"].max()
            ours = [f"**{text}**" if v == best else text
                    for text, v in zip(ours, part["value"], strict=True)]
        out[f"{column.label} (ours)"] = ours
        out[f"{column.label} (paper)"] = [fmt(v, None, number) for v in part["paper_value"]]
    return out


def provenance_lines(profile: str, seeds: tuple[int, ...]) -> list[str]:
    """What every report states: profile, model, data source, seeds."""
    prof = load_profile(profile)
    data_source = ("local files in " + os.environ["HYDRABENCH_DATA_DIR"]
                   if os.environ.get("HYDRABENCH_DATA_DIR") else
                   "generated synthetic suite" if profile == "tiny" else "Hugging Face hub")
    seed_list = ", ".join(map(str, seeds))
    lines = [f"- profile: `{profile}` ({prof.get('description', '')})",
             f"- model: `{prof['model']}`; data: {data_source}; seeds: {seed_list}"]
    if profile == "tiny":
        lines.append("- **stand-in tasks on the embedded tiny model: not comparable to the paper's "
                     "numbers**, which are given beside ours for layout only")
    return lines


def runs_lines(run_ids: Iterable[str]) -> list[str]:
    """The run ids behind a report (their records: results/runs/<run id>/record.json)."""
    ids = sorted({rid for joined in run_ids for rid in joined.split(";") if rid})
    return ["", "Runs: " + (", ".join(f"`{r}`" for r in ids) if ids else "none"), ""]


def header_lines(table: TableSpec, profile: str, seeds: tuple[int, ...],
                 tidy: pd.DataFrame) -> list[str]:
    return [f"# {table.title}", "", *provenance_lines(profile, seeds),
            "- scores in percent (lm-eval, mean of the column's tasks); "
            "± is the stderr (one seed) or the 95% CI over seeds; best per column in bold",
            "- `—`: no finished run record (the method or run does not exist yet), or the record "
            "lacks the column's metric",
            f"- {PARTIAL}: fewer seeds than requested had a record (n_seeds in the CSV)",
            *(f"- {note}" for note in table.notes), *runs_lines(tidy["run_id"])]


def write_text(path: Path, text: str) -> None:
    """Write via a temp file renamed into place: a reader never sees half a report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    publish(Path(tmp), path)


def publish(tmp: Path, path: Path) -> None:
    """Rename a finished temp file into place, readable by all like any report (mkstemp: 0600)."""
    try:
        tmp.chmod(0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


_LATEX = {"\\": r"\textbackslash{}", "%": r"\%", "&": r"\&", "#": r"\#", "_": r"\_",
          "$": r"\$", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
          "^": r"\textasciicircum{}", "±": r"$\pm$", "×": r"$\times$", "→": r"$\rightarrow$",
          "—": "---", "†": r"\dag{}", "Δ": r"$\Delta$", "³": r"\textsuperscript{3}"}


def latex_escape(text: str) -> str:
    return "".join(_LATEX.get(ch, ch) for ch in text)


def _latex_cell(text: str) -> str:
    bold = text.startswith("**") and text.endswith("**")
    return r"\textbf{" + latex_escape(text[2:-2]) + "}" if bold else latex_escape(text)


def latex_table(table: TableSpec, wide: pd.DataFrame) -> str:
    """A booktabs table (needs only \\usepackage{booktabs}); each column ours | paper.

    `wide` is wide_frame's output: Method, then (ours, paper) per column of the table.
    """
    groups = [latex_escape(c.label) for c in table.columns]
    rules = "".join(rf"\cmidrule(lr){{{2 * i + 2}-{2 * i + 3}}}" for i in range(len(groups)))
    lines = [r"\begin{table}[htbp]", r"\centering", r"\footnotesize",
             # Seven metric pairs (Table 2) overflow a text column at the default separation.
             r"\setlength{\tabcolsep}{3pt}",
             rf"\caption{{{latex_escape(table.title)}}}", rf"\label{{tab:{table.name}}}",
             r"\begin{tabular}{l" + "rr" * len(groups) + "}", r"\toprule",
             " & ".join(["", *(rf"\multicolumn{{2}}{{c}}{{{g}}}" for g in groups)]) + r" \\",
             rules, " & ".join(["Method", *(["ours", "paper"] * len(groups))]) + r" \\",
             r"\midrule",
             *(" & ".join(_latex_cell(str(t)) for t in row) + r" \\"
               for row in wide.itertuples(index=False)),
             r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def write_table_files(table: TableSpec, tidy: pd.DataFrame, profile: str,
                      seeds: tuple[int, ...], out_dir: Path) -> list[Path]:
    """reports/<table>.md (header + wide table), .csv (tidy) and .tex (booktabs)."""
    wide = wide_frame(table, tidy, len(seeds))
    paths = [out_dir / f"{table.name}.{ext}" for ext in ("md", "csv", "tex")]
    write_text(paths[0], "\n".join(header_lines(table, profile, seeds, tidy)) + "\n"
               + wide.to_markdown(index=False, disable_numparse=True) + "\n")
    write_text(paths[1], tidy.to_csv(index=False))
    write_text(paths[2], latex_table(table, wide))
    return paths


def write_table_report(table: TableSpec, profile: str = "tiny", seeds: tuple[int, ...] = (0,),
                       store: RunStore | None = None, out_dir: Path | None = None) -> list[Path]:
    """A table's report from the records in `store` (default: results/) into `out_dir`."""
    tidy = tidy_frame(collect_cells(table, profile, seeds, store or RunStore()))
    return write_table_files(table, tidy, profile, seeds, out_dir or reports_root())


def write_report(name: str, profile: str = "tiny", seeds: tuple[int, ...] = (0,),
                 store: RunStore | None = None, out_dir: Path | None = None) -> list[Path]:
    """The report of one spec in tasks/tables: a table, or a figure for the figure specs."""
    # Imported here: figures builds on this module (and alone needs matplotlib).
    from hydrabench.figures import FIGURES

    table = load_table(name)
    writer = FIGURES.get(name, write_table_report)
    return writer(table, profile, seeds, store or RunStore(), out_dir or reports_root())
