"""Records → pandas → reports/<table>.md, .csv and .tex, with the paper's numbers beside ours."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import pandas as pd

from hydrabench.atomic import write_text_atomic
from hydrabench.config.profiles import load_profile
from hydrabench.config.tables import SOURCE_MARKS, TableSpec
from hydrabench.paths import reports_root
from hydrabench.records.store import RunStore
from hydrabench.reports.cells import (
    NOT_RECORDED,
    SCORE_RANGE,
    Cell,
    collect_cells,
    seeds_with_records,
)

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
        "delta_vs_ref_low": c.delta_vs_ref_low, "delta_vs_ref_high": c.delta_vs_ref_high,
        # Where the records came from; hardware text has no "|", so it separates machines.
        "hardware": " | ".join(sorted(set(c.hardware)))}
        for c in cells]).astype({"n": "Int64"})


def _missing(value: float | None) -> bool:
    return value is None or pd.isna(value)


# Scores with 2 decimals as the paper; %Param with 4 significant digits, as it spans 0.001–100.
NUMBER_FORMAT = {"score": ".2f", "param": ".4g", "param-active": ".4g"}


def fmt(value: float | None, spread: float | None = None, number: str = ".2f") -> str:
    """A number as reports print it, "± spread" when there is one, "—" when missing."""
    if _missing(value):
        return DASH
    text = format(value, number)
    return text if _missing(spread) else f"{text} ± {format(spread, number)}"


def spread_of(cells: pd.DataFrame, n_seeds: int | None = None) -> pd.Series:
    """The ± a cell shows. With `n_seeds` (the seeds a table asked for) one meaning per table:
    the 95% CI over seeds for two or more (a cell with one seed shows none), else lm-eval's
    stderr. Without it, per cell: the CI where there is one, else the stderr."""
    if n_seeds is None:
        return cells["ci95"].combine_first(cells["stderr"])
    return cells["ci95"] if n_seeds >= 2 else cells["stderr"]


def plus_minus_line(n_seeds: int) -> str:
    """What ± means in a table of `n_seeds` seeds: one meaning, said once."""
    if n_seeds >= 2:
        return (f"± is the half-width of the 95% t-interval over the {n_seeds} seeds (a cell "
                "with one seed's record shows no ±)")
    return "± is lm-eval's standard error (one seed: not an interval over seeds)"


def stand_in_labels(table: TableSpec, tidy: pd.DataFrame) -> dict[str, str]:
    """Column label → the label a report gives it: "general (stand-in for MMLU)" for a score
    column whose records say they scored stand-in tasks, else the paper's label."""
    out = {}
    for column in table.columns:
        part = tidy[tidy["column"] == column.label]
        out[column.label] = (column_label(column.label, column.key, part)
                             if column.kind == "score" else column.label)
    return out


def display_title(table: TableSpec, tidy: pd.DataFrame) -> str:
    """The table's title, saying "stand-in" where its records scored stand-in tasks: each
    stand-in column's paper label in it is replaced by the stand-in label, and a title that
    names none of them is marked "(stand-in tasks)"."""
    title = table.title
    changed = {k: v for k, v in stand_in_labels(table, tidy).items() if k != v}
    if changed:  # one pass, so that a label inside an inserted one is not replaced again
        names = "|".join(re.escape(k) for k in sorted(changed, key=len, reverse=True))
        title = re.sub(rf"\b({names})\b", lambda m: changed[m.group(1)], title)
    if changed and title == table.title:
        title += " (stand-in tasks)"
    return title


