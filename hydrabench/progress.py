"""What a long phase says while it runs: a bar on a terminal, and in logs (stderr not a terminal)
a line at every tenth of the work or every 30 s, whichever comes first; both with the rate and
the time left (tqdm's bar shows them itself, log lines through `eta`)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

from tqdm.auto import tqdm

LOG_EVERY_S = 30.0


def duration(seconds: float) -> str:
    """A time span as a person reads it: "40 s", "9 min", "2 h 05 min"."""
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def rate(count: float, seconds: float, unit: str) -> str:
    """Items per second, or per minute or hour where slower (a run takes minutes, not seconds)."""
    per_s = count / seconds
    scale, per = next(((k, p) for k, p in ((1, "s"), (60, "min")) if per_s * k >= 1), (3600, "h"))
    value = per_s * scale
    return f"{value:.2g} {unit}/{per}" if value < 10 else f"{value:.0f} {unit}/{per}"


def time_left(done: int, total: int, elapsed_s: float, unit: str, initial: int = 0) -> str:
    """ "3.1 runs/min, ETA 9 min": the rate so far and the time left at that rate. `initial`
    items were done before timing began (a resumed run): they count toward `done`, not the rate.
    With nothing timed yet the time left is unknown; when all is done, the time it took."""
    timed = done - initial
    if timed <= 0 or elapsed_s <= 0:
        return "ETA unknown" if done < total else "done"
    if done >= total:
        return f"{rate(timed, elapsed_s, unit)}, took {duration(elapsed_s)}"
    return f"{rate(timed, elapsed_s, unit)}, ETA {duration((total - done) * elapsed_s / timed)}"


def eta(done: int, total: int, elapsed_s: float, unit: str = "runs", initial: int = 0) -> str:
    """ "12/40 runs, 3.1 runs/min, ETA 9 min" (see `time_left`)."""
    return f"{done}/{total} {unit}, {time_left(done, total, elapsed_s, unit, initial)}"


def log(message: str) -> None:
    print(f"[hydrabench] {message}", file=sys.stderr, flush=True)


class LogProgress:
    """tqdm's iteration and `set_postfix` for logs: one line per tenth of `total` or 30 s."""

    def __init__(self, iterable: Iterable, desc: str, total: int, initial: int = 0,
                 unit: str | None = None) -> None:
        self.iterable, self.desc, self.total, self.done = iterable, desc, total, initial
        self.initial, self.unit = initial, unit  # unit None: no rate or time left in the line
        self.postfix = ""
        self.reported_tenth = initial * 10 // max(1, total)
        self.started_at = self.reported_at = time.monotonic()

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
                log(self.line(now - self.started_at))

    def line(self, elapsed_s: float) -> str:
        percent = 100 * self.done // max(1, self.total)
        timing = (f", {time_left(self.done, self.total, elapsed_s, self.unit, self.initial)}"
                  if self.unit else "")
        return (f"{self.desc}: {self.done}/{self.total} ({percent}%){timing}"
                + (f", {self.postfix}" if self.postfix else ""))


def report_progress(iterable: Iterable, desc: str, total: int, initial: int = 0,
                    unit: str = "steps") -> tqdm | LogProgress:
    """A bar with rate and time left on a terminal (tqdm's own), else log lines with both."""
    if sys.stderr.isatty():
        return tqdm(iterable, desc=desc, total=total, initial=initial, leave=False, unit=unit)
    return LogProgress(iterable, desc, total, initial, unit)
