"""Records → pandas → reports/<table>.md, .csv and .tex, with the paper's numbers beside ours."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd

from hydrabench.atomic import write_text_atomic
from hydrabench.paths import reports_root
from hydrabench.profiles import load_profile
from hydrabench.store import RunStore
from hydrabench.tables import SCORE_RANGE, Cell, TableSpec, collect_cells

DASH = "—"
PARTIAL = "†"


def tidy_frame(cells: list[Cell]) -> pd.DataFrame:
    """One row per cell: value, stderr, 95% CI, n, seeds found, paper value, Δ, run ids; then
    the clipped interval, what the records say was scored, and the paired tests' results."""
    return pd.DataFrame([{
        "row": c.row, "column": c.column, "value": c.value, "stderr": c.stderr, "ci95": c.ci95,
        "n": c.n, "n_seeds": c.n_seeds, "paper_value": c.paper, "delta": c.delta,
        "run_id": ";".join(c.run_ids), "ci_low": c.interval[0], "ci_high": c.interval[1],
        "stand_in": c.stand_in, "data_source": c.data_source, "bold": c.bold,
        "p_vs_runner_up": c.p_vs_runner_up, "delta_vs_ref": c.delta_vs_ref,
        "delta_vs_ref_low": c.delta_vs_ref_low, "delta_vs_ref_high": c.delta_vs_ref_high}
        for c in cells]).astype({"n": "Int64"})


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


def score_text(value: float | None, spread: float | None) -> str:
    """A score as fmt prints it, but an interval reaching past the score range (0-100) is shown
    clipped, as "value [low, high]"."""
    low, high = SCORE_RANGE
    if _missing(value) or _missing(spread) or low <= value - spread <= value + spread <= high:
        return fmt(value, spread)
    return f"{value:.2f} [{max(low, value - spread):.2f}, {min(high, value + spread):.2f}]"


def column_label(label: str, key: str, cells: pd.DataFrame) -> str:
    """What a column scored: on stand-in tasks (as their records say) "general (stand-in for
    MMLU)", else the paper's label."""
    return f"{key} (stand-in for {label})" if (cells["stand_in"] == True).any() else label  # noqa: E712


def wide_frame(table: TableSpec, tidy: pd.DataFrame, n_seeds: int,
               reference: str | None = None) -> pd.DataFrame:
    """Method rows × (ours, paper[, Δ vs reference]) per column; a score in bold where paired
    tests say it beats its column's runner-up (tidy's `bold`).

    Ours is "mean ± 95% CI" over several seeds, "value ± stderr" for one, and marked with
    PARTIAL where fewer than the `n_seeds` requested had a record. `attrs["groups"]` lists
    (column label, its sub-columns) for the LaTeX header.
    """
    out = pd.DataFrame({"Method": [r.label for r in table.rows]})
    groups = []
    for column in table.columns:
        part = tidy[tidy["column"] == column.label].set_index("row").reindex(out["Method"])
        # Only scores stand in for the paper's; %Param is the tiny model's own, labelled as is.
        label = (column_label(column.label, column.key, part) if column.kind == "score"
                 else column.label)
        number = NUMBER_FORMAT[column.kind]
        show = score_text if column.kind == "score" else functools.partial(fmt, number=number)
        ours = [show(v, s) + (PARTIAL if 0 < k < n_seeds else "")
                for v, s, k in zip(part["value"], spread_of(part), part["n_seeds"], strict=True)]
        out[f"{label} (ours)"] = [f"**{text}**" if bold is True else text
                                  for text, bold in zip(ours, part["bold"], strict=True)]
        out[f"{label} (paper)"] = [fmt(v, None, number) for v in part["paper_value"]]
        sub = ["ours", "paper"]
        if reference is not None and column.kind == "score":
            out[f"{label} Δ vs {reference} [95% CI]"] = [
                DASH if _missing(d) else f"{d:+.2f} [{lo:+.2f}, {hi:+.2f}]"
                for d, lo, hi in zip(part["delta_vs_ref"], part["delta_vs_ref_low"],
                                     part["delta_vs_ref_high"], strict=True)]
            sub.append(f"Δ vs {reference}")
        groups.append((label, sub))
    out.attrs["groups"] = groups
    return out


