"""What a long phase says while it runs: a bar on a terminal, and in logs (stderr not a terminal)
a line at every tenth of the work or every 30 s, whichever comes first."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

from tqdm.auto import tqdm

LOG_EVERY_S = 30.0


def log(message: str) -> None:
    print(f"[hydrabench] {message}", file=sys.stderr, flush=True)


class LogProgress:
    """tqdm's iteration and `set_postfix` for logs: one line per tenth of `total` or 30 s."""

    def __init__(self, iterable: Iterable, desc: str, total: int, initial: int = 0) -> None:
        self.iterable, self.desc, self.total, self.done = iterable, desc, total, initial
        self.postfix = ""
        self.reported_tenth = initial * 10 // max(1, total)
        self.reported_at = time.monotonic()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.done += 1
            tenth = self.done * 10 // max(1, self.total)
            now = time.monotonic()
            if tenth > self.reported_tenth or now - self.reported_at >= LOG_EVERY_S:
                self.reported_tenth, self.reported_at = tenth, now
                percent = 100 * self.done // max(1, self.total)
                log(f"{self.desc}: {self.done}/{self.total} ({percent}%)"
                    + (f", {self.postfix}" if self.postfix else ""))


def report_progress(iterable: Iterable, desc: str, total: int, initial: int = 0,
                    ) -> tqdm | LogProgress:
    if sys.stderr.isatty():
        return tqdm(iterable, desc=desc, total=total, initial=initial, leave=False)
    return LogProgress(iterable, desc, total, initial)
