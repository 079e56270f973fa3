#!/usr/bin/env python
"""Growth: a flood of submits or a huge map, all in flight at once; where does memory go?

For each size (10k and 100k no-ops; 1M with ``--million``, several minutes) and each way
of sending them (``submit``: ``fs = [ex.submit(noop) for ...]`` then every result;
``map``: ``for r in ex.map(inc, range(n))``, chunksize 1), on zexec
(``ZmqExecutor(max_workers=4)``) and on ProcessPoolExecutor (fork), each run in its own
fresh subprocess: the time, and the resident memory (RSS, psutil, sampled every 50 ms)
of the client, of the task scheduler and of the largest other controller process, at
the start, at the peak, and 2 s after the last result (the futures dropped); and the
controller process (hub, heartbeat, MUX, control, IOPub, task scheduler) that kept the
most of what it took: its growth from start to after.

    python benchmarks/growth.py                   # 10k and 100k (a few minutes)
    python benchmarks/growth.py --million         # also 1M (add ~10 minutes)
    python benchmarks/growth.py --pools zexec --sizes 20000 --modes submit
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import psutil  # noqa: E402

import _workloads as W  # noqa: E402

MIB = 2**20
PREFIX = "@@GROWTH "
CONTROLLER = ("hub", "heartbeat", "mux", "control", "iopub", "task")


class Sampler:
    """Samples the RSS of named processes every ``period`` seconds, keeping the peak."""

    def __init__(self, procs: dict, period: float = 0.05) -> None:
        self.procs = procs
        self.period = period
        self.peak: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> dict[str, float]:
        out = {}
        for name, p in self.procs.items():
            try:
                out[name] = p.memory_info().rss / MIB
            except psutil.Error:
                pass
        return out

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            for k, v in self.now().items():
                self.peak[k] = max(self.peak.get(k, 0.0), v)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_child(pool: str, mode: str, n: int) -> int:
    if pool == "zexec":
        from soak import cluster_processes

        from zexec import ZmqExecutor

        ex = ZmqExecutor(max_workers=4)
        procs = {k: v for k, v in cluster_processes(ex.cluster).items()
                 if k == "client" or k in CONTROLLER}
    else:
        from concurrent.futures import ProcessPoolExecutor

        ex = ProcessPoolExecutor(4)
        ex.submit(W.noop).result()  # the workers exist
        procs = {"client": psutil.Process()}
        procs.update({f"worker{i}": p for i, p in enumerate(psutil.Process().children())})
    try:
        sampler = Sampler(procs)
        gc.collect()
        start = sampler.now()
        with sampler:
            t = time.perf_counter()
            if mode == "submit":
                fs = [ex.submit(W.noop) for _ in range(n)]
                submitted = time.perf_counter() - t
                for f in fs:
                    f.result()
                del fs, f
            else:
                submitted = None
                total = 0
                for r in ex.map(W.inc, range(n)):
                    total += r
                if total != n * (n + 1) // 2:
                    raise AssertionError("wrong results")
            elapsed = time.perf_counter() - t
            gc.collect()
            time.sleep(2.0)  # after the drain: does the memory come back?
            after = sampler.now()
        peak = {k: max(v, sampler.peak.get(k, 0.0), after.get(k, 0.0)) for k, v in start.items()}
    finally:
        ex.shutdown(wait=True)
    print(PREFIX + json.dumps({"pool": pool, "mode": mode, "n": n, "elapsed": elapsed,
                               "submitted": submitted, "start": start, "peak": peak,
                               "after": after}), flush=True)
    return 0


def run_pair(pool: str, mode: str, n: int, timeout: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", pool, mode, str(n)]
    return W.run_child(cmd, PREFIX, timeout)


def _cells(r: dict) -> list[str]:
    if "error" in r:
        return [r["error"]] + [""] * 9
    s, pk, a = r["start"], r["peak"], r["after"]
    others = [k for k in s if k != "client" and k != "task"]

    def mem(d, k):
        return f"{d[k]:.0f}" if k in d else "—"

    def worst(d):
        return f"{max(d[k] for k in others):.0f}" if others else "—"

    def kept():
        grown = [(a[k] - s[k], k) for k in s if k != "client" and k in a]
        if not grown:
            return "—"
        d, k = max(grown)
        return f"{k} {d:+.0f}"

    rate = r["n"] / r["elapsed"]
    return [f"{r['elapsed']:.1f}", f"{rate:,.0f}", mem(s, "client"), mem(pk, "client"),
            mem(a, "client"), mem(s, "task"), mem(pk, "task"), mem(a, "task"),
            f"{worst(s)} / {worst(pk)} / {worst(a)}", kept()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,100000", help="comma-separated task counts")
    ap.add_argument("--million", action="store_true", help="add 1,000,000 (takes minutes)")
    ap.add_argument("--pools", default="zexec,ppe", help="subset of zexec,ppe")
    ap.add_argument("--modes", default="submit,map", help="subset of submit,map")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return run_child(args.child[0], args.child[1], int(args.child[2]))
    sizes = [int(x) for x in args.sizes.split(",") if x] + ([1_000_000] if args.million else [])
    head = ["pool", "mode", "tasks", "s", "tasks/s", "client MiB start", "client peak",
            "client after", "task sched. start", "task sched. peak", "task sched. after",
            "other ctl. max start / peak / after", "ctl. most kept (after - start)"]
    rows = []
    for n in sizes:
        for mode in args.modes.split(","):
            for pool in args.pools.split(","):
                r = run_pair(pool, mode, n, args.timeout)
                rows.append([pool, mode, f"{n:,}", *_cells(r)])
                print("  [" + " ".join(rows[-1][:5]) + "]", file=sys.stderr, flush=True)
    widths = [max(len(row[i]) for row in [head] + rows) for i in range(len(head))]
    print("  ".join(h.rjust(w) for h, w in zip(head, widths)))
    for row in rows:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
    print("\nRSS in MiB; 'after' = 2 s after the last result, futures dropped. PPE has no "
          "controller: its 'task sched.' columns are empty; 'other' is its largest worker, "
          "and 'most kept' its worker that kept the most.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