def provenance_lines(profile: str, seeds: tuple[int, ...], cells: pd.DataFrame) -> list[str]:
    """What every report states: profile, model, seeds, and what the records say they scored
    (stand-in tasks or not, data source): never guessed from names or the environment now."""
    prof = load_profile(profile)
    ran = cells[cells["run_id"] != ""]
    sources = sorted(set(ran["data_source"].dropna()))
    lines = [f"- profile: `{profile}` ({prof.description})",
             f"- model: `{prof.model}`; seeds: {', '.join(map(str, seeds))}",
             "- data, as the records state it: " + ("; ".join(sources) if sources else
                                                     "no record states it")]
    if (ran["stand_in"] == True).any():  # noqa: E712
        lines.append(f"- **{STAND_IN_NOTE}**, which are given beside ours for layout only")
    unlabelled = int(ran["stand_in"].isna().sum())
    if unlabelled:
        lines.append(f"- {unlabelled} cell(s) come from records that predate hydrabench's "
                     "stand-in and data-source labels: whether their tasks are stand-ins is "
                     "not recorded")
    return lines


STAND_IN_NOTE = "stand-in tasks (their records say so): not comparable to the paper's numbers"
BOLD_RULE = ("bold: a column's best score, only where it beats the runner-up with p < 0.05 in "
             "McNemar's exact test on the items both scored (several seeds: the discordant "
             "(item, seed) pairs of the seeds both have, pooled); a tie, or a cell without "
             "per-item outputs, is never bold")


def runs_lines(run_ids: Iterable[str]) -> list[str]:
    """The run ids behind a report (their records: results/runs/<run id>/record.json)."""
    ids = sorted({rid for joined in run_ids for rid in joined.split(";") if rid})
    return ["", "Runs: " + (", ".join(f"`{r}`" for r in ids) if ids else "none"), ""]


def skipped_lines(skipped: Sequence[str]) -> list[str]:
    """What a report says of the corrupt records it left out (each line names the file)."""
    return [f"{len(skipped)} corrupt record(s) skipped, as if unfinished: {'; '.join(skipped)}"
            ] if skipped else []


def header_lines(table: TableSpec, profile: str, seeds: tuple[int, ...],
                 tidy: pd.DataFrame, reference: str | None = None,
                 skipped: Sequence[str] = ()) -> list[str]:
    return [f"# {table.title}", "", *provenance_lines(profile, seeds, tidy),
            "- scores in percent (lm-eval, mean of the column's tasks); "
            "± is the stderr (one seed) or the 95% CI over seeds; an interval reaching past "
            "0 or 100 is shown clipped, as [low, high]",
            f"- {BOLD_RULE} (p_vs_runner_up in the CSV)",
            *([f"- Δ vs {reference}: our score minus {reference}'s in points, with its 95% "
               "paired bootstrap interval over items (per-item differences averaged over the "
               "seeds both have)"] if reference else []),
            "- `—`: no finished run record (the method or run does not exist yet), or the record "
            "lacks the column's metric",
            f"- {PARTIAL}: fewer seeds than requested had a record (n_seeds in the CSV)",
            *(f"- {note}" for note in table.notes), *runs_lines(tidy["run_id"]),
            *(f"- {line}" for line in skipped_lines(skipped))]


_LATEX = {"\\": r"\textbackslash{}", "%": r"\%", "&": r"\&", "#": r"\#", "_": r"\_",
          "$": r"\$", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
          "^": r"\textasciicircum{}", "±": r"$\pm$", "×": r"$\times$", "→": r"$\rightarrow$",
          "—": "---", "†": r"\dag{}", "Δ": r"$\Delta$", "³": r"\textsuperscript{3}",
          "<": r"$<$", ">": r"$>$", "−": "-"}


def latex_escape(text: str) -> str:
    return "".join(_LATEX.get(ch, ch) for ch in text)


