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


def heart_failures(last_seen: Mapping[Hashable, int], beat: int, misses: int) -> list:
    """Hearts whose last answered beat is more than ``misses`` beats behind ``beat``."""
    return [h for h, b in last_seen.items() if beat - b > misses]


def ewma(old: float | None, value: float, alpha: float = 0.1) -> float:
    return value if old is None else old + alpha * (value - old)
