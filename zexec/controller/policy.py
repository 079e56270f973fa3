"""Scheduling and heartbeat policy as pure functions of plain data (tested without sockets)."""

from __future__ import annotations

import math
from typing import Hashable, Mapping, Sequence


def choose_engine(order: Sequence[Hashable], loads: Mapping[Hashable, int],
                  capacity: Mapping[Hashable, int], start: int = 0) -> Hashable | None:
    """Least-load choice: the engine with the fewest outstanding tasks below its capacity.

    ``order`` lists engines in a stable order; ties go to the first engine at or after
    ``start`` in that order, so equal loads rotate instead of piling on engine 0.
    Returns None when every engine is at its bound.
    """
    n = len(order)
    best, best_load = None, None
    for i in range(n):
        e = order[(start + i) % n]
        load = loads[e]
        if load >= capacity[e]:
            continue
        if best_load is None or load < best_load:
            best, best_load = e, load
            if load == 0:
                break
    return best


def outstanding_bound(mean_runtime: float, mean_overhead: float,
                      lo: int = 2, hi: int = 16, alone: float = 0.02) -> int:
    """How many tasks an engine may hold so it never idles waiting for the next one.

    An engine that finishes a task waits ``mean_overhead`` (scheduler round trip) for a
    new one; with ``k`` queued it stays busy if ``(k - 1) * runtime >= overhead``.  Short
    tasks get deep queues (throughput), long tasks shallow ones (balance: a queued
    task cannot move to an idle engine).  Tasks so long that the wait costs at most
    ``alone`` of an engine's time get no queue at all: each goes to the first engine
    that frees, as in a process pool.
    """
    if mean_runtime <= 0:
        return hi
    ratio = mean_overhead / mean_runtime
    if ratio <= alone:
        return 1
    return max(lo, min(hi, 1 + math.ceil(ratio)))


def runs_long(running_for: float | None, mean_runtime: float | None,
              at_least: float = 0.05, factor: float = 4.0) -> bool:
    """Whether an engine's current task has run long enough that work queued behind it
    should go elsewhere: ``factor`` times the mean task, and at least ``at_least`` s.

    ``running_for`` is None when the engine has not reported its task started (engines
    report a task only once it runs past 10 ms).  The floor keeps tasks of ordinary,
    even if uneven, length (the balance workload's 0-20 ms) out of it entirely.
    """
    if running_for is None:
        return False
    return running_for >= max(at_least, factor * (mean_runtime or 0.0))


def give_back_from(loads: Mapping[Hashable, int], capacity: Mapping[Hashable, int],
                   long: Mapping[Hashable, bool], queued: int) -> list:
    """Engines that should give back the tasks waiting behind their long-running one.

    Only when nothing waits in the scheduler's own queue and an engine that can take
    work has none: then a task queued behind a long one would wait although an engine
    is free.  ``loads`` counts each engine's outstanding tasks (the running one
    included), ``long`` says whether its current task runs long (``runs_long``).
    """
    if queued or not any(n == 0 and capacity[e] > 0 for e, n in loads.items()):
        return []
    return [e for e, n in loads.items() if n > 1 and long.get(e)]


def heart_failures(last_seen: Mapping[Hashable, int], beat: int, misses: int) -> list:
    """Hearts whose last answered beat is more than ``misses`` beats behind ``beat``."""
    return [h for h, b in last_seen.items() if beat - b > misses]


def ewma(old: float | None, value: float, alpha: float = 0.1) -> float:
    return value if old is None else old + alpha * (value - old)
