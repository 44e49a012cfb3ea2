"""The user-input error every module raises, and its one-line message helpers (imports nothing of
the package, so any module can raise it without loading the config machinery)."""

from __future__ import annotations

import difflib


class SpecError(ValueError):
    """Bad user input: reported as one line, exit code 2, before anything is written."""


def did_you_mean(kind: str, name: str, valid: list[str]) -> SpecError:
    """One line: the nearest valid name and all of them where they are few; where they are many
    (lm-eval knows thousands of tasks), the three nearest."""
    if len(valid) <= 30:
        close = difflib.get_close_matches(name, valid, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return SpecError(f"unknown {kind} {name!r}{hint}; valid: {', '.join(sorted(valid))}")
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.0)
    return SpecError(f"unknown {kind} {name!r} (did you mean {', '.join(map(repr, close))}?; "
                     f"{len(valid)} known)")


def require(ok: bool, message: str) -> None:
    if not ok:
        raise SpecError(message)