def caption_title(title: str) -> str:
    """The title without its "Table 1:" / "Fig. 6:" prefix: LaTeX's caption numbers it."""
    return re.sub(r"^(Table|Fig\.|Figure)\s*\d+[a-z]?\s*:\s*", "", title)


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
    marks = table.sources()
    row_marks = [marks.get(r.source, "") for r in table.rows]
    groups = []
    # Only scores stand in for the paper's; %Param is the tiny model's own, labelled as is.
    labels = stand_in_labels(table, tidy)
    for column in table.columns:
        part = tidy[tidy["column"] == column.label].set_index("row").reindex(out["Method"])
        label = labels[column.label]
        number = NUMBER_FORMAT[column.kind]
        show = score_text if column.kind == "score" else functools.partial(fmt, number=number)
        spread = (spread_of(part, n_seeds) if column.kind == "score"
                  else pd.Series([None] * len(part), index=part.index))
        ours = [show(v, s) + (PARTIAL if 0 < k < n_seeds else "")
                for v, s, k in zip(part["value"], spread, part["n_seeds"], strict=True)]
        out[f"{label} (ours)"] = [f"**{text}**" if bold is True else text
                                  for text, bold in zip(ours, part["bold"], strict=True)]
        sub = ["ours"]
        if column.kind != "param-active" or part["paper_value"].notna().any():
            # papers rarely count activated parameters: no column of dashes for them
            out[f"{label} (paper)"] = [fmt(v, None, number) + ("" if _missing(v) else mark)
                                       for v, mark in zip(part["paper_value"], row_marks,
                                                          strict=True)]
            sub.append("paper")
        if reference is not None and column.kind == "score":
            out[f"{label} Δ vs {reference} [95% CI]"] = [
                DASH if _missing(d) else f"{d:+.2f} [{lo:+.2f}, {hi:+.2f}]"
                for d, lo, hi in zip(part["delta_vs_ref"], part["delta_vs_ref_low"],
                                     part["delta_vs_ref_high"], strict=True)]
            sub.append(f"Δ vs {reference}")
        groups.append((label, sub))
    out.attrs["groups"] = groups
    return out


def provenance_lines(profile: str, seeds: tuple[int, ...], cells: pd.DataFrame,
                     seeds_note: str = "") -> list[str]:
    """What every report states: profile, model, seeds, what the records say they scored
    (stand-in tasks or not, data source) and on what hardware (where `cells` has a `hardware`
    column, as tidy_frame's): never guessed from names or the environment now."""
    prof = load_profile(profile)
    ran = cells[cells["run_id"] != ""]
    sources = sorted(set(ran["data_source"].dropna()))
    lines = [f"- profile: `{profile}` ({prof.description})",
             f"- model: `{prof.model}`; seeds: {', '.join(map(str, seeds))}"
             + (f" ({seeds_note})" if seeds_note else ""),
             "- data, as the records state it: " + ("; ".join(sources) if sources else
                                                     "no record states it"),
             *hardware_lines(ran)]
    if (ran["stand_in"] == True).any():  # noqa: E712
        lines.append(f"- **{STAND_IN_NOTE}**, which are given beside ours for layout only")
    unlabelled = int(ran["stand_in"].isna().sum())
    if unlabelled:
        lines.append(f"- {unlabelled} cell(s) come from records that predate hydrabench's "
                     "stand-in and data-source labels: whether their tasks are stand-ins is "
                     "not recorded")
    return lines


def machines(cells: pd.DataFrame) -> list[str]:
    """The distinct hardware the cells' records came from (tidy_frame's `hardware` column)."""
    if "hardware" not in cells:
        return []
    return sorted({m for joined in cells["hardware"].dropna() for m in str(joined).split(" | ")
                   if m})


def hardware_text_line(cells: pd.DataFrame) -> str | None:
    """One sentence naming the hardware (CPU model, threads, BLAS, GPUs) behind the records;
    several: says the table mixes them, since CPU results move with threads and kernels."""
    found = machines(cells)
    known = [m for m in found if m != NOT_RECORDED]
    unsaid = "; some records do not say theirs" if NOT_RECORDED in found and known else ""
    if not found:
        return None
    if not known:
        return "hardware: not recorded (records that predate hydrabench's hardware fields)"
    if len(known) == 1:
        return f"hardware, as the records state it: {known[0]}{unsaid}"
    return (f"mixed hardware: these records come from {len(known)} different machines or "
            "thread settings, and their differences include the machines': "
            + " | ".join(known) + unsaid)


