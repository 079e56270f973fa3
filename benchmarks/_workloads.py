"""Functions the benchmarks ship to workers.

They live in their own module (not in ``bench.py``'s ``__main__``) so every peer's workers
can import them by reference: ``bench.py`` puts this folder on ``PYTHONPATH`` before any
cluster starts, and zexec's LocalCluster also hands its client's ``sys.path`` to engines.
"""

from __future__ import annotations

import json
import os
import subprocess
import time


def noop() -> None:
    """The trivial task: nothing in, nothing out."""
    return None


def inc(x: int) -> int:
    """A per-item task for the map workloads (its results are checked)."""
    return x + 1


def identity(x):
    """Returns its argument: the data-transfer workload sends a large array through it."""
    return x


def sleep_for(seconds: float) -> float:
    """Sleeps; the load-balance workload's tasks.  Returns the time it slept."""
    time.sleep(seconds)
    return seconds


def run_chunk(fn, chunk):
    """Applies ``fn`` to each item of ``chunk``: chunked map for peers without chunksize."""
    return [fn(x) for x in chunk]


def getpid() -> int:
    return os.getpid()


def run_child(cmd: list, prefix: str, timeout: float) -> dict:
    """Run one benchmark child process; its result is the JSON on its line starting
    with ``prefix``, or an error that quotes the end of its stderr."""
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in p.stdout.splitlines():
        if line.startswith(prefix):
            return json.loads(line[len(prefix):])
    tail = " | ".join(p.stderr.strip().splitlines()[-3:])
    return {"error": f"exit {p.returncode}: {tail}"}
