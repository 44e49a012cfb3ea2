"""Records → pandas → reports/<table>.md, .csv and .tex, with the paper's numbers beside ours."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pandas as pd

from hydrabench.spec import load_profile
from hydrabench.store import RunStore
from hydrabench.tables import Cell, TableSpec, collect_cells

DASH = "—"


def reports_root() -> Path:
    return Path(os.environ.get("HYDRABENCH_REPORTS", "reports"))


def tidy_frame(cells: list[Cell]) -> pd.DataFrame:
    """One row per cell: row, column, value, stderr, n, paper value, Δ, run ids."""
    return pd.DataFrame([{
        "row": c.row, "column": c.column, "value": c.value, "stderr": c.stderr, "n": c.n,
        "paper_value": c.paper, "delta": c.delta, "run_id": ";".join(c.run_ids)} for c in cells])


def _fmt(value: float | None, stderr: float | None = None) -> str:
    if value is None or pd.isna(value):
        return DASH
    text = f"{value:.3f}" if abs(value) < 1 else f"{value:.2f}"
    return f"{text} ± {stderr:.2f}" if stderr is not None and not pd.isna(stderr) else text


def wide_frame(table: TableSpec, tidy: pd.DataFrame) -> pd.DataFrame:
    """Method rows × (ours, paper) columns, best score per column in bold (highest is best)."""
    out = pd.DataFrame({"Method": [r.label for r in table.rows]})
    for column in table.columns:
        part = tidy[tidy["column"] == column.label].set_index("row").reindex(out["Method"])
        ours = [_fmt(v, s) for v, s in zip(part["value"], part["stderr"], strict=True)]
        if column.kind == "score" and part["value"].notna().any():
            best = part["value"].max()
            ours = [f"**{text}**" if v == best else text
                    for text, v in zip(ours, part["value"], strict=True)]
        out[f"{column.label} (ours)"] = ours
        out[f"{column.label} (paper)"] = [_fmt(v) for v in part["paper_value"]]
    return out


def header_lines(table: TableSpec, profile: str, seeds: tuple[int, ...],
                 tidy: pd.DataFrame) -> list[str]:
    prof = load_profile(profile)
    data_source = ("local files in " + os.environ["HYDRABENCH_DATA_DIR"]
                   if os.environ.get("HYDRABENCH_DATA_DIR") else
                   "generated synthetic suite" if profile == "tiny" else "Hugging Face hub")
    lines = [f"# {table.title}", "",
             f"- profile: `{profile}` ({prof.get('description', '')})",
             f"- model: `{prof['model']}`; data: {data_source}; "
             f"seeds: {', '.join(map(str, seeds))}",
             "- scores in percent (lm-eval, mean of the column's tasks); "
             "± is the stderr (one seed) or the 95% CI over seeds; best per column in bold",
             "- `—`: no finished run record (the method or run does not exist yet)"]
    if profile == "tiny":
        lines.append("- **stand-in tasks on the embedded tiny model: not comparable to the paper's "
                     "numbers**, which are given beside ours for layout only")
    run_ids = sorted({rid for ids in tidy["run_id"] for rid in ids.split(";") if rid})
    lines += ["", "Runs: " + (", ".join(f"`{r}`" for r in run_ids) if run_ids else "none"), ""]
    return lines


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


_LATEX = {"\\": r"\textbackslash{}", "%": r"\%", "&": r"\&", "#": r"\#", "_": r"\_",
          "$": r"\$", "{": r"\{", "}": r"\}", "±": r"$\pm$", "×": r"$\times$", "—": "---",
          "Δ": r"$\Delta$"}


def latex_escape(text: str) -> str:
    return "".join(_LATEX.get(ch, ch) for ch in text)


def latex_table(table: TableSpec, wide: pd.DataFrame) -> str:
    """A booktabs table (needs \\usepackage{booktabs}); the best score per column in bold."""
    bolded = wide.map(lambda text: (r"\textbf{" + latex_escape(text[2:-2]) + "}"
                                    if text.startswith("**") else latex_escape(text)))
    bolded.columns = [latex_escape(c) for c in wide.columns]
    return bolded.to_latex(index=False, escape=False, caption=latex_escape(table.title),
                           label=f"tab:{table.name}",
                           column_format="l" + "r" * (len(wide.columns) - 1))


def write_table_report(table: TableSpec, profile: str = "tiny", seeds: tuple[int, ...] = (0,),
                       store: RunStore | None = None, out_dir: Path | None = None) -> list[Path]:
    out_dir = out_dir or reports_root()
    tidy = tidy_frame(collect_cells(table, profile, seeds, store or RunStore()))
    markdown = "\n".join(header_lines(table, profile, seeds, tidy)) + "\n" + wide_frame(
        table, tidy).to_markdown(index=False) + "\n"
    paths = [out_dir / f"{table.name}.md", out_dir / f"{table.name}.csv",
             out_dir / f"{table.name}.tex"]
    _write_text(paths[0], markdown)
    _write_text(paths[1], tidy.to_csv(index=False))
    _write_text(paths[2], latex_table(table, wide_frame(table, tidy)))
    return paths