def hardware_lines(cells: pd.DataFrame) -> list[str]:
    line = hardware_text_line(cells)
    return [] if line is None else [f"- **{line}**" if line.startswith("mixed") else f"- {line}"]


STAND_IN_NOTE = "stand-in tasks (their records say so): not comparable to the paper's numbers"
BOLD_RULE = ("bold: a column's best score, only where it beats the runner-up with p < 0.05 in "
             "McNemar's exact test on the items both scored (several seeds: the discordant "
             "(item, seed) pairs of the seeds both have, pooled); a tie, or a cell without "
             "per-item outputs, is never bold")


def delta_rule(reference: str, n_seeds: int) -> str:
    """What the Δ column's interval is (significance.paired_comparison)."""
    how = ("t-interval over seeds and items: the variance of the per-seed differences over "
           "the seeds plus that of the items' seed-averaged differences (docs/statistics.md)"
           if n_seeds >= 2 else "paired bootstrap interval over items")
    return f"Δ vs {reference}: our score minus {reference}'s in points, with its 95% {how}"


def runs_lines(run_ids: Iterable[str]) -> list[str]:
    """The run ids behind a report (their records: results/runs/<run id>/record.json)."""
    ids = sorted({rid for joined in run_ids for rid in joined.split(";") if rid})
    return ["", "Runs: " + (", ".join(f"`{r}`" for r in ids) if ids else "none"), ""]


SOURCES_NOTE = ("paper numbers marked with a letter come from the paper, model and protocol "
                "its note names, not from one setup: compare a marked number only with numbers "
                "of the same mark, never across marks or with ours")


def source_lines(table: TableSpec) -> list[str]:
    """What a report says beside rows' paper numbers taken from other papers or setups: that
    they do not compare across sources, then each mark's source."""
    marks = table.sources()
    return [SOURCES_NOTE, *(f"{mark} {source}" for source, mark in marks.items())] if marks else []


def skipped_lines(skipped: Sequence[str]) -> list[str]:
    """What a report says of the corrupt records it left out (each line names the file)."""
    return [f"{len(skipped)} corrupt record(s) skipped, as if unfinished: {'; '.join(skipped)}"
            ] if skipped else []


def header_lines(table: TableSpec, profile: str, seeds: tuple[int, ...],
                 tidy: pd.DataFrame, reference: str | None = None,
                 skipped: Sequence[str] = (), seeds_note: str = "") -> list[str]:
    return [f"# {display_title(table, tidy)}", "",
            *provenance_lines(profile, seeds, tidy, seeds_note),
            "- scores in percent (lm-eval, mean of the column's tasks); "
            f"{plus_minus_line(len(seeds))}; an interval reaching past 0 or 100 is shown "
            "clipped, as [low, high]",
            f"- {BOLD_RULE} (p_vs_runner_up in the CSV)",
            *([f"- {delta_rule(reference, len(seeds))}"] if reference else []),
            "- `—`: no finished run record (the method or run does not exist yet), or the record "
            "lacks the column's metric",
            f"- {PARTIAL}: fewer seeds than requested had a record (n_seeds in the CSV)",
            "- CSV: rounded as shown (scores 2 decimals, %Param 4 significant digits, p 3); "
            f"full precision in {table.name}.raw.csv",
            *(f"- {note}" for note in table.notes),
            *(f"- {line}" for line in source_lines(table)), *runs_lines(tidy["run_id"]),
            *(f"- {line}" for line in skipped_lines(skipped))]


