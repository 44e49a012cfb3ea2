"""Training corpora → InstructionRecords: the synthetic suite, local files, or hub datasets.

Corpus names: `synthetic`; `data:<path>` (relative to HYDRABENCH_DATA_DIR); a file path (JSON list,
JSONL, CSV or parquet); `hub:<dataset id>[:<config>]`; several joined by `+`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from hydrabench.data import synthetic
from hydrabench.data.records import InstructionRecord
from hydrabench.errors import SpecError
from hydrabench.paths import data_dir

# Field names used by the paper's corpora (Alpaca-style, Dolly, GSM8K, Flan) for the same roles.
FIELD_ALIASES = {
    "instruction": ("instruction", "question", "prompt", "inputs", "text"),
    "input": ("input", "context"),
    "output": ("output", "response", "answer", "completion", "targets", "answer_icliniq",
               "label"),
    "component": ("component", "category", "task_type", "task_name"),
}
# A corpus is held in memory as records (and its text while parsing): past this, refuse at once
# rather than run the machine out of memory half-way.
MAX_CORPUS_BYTES = 1 << 30


def to_record(row: dict, where: str) -> InstructionRecord | None:
    """The record in `row`; None when it has the fields but an empty response (real corpora do:
    CodeAlpaca has some), which cannot be trained on; an error when a field is missing."""
    if not isinstance(row, dict):
        raise SpecError(f"{where}: expected an object with instruction/output fields")
    values = {}
    for role, names in FIELD_ALIASES.items():
        found = next((name for name in names if row.get(name) not in (None, "")), None)
        values[role] = str(row[found]) if found else ""
        try:  # JSON's "\ud800" decodes to a lone surrogate, which no tokenizer can encode
            values[role].encode("utf-8")
        except UnicodeEncodeError as err:
            raise SpecError(f"{where}: {found} holds {err.object[err.start:err.end]!a}, a lone "
                            "surrogate (not Unicode text)") from None
    if not values["output"] and any(name in row for name in FIELD_ALIASES["output"]):
        return None
    if not values["instruction"] and values["input"]:  # e.g. iCliniq: the patient's message only
        values["instruction"], values["input"] = values["input"], ""
    for role in ("instruction", "output"):
        if not values[role]:
            raise SpecError(f"{where}: record has no {role} field "
                            f"(expected one of {', '.join(FIELD_ALIASES[role])})")
    return InstructionRecord(**values)


def _not_utf8(path: Path, err: UnicodeDecodeError) -> SpecError:
    return SpecError(f"corpus file {path} is not UTF-8 text (byte {err.start}: {err.reason}); "
                     "save it as UTF-8")


def _text(path: Path) -> str:
    """The corpus file's text; one line when it is not UTF-8 text (binary, another encoding)."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise _not_utf8(path, err) from None


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _read_table(path: Path) -> list[tuple[str, dict]]:
    """A CSV or parquet corpus's rows; a malformed or corrupt file, or an empty output cell in a
    CSV, names the file (and the row)."""
    import pandas as pd

    try:
        # Every cell as text, an empty one as "" (pandas' default reads it as NaN, which becomes
        # the response "nan"), and "NA"/"null" kept as the words they are.
        frame = (pd.read_csv(path, dtype=str, keep_default_na=False) if path.suffix == ".csv"
                 else pd.read_parquet(path))
    except UnicodeDecodeError as err:
        raise _not_utf8(path, err) from None
    except (ValueError, OSError) as err:  # pandas' ParserError, pyarrow's ArrowInvalid
        kind = "CSV" if path.suffix == ".csv" else "parquet"
        raise SpecError(f"malformed {kind} corpus file {path}: {_first_line(err)}") from None
    rows = [(f"{path}:{i + 2}", row) for i, row in enumerate(frame.to_dict("records"))]
    outputs = [name for name in FIELD_ALIASES["output"] if name in frame.columns]
    if path.suffix == ".csv" and outputs:
        for where, row in rows:
            if not any(row[name] for name in outputs):  # a CSV cannot say "no response"
                raise SpecError(f"{where}: empty {outputs[0]} cell (every training record needs "
                                "a response)")
    return rows


def _read_rows(path: Path) -> list[tuple[str, dict]]:
    """(location, row) pairs; malformed input names file and line/record."""
    if not path.exists():
        raise SpecError(f"corpus file {path} not found")
    if not path.is_file():
        raise SpecError(f"corpus {path} is a directory, not a file (use .json, .jsonl, .csv or "
                        ".parquet files)")
    if (size := path.stat().st_size) > MAX_CORPUS_BYTES:
        raise SpecError(f"corpus file {path} is {size / 2**30:.1f} GiB; hydrabench holds a corpus "
                        f"in memory and reads files up to {MAX_CORPUS_BYTES / 2**30:.0f} GiB: "
                        f"sample or split it")
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(_text(path).splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append((f"{path}:{number}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise SpecError(f"malformed JSONL at {path}:{number}: {err.msg}") from None
            except RecursionError:
                raise SpecError(f"malformed JSONL at {path}:{number}: nested too deeply"
                                ) from None
        return rows
    if path.suffix == ".json":
        try:
            data = json.loads(_text(path))
        except json.JSONDecodeError as err:
            raise SpecError(f"malformed JSON at {path}:{err.lineno}: {err.msg}") from None
        except RecursionError:
            raise SpecError(f"malformed JSON in {path}: nested too deeply") from None
        if not isinstance(data, list):
            raise SpecError(f"{path}: expected a JSON list of records")
        return [(f"{path} record {i}", row) for i, row in enumerate(data)]
    if path.suffix in (".csv", ".parquet"):
        return _read_table(path)
    raise SpecError(f"{path}: unsupported corpus format (use .json, .jsonl, .csv or .parquet)")


def _load_one(name: str) -> list[InstructionRecord]:
    if name == "synthetic":
        return synthetic.training_records()
    if name.startswith("hub:"):
        import datasets

        dataset_id, _, config = name[4:].partition(":")
        try:
            rows = datasets.load_dataset(dataset_id, config or None, split="train")
        except Exception as err:  # offline, unknown id, gated: all reach the user the same way
            raise SpecError(f"cannot load hub dataset {dataset_id!r}: {_first_line(err)}"
                            ) from None
        return _records((f"{dataset_id} row {i}", row) for i, row in enumerate(rows))
    if name.startswith("data:"):
        root = data_dir()
        if root is None:
            raise SpecError(f"corpus {name} needs HYDRABENCH_DATA_DIR (a copy of the data files)")
        path = root / name[5:]
    else:
        path = Path(name)
    return _records(_read_rows(path))


def _records(rows: Iterable[tuple[str, dict]]) -> list[InstructionRecord]:
    return [rec for where, row in rows if (rec := to_record(row, where)) is not None]


def load_corpus(name: str) -> list[InstructionRecord]:
    records = [rec for part in name.split("+") for rec in _load_one(part)]
    if not records:
        raise SpecError(f"corpus {name} is empty")
    return records
