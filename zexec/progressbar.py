"""``zexec.progress``: a progress bar over futures as they complete, or over map results.

A tqdm bar when tqdm is installed (``pip install 'zexec[progress]'``); otherwise a plain
one-line bar when the stream is a terminal; nothing at all when it is not (a log file,
a pipe, CI), so wrapping a loop in ``progress`` never litters output.
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import Future, as_completed
from typing import Any, Iterable, Iterator

try:
    from tqdm import tqdm as _tqdm
except ImportError:  # the optional extra is not installed: the plain bar
    _tqdm = None

#: the plain bar redraws at most this often (seconds)
REDRAW = 0.1


def progress(items: Iterable, *, total: int | None = None, desc: str | None = None,
             file: Any = None) -> Iterator:
    """Show progress while iterating ``items``; yields what it yields.

    - A collection of futures (list, tuple, set, dict keys): yields each future as it
      completes, like ``concurrent.futures.as_completed``; the bar counts finished ones.
    - Anything else (``ex.map(...)`` results, any iterable): yields its items in their
      order, unchanged; the bar counts items.  A lazy iterator has no length: give
      ``total`` for a bar with an end (``progress(ex.map(f, xs), total=len(xs))``).

    ``file`` is the stream of the bar (default: ``sys.stderr``).
    """
    if isinstance(items, (list, tuple, set, frozenset, dict)) and items and all(
            isinstance(f, Future) for f in items):
        futures = list(items)
        return _run(as_completed(futures), len(futures), desc, file)
    if total is None:
        try:
            total = len(items)  # type: ignore[arg-type]
        except TypeError:
            total = None
    return _run(iter(items), total, desc, file)


def _run(it: Iterator, total: int | None, desc: str | None, file: Any) -> Iterator:
    file = sys.stderr if file is None else file
    if _tqdm is not None:
        # disable=None: tqdm stays silent when the stream is not a terminal, as ours does
        bar = _tqdm(total=total, desc=desc, file=file, disable=None)
        try:
            for x in it:
                bar.update(1)
                yield x
        finally:
            bar.close()
        return
    isatty = getattr(file, "isatty", None)
    if not (callable(isatty) and isatty()):
        yield from it
        return
    bar = _PlainBar(file, total, desc)
    try:
        for x in it:
            bar.update()
            yield x
    finally:
        bar.close()


class _PlainBar:
    """``desc [#########-----------]  45/100``, redrawn in place with a carriage return."""

    WIDTH = 30

    def __init__(self, file: Any, total: int | None, desc: str | None) -> None:
        self.file, self.total, self.desc = file, total, desc
        self.n = 0
        self.last = 0.0
        self.draw()

    def update(self) -> None:
        self.n += 1
        now = time.monotonic()
        if now - self.last >= REDRAW or self.n == self.total:
            self.draw()

    def draw(self) -> None:
        self.last = time.monotonic()
        head = f"{self.desc}: " if self.desc else ""
        if self.total:
            filled = min(self.WIDTH, self.WIDTH * self.n // self.total)
            line = f"{head}[{'#' * filled}{'-' * (self.WIDTH - filled)}] {self.n}/{self.total}"
        else:
            line = f"{head}{self.n} done"
        try:
            self.file.write("\r" + line)
            self.file.flush()
        except (OSError, ValueError):  # a closed stream: no bar, the work goes on
            pass

    def close(self) -> None:
        self.draw()
        try:
            self.file.write("\n")
            self.file.flush()
        except (OSError, ValueError):
            pass
