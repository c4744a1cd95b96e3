"""Progress that reads well wherever it goes: the one progress helper of the pipeline.

On a terminal, tqdm's bars. Off one (`./run.sh > log`, CI, a pipe), a bar's redraws would all land in the file
(237 KB of carriage returns for the demo): there, a plain line every MASKFOLD_PROGRESS_EVERY_S seconds (10) with
the count, the rate and the time left, and for a loop that keeps its bar (leave=True) one line when it ends.
Loops shorter than the interval that do not keep their bar (an epoch, a validation) print nothing: their stage
prints its own line.

    for item in progress(items, desc="decode", unit="img"): ...
    bar = progress(total=n, desc="fold 0"); bar.update(); bar.set_postfix(loss="0.31"); bar.close()
"""
from __future__ import annotations

import os
import sys
import time

EVERY_S = float(os.environ.get("MASKFOLD_PROGRESS_EVERY_S", "10"))


def on_terminal() -> bool:
    return sys.stderr.isatty()


def progress(iterable=None, total: int | None = None, desc: str = "", unit: str = "it", leave: bool = True):
    """tqdm on a terminal, `Lines` elsewhere; both iterate, update, set_postfix, write, close and work as a
    context."""
    if on_terminal():
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave)
    return Lines(iterable, total, desc, unit, leave)


class Lines:
    """tqdm's interface, written as plain lines on stderr every EVERY_S seconds (tqdm's own `mininterval` still
    redraws in place with carriage returns: written by hand for the log-file case only)."""

    def __init__(self, iterable=None, total: int | None = None, desc: str = "", unit: str = "it", leave: bool = True):
        self.iterable, self.desc, self.unit, self.leave = iterable, desc, unit, leave
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.n, self.postfix, self.closed = total, 0, "", False
        self.started = self.last = time.monotonic()

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.update()
        finally:
            self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= EVERY_S:
            self.last = now
            print(self.line(now), file=sys.stderr, flush=True)

    def write(self, text: str) -> None:
        """A line of the loop's own, as tqdm.write prints it (stdout)."""
        print(text, flush=True)

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{key}={value}" for key, value in values.items())

    def line(self, now: float, done: bool = False) -> str:
        elapsed = max(now - self.started, 1e-9)
        rate = self.n / elapsed
        count = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        tail = f"done in {elapsed:.1f} s" if done else (
            f"{elapsed:.0f} s, about {(self.total - self.n) / rate:.0f} s left" if self.total and rate else
            f"{elapsed:.0f} s")
        extra = f", {self.postfix}" if self.postfix else ""
        return f"[{self.desc}] {count} {self.unit} ({rate:.1f} {self.unit}/s, {tail}{extra})"

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        now = time.monotonic()
        if self.leave or now - self.started >= EVERY_S:
            print(self.line(now, done=True), file=sys.stderr, flush=True)