_LATEX = {"\\": r"\textbackslash{}", "%": r"\%", "&": r"\&", "#": r"\#", "_": r"\_",
          "$": r"\$", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
          "^": r"\textasciicircum{}", "±": r"$\pm$", "×": r"$\times$", "→": r"$\rightarrow$",
          "—": "---", "†": r"\dag{}", "Δ": r"$\Delta$", "³": r"\textsuperscript{3}",
          "<": r"$<$", ">": r"$>$", "−": "-",
          **{mark: rf"\textsuperscript{{{letter}}}"
             for mark, letter in zip(SOURCE_MARKS, "abcdefghijklmnoprstuvwxyz", strict=True)}}


def latex_escape(text: str) -> str:
    return "".join(_LATEX.get(ch, ch) for ch in text)


def _latex_cell(text: str) -> str:
    bold = text.startswith("**") and text.endswith("**")
    return r"\textbf{" + latex_escape(text[2:-2]) + "}" if bold else latex_escape(text)


def latex_table(table: TableSpec, wide: pd.DataFrame, notes: Iterable[str] = (),
                title: str | None = None, plus_minus: str = "") -> str:
    """A booktabs table float, for \\input in a document that loads booktabs (said in its
    first lines); each column ours | paper [| Δ], `notes` printed under it. The caption is
    `title` (default: the table's) without its "Table 1:" (LaTeX numbers it), then what ±
    means.

    `wide` is wide_frame's output: Method, then the sub-columns of each column of the table.
    """
    groups = [(latex_escape(label), sub) for label, sub in wide.attrs["groups"]]
    starts = [2 + sum(len(sub) for _, sub in groups[:i]) for i in range(len(groups))]
    rules = "".join(rf"\cmidrule(lr){{{start}-{start + len(sub) - 1}}}"
                    for start, (_, sub) in zip(starts, groups, strict=True))
    caption = caption_title(title or table.title) + (
        f". Scores in percent; {plus_minus}." if plus_minus else "")
    lines = [rf"% hydrabench report {table.name}: a table float to \input in a LaTeX document",
             r"% requires \usepackage{booktabs}",
             r"\begin{table}[htbp]", r"\centering", r"\footnotesize",
             # Seven metric pairs (Table 2) overflow a text column at the default separation.
             r"\setlength{\tabcolsep}{3pt}",
             rf"\caption{{{latex_escape(caption)}}}", rf"\label{{tab:{table.name}}}",
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


# The CSV's figures per column kind: scores as the tables print them, %Param (0.001-100) to 4
# significant digits; p-values to 3. The raw CSV keeps every digit.
SCORE_FIELDS = ("value", "stderr", "ci95", "paper_value", "delta", "ci_low", "ci_high",
                "delta_vs_ref", "delta_vs_ref_low", "delta_vs_ref_high")


def _significant(digits: int):
    return lambda v: v if pd.isna(v) else float(f"{v:.{digits}g}")


def csv_frames(table: TableSpec, tidy: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(rounded, raw) CSV frames: tidy with each cell's column named as the report shows it
    ("general (stand-in for MMLU)" on stand-in tasks) and the paper's label in paper_column."""
    labels = stand_in_labels(table, tidy)
    kinds = {c.label: c.kind for c in table.columns}
    raw = tidy.assign(column=tidy["column"].map(labels))
    raw.insert(2, "paper_column", tidy["column"])
    if table.sources():  # only then, so that other tables' CSV columns stay as they are
        source = {row.label: row.source for row in table.rows}
        raw.insert(raw.columns.get_loc("paper_value") + 1, "paper_source",
                   tidy["row"].map(source))
    rounded = raw.copy()
    score = tidy["column"].map(kinds) == "score"
    for name in SCORE_FIELDS:
        values = rounded[name].astype(float)
        rounded[name] = values.where(~score, values.round(2)).where(
            score, values.map(_significant(4)))
    rounded["p_vs_runner_up"] = rounded["p_vs_runner_up"].astype(float).map(_significant(3))
    return rounded, raw


def choose_seeds(table: TableSpec, profile: str, store: RunStore,
                 seeds: tuple[int, ...] | None) -> tuple[tuple[int, ...], str]:
    """(seeds, what the report says of them). None: every seed the table's records have (seed
    0 when there are none); seeds named: the report says which seeds with records it leaves
    out, so that a 3-seed report is never silently replaced by a 1-seed one."""
    found = seeds_with_records(table, profile, store)
    if seeds is None:
        return (found, "every seed the records have") if found else ((0,), "no records yet")
    left_out = [s for s in found if s not in seeds]
    return tuple(seeds), (f"as --seeds asked; records of seed(s) {', '.join(map(str, left_out))}"
                          " exist and are left out" if left_out else "")


def write_table_files(table: TableSpec, tidy: pd.DataFrame, profile: str,
                      seeds: tuple[int, ...], out_dir: Path,
                      reference: str | None = None, skipped: Sequence[str] = (),
                      seeds_note: str = "") -> list[Path]:
    """reports/<table>.md (header + wide table), .csv (tidy, rounded), .tex (booktabs) and
    .raw.csv (tidy, full precision); each says how many `skipped` (corrupt) records it left
    out (the CSVs in a column, there only then)."""
    wide = wide_frame(table, tidy, len(seeds), reference)
    paths = [out_dir / f"{table.name}.{ext}" for ext in ("md", "csv", "tex", "raw.csv")]
    write_text_atomic(paths[0], "\n".join(header_lines(table, profile, seeds, tidy, reference,
                                                skipped, seeds_note)) + "\n"
               + wide.to_markdown(index=False, disable_numparse=True) + "\n")
    rounded, raw = csv_frames(table, tidy)
    for path, frame in ((paths[1], rounded), (paths[3], raw)):
        # The CSV's columns stay as they are unless records were skipped.
        write_text_atomic(path, (frame.assign(skipped_corrupt_records=len(skipped)) if skipped
                                 else frame).to_csv(index=False))
    stand_in = (tidy["stand_in"] == True).any()  # noqa: E712
    hardware = hardware_text_line(tidy[tidy["run_id"] != ""])
    sources = source_lines(table)
    notes = [*([STAND_IN_NOTE[0].upper() + STAND_IN_NOTE[1:] + "."] if stand_in else []),
             BOLD_RULE[0].upper() + BOLD_RULE[1:] + ".",
             *([delta_rule(reference, len(seeds)) + "."] if reference else []),
             *([hardware[0].upper() + hardware[1:] + "."] if hardware else []),
             *table.notes,
             *([SOURCES_NOTE[0].upper() + SOURCES_NOTE[1:] + ".", *sources[1:]] if sources
               else []),
             *skipped_lines(skipped)]
    write_text_atomic(paths[2], latex_table(table, wide, notes, display_title(table, tidy),
                                            plus_minus_line(len(seeds))))
    return paths


def write_table_report(table: TableSpec, profile: str = "tiny",
                       seeds: tuple[int, ...] | None = None, store: RunStore | None = None,
                       out_dir: Path | None = None, reference: str | None = None,
                       say: Callable[[str], None] | None = None) -> list[Path]:
    """A table's report from the records in `store` (default: results/) into `out_dir`, with a
    "Δ vs `reference` [95% CI]" column per score column when a row label is given. Seeds:
    choose_seeds; what it leaves out is also said to `say` (the CLI: stderr)."""
    store = store or RunStore()
    seeds, note = choose_seeds(table, profile, store, seeds)
    if say is not None and "left out" in note:
        say(f"{table.name}: seeds {', '.join(map(str, seeds))} {note}")
    tidy = tidy_frame(collect_cells(table, profile, seeds, store, reference))
    return write_table_files(table, tidy, profile, seeds, out_dir or reports_root(), reference,
                             store.corrupt_records(), note)