def _latex_cell(text: str) -> str:
    bold = text.startswith("**") and text.endswith("**")
    return r"\textbf{" + latex_escape(text[2:-2]) + "}" if bold else latex_escape(text)


def latex_table(table: TableSpec, wide: pd.DataFrame, notes: Iterable[str] = ()) -> str:
    """A booktabs table (needs only \\usepackage{booktabs}); each column ours | paper [| Δ],
    `notes` printed under it.

    `wide` is wide_frame's output: Method, then the sub-columns of each column of the table.
    """
    groups = [(latex_escape(label), sub) for label, sub in wide.attrs["groups"]]
    starts = [2 + sum(len(sub) for _, sub in groups[:i]) for i in range(len(groups))]
    rules = "".join(rf"\cmidrule(lr){{{start}-{start + len(sub) - 1}}}"
                    for start, (_, sub) in zip(starts, groups, strict=True))
    lines = [r"\begin{table}[htbp]", r"\centering", r"\footnotesize",
             # Seven metric pairs (Table 2) overflow a text column at the default separation.
             r"\setlength{\tabcolsep}{3pt}",
             rf"\caption{{{latex_escape(table.title)}}}", rf"\label{{tab:{table.name}}}",
             r"\begin{tabular}{l" + "r" * (len(wide.columns) - 1) + "}", r"\toprule",
             " & ".join(["", *(rf"\multicolumn{{{len(sub)}}}{{c}}{{{g}}}" for g, sub in groups)])
             + r" \\",
             rules, " & ".join(["Method", *(latex_escape(h) for _, sub in groups for h in sub)])
             + r" \\",
             r"\midrule",
             *(" & ".join(_latex_cell(str(t)) for t in row) + r" \\"
               for row in wide.itertuples(index=False)),
             r"\bottomrule", r"\end{tabular}",
             *([r"\par\smallskip{\scriptsize " + r" \par ".join(map(latex_escape, notes)) + "}"]
               if notes else []),
             r"\end{table}"]
    return "\n".join(lines) + "\n"


def write_table_files(table: TableSpec, tidy: pd.DataFrame, profile: str,
                      seeds: tuple[int, ...], out_dir: Path,
                      reference: str | None = None, skipped: Sequence[str] = ()) -> list[Path]:
    """reports/<table>.md (header + wide table), .csv (tidy) and .tex (booktabs); each says how
    many `skipped` (corrupt) records it left out (the CSV in a column, there only then)."""
    wide = wide_frame(table, tidy, len(seeds), reference)
    paths = [out_dir / f"{table.name}.{ext}" for ext in ("md", "csv", "tex")]
    write_text_atomic(paths[0], "\n".join(header_lines(table, profile, seeds, tidy, reference,
                                                skipped)) + "\n"
               + wide.to_markdown(index=False, disable_numparse=True) + "\n")
    # The CSV's columns stay as they are unless records were skipped.
    csv = tidy.assign(skipped_corrupt_records=len(skipped)) if skipped else tidy
    write_text_atomic(paths[1], csv.to_csv(index=False))
    stand_in = (tidy["stand_in"] == True).any()  # noqa: E712
    notes = [*([STAND_IN_NOTE[0].upper() + STAND_IN_NOTE[1:] + "."] if stand_in else []),
             BOLD_RULE[0].upper() + BOLD_RULE[1:] + ".", *skipped_lines(skipped)]
    write_text_atomic(paths[2], latex_table(table, wide, notes))
    return paths


def write_table_report(table: TableSpec, profile: str = "tiny", seeds: tuple[int, ...] = (0,),
                       store: RunStore | None = None, out_dir: Path | None = None,
                       reference: str | None = None) -> list[Path]:
    """A table's report from the records in `store` (default: results/) into `out_dir`, with a
    "Δ vs `reference` [95% CI]" column per score column when a row label is given."""
    store = store or RunStore()
    tidy = tidy_frame(collect_cells(table, profile, seeds, store, reference))
    return write_table_files(table, tidy, profile, seeds, out_dir or reports_root(), reference,
                             store.corrupt_records())
