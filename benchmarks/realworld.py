#!/usr/bin/env python
"""Real programs that take an executor, on zexec and on ProcessPoolExecutor.

Usage::

    python benchmarks/realworld.py                        # every workload, every pool (~3-5 min)
    python benchmarks/realworld.py --workloads emcee,partial --pools zexec,fork
    python benchmarks/realworld.py --markdown docs/performance.md   # also write the table there

Each workload is what a user script does with a pool it is handed: dask array
(``dask.compute(expr, scheduler=ex)``), scipy ``differential_evolution`` and ``brute``
(``workers=ex.map``), emcee (``EnsembleSampler(..., pool=ex)``), 100 small
``ex.map(functools.partial(f, k=3), range(16))`` calls, a loop of 20,000 ``ex.submit`` of
such a partial, and a 100 MB ``bytes`` round trip.
The user functions live in this script's ``__main__``, as in a real script: a pool that
cannot import them by name must send them by value.

Pools (4 workers each): zexec (``ZmqExecutor(max_workers=4)``), ``ProcessPoolExecutor``
with the fork start method, and with forkserver.  Every (pool, workload) pair runs in its
own fresh subprocess of this script (``--child POOL WORKLOAD``), as a user's program
would: its imports first (not timed), then *cold* = pool start + first run, then *warm* =
the median of ``--reps`` more runs on the same pool.  Seeds are fixed; each run's result
is reduced to a number and checked equal (to 1e-9) across pools.  Ratios are zexec time
/ PPE time: below 1 means zexec is faster.
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import os
import shlex
import statistics
import sys
import time

import numpy as np  # the user script's imports: a forking pool inherits them
import dask
import dask.array as da
import emcee
from scipy.optimize import brute, differential_evolution, rosen

HERE = os.path.dirname(os.path.abspath(__file__))
N_WORKERS = 4
RESULT_PREFIX = "@@RW "
POOLS = ["zexec", "fork", "forkserver"]
POOL_LABEL = {"zexec": "zexec", "fork": "fork", "forkserver": "forkserver"}  # PPE start methods


# -- the user's functions (in __main__, as in a script) --------------------------------
def objective(x):
    """The optimisers' objective: a user function around scipy's Rosenbrock."""
    return rosen(x)


def log_prob(x, ivar):
    """emcee's example target: a Gaussian."""
    return -0.5 * np.sum(ivar * x ** 2)


def f(x, k):
    return x * k + 1


def block_fn(b):
    """A per-block user function for dask's map_blocks."""
    return np.sqrt(b + 1.0)


def identity(x):
    return x


# -- workloads: each returns a number that must agree across pools ---------------------
def w_dask(ex) -> float:
    x = da.random.RandomState(0).random_sample((2000, 2000), chunks=(500, 500))
    y = x.map_blocks(block_fn)
    expr = (y + y.T).mean(axis=0).sum()
    (r,) = dask.compute(expr, scheduler=ex)
    return float(r)


def w_de(ex) -> float:
    r = differential_evolution(objective, [(-2, 2)] * 5, workers=ex.map, updating="deferred",
                               seed=0, maxiter=30, popsize=15, tol=0, atol=0, polish=False)
    return float(r.fun + r.x.sum())


def w_brute(ex) -> float:
    r = brute(objective, [(-2, 2)] * 3, Ns=12, workers=ex.map, finish=None, full_output=True)
    return float(r[1] + r[0].sum() + r[3].sum())


def w_emcee(ex) -> float:
    np.random.seed(42)
    ivar = 1.0 / np.random.rand(5)
    p0 = np.random.randn(32, 5)
    sampler = emcee.EnsembleSampler(32, 5, log_prob, args=[ivar], pool=ex)
    sampler.run_mcmc(p0, 100)
    return float(sampler.get_chain().sum())


def w_partial(ex) -> float:
    g = functools.partial(f, k=3)
    return float(sum(sum(ex.map(g, range(16))) for _ in range(100)))


def w_submits(ex) -> float:
    g = functools.partial(f, k=3)
    fs = [ex.submit(g, i) for i in range(20_000)]
    return float(sum(fut.result() for fut in fs))


_BLOB = None


def w_bytes(ex) -> float:
    global _BLOB
    if _BLOB is None:
        _BLOB = np.random.RandomState(0).bytes(100_000_000)
    back = ex.submit(identity, _BLOB).result()
    if back != _BLOB:
        raise AssertionError("the bytes came back changed")
    return float(len(back))


WORKLOADS = {
    "dask": ("dask array: `dask.compute((y + y.T).mean(0).sum(), scheduler=ex)`, "
             "y = x.map_blocks(user fn), 2000² in 16 chunks", w_dask),
    "de": ("scipy `differential_evolution(objective, 5 dims, workers=ex.map, "
           "updating='deferred')`, 30 generations of 75", w_de),
    "brute": ("scipy `brute(objective, 3 dims, Ns=12, workers=ex.map)`: one map of 1,728", w_brute),
    "emcee": ("emcee `EnsembleSampler(32, 5, log_prob, args=[ivar], pool=ex).run_mcmc(p0, 100)`",
              w_emcee),
    "partial": ("100 × `list(ex.map(functools.partial(f, k=3), range(16)))`", w_partial),
    "submits": ("`[ex.submit(functools.partial(f, k=3), i) for i in range(20_000)]`, "
                "then every result", w_submits),
    "bytes": ("100 MB `bytes` through `ex.submit(identity, b)` (round trip)", w_bytes),
}


# -- one (pool, workload) pair, in a fresh process -------------------------------------
def make_pool(name: str):
    if name == "zexec":
        from zexec import ZmqExecutor

        return ZmqExecutor(max_workers=N_WORKERS)
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(N_WORKERS, mp_context=multiprocessing.get_context(name))


def run_child(pool: str, workload: str, reps: int) -> int:
    fn = WORKLOADS[workload][1]
    if workload == "bytes":
        global _BLOB
        _BLOB = np.random.RandomState(0).bytes(100_000_000)  # made before the clock starts
    t0 = time.perf_counter()
    ex = make_pool(pool)
    try:
        value = fn(ex)
        cold = time.perf_counter() - t0
        warm, values = [], [value]
        for _ in range(reps):
            t = time.perf_counter()
            values.append(fn(ex))
            warm.append(time.perf_counter() - t)
    finally:
        ex.shutdown(wait=True)
    ok = all(abs(v - value) <= 1e-9 * max(1.0, abs(value)) for v in values)
    print(RESULT_PREFIX + json.dumps({"pool": pool, "workload": workload, "cold": cold,
                                      "warm": statistics.median(warm) if warm else None,
                                      "warm_all": warm, "value": value, "stable": ok}),
          flush=True)
    return 0


# -- the parent: every pair in its own subprocess, then one table ----------------------
def run_pair(pool: str, workload: str, reps: int, timeout: float) -> dict:
    from _workloads import run_child  # beside this script

    cmd = [sys.executable, os.path.abspath(__file__), "--child", pool, workload, "--reps", str(reps)]
    return run_child(cmd, RESULT_PREFIX, timeout)


def _ratio(z, p) -> str:
    return f"{z / p:.2f}" if z and p else "—"


def _secs(v) -> str:
    return "—" if v is None else (f"{v:.3f}" if v < 10 else f"{v:.1f}")


def build_table(results: dict, pools: list, workloads: list, markdown: bool) -> str:
    others = [p for p in pools if p != "zexec"]
    head = ["workload"] + [f"{POOL_LABEL[p]} cold s" for p in pools] + \
           [f"{POOL_LABEL[p]} warm s" for p in pools]
    if "zexec" in pools:
        head += [f"cold zexec/{POOL_LABEL[p]}" for p in others] + \
                [f"warm zexec/{POOL_LABEL[p]}" for p in others]
    head.append("results equal")
    body = []
    for w in workloads:
        r = results.get(w, {})
        cells = [w]
        for kind in ("cold", "warm"):
            cells += ["error" if "error" in r.get(p, {}) else _secs(r.get(p, {}).get(kind))
                      for p in pools]
        if "zexec" in pools:
            z = r.get("zexec", {})
            for kind in ("cold", "warm"):
                cells += [_ratio(z.get(kind), r.get(p, {}).get(kind)) for p in others]
        vals = [r[p]["value"] for p in pools if "value" in r.get(p, {})]
        same = vals and all(abs(v - vals[0]) <= 1e-9 * max(1.0, abs(vals[0])) for v in vals) \
            and all(r[p].get("stable") for p in pools if "value" in r.get(p, {}))
        cells.append("yes" if same and len(vals) == len(pools) else ("NO" if vals else "—"))
        body.append(cells)
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
        return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in body])
    widths = [max(len(row[i]) for row in [head] + body) for i in range(len(head))]
    out = ["  ".join(c.ljust(widths[j]) if j == 0 else c.rjust(widths[j]) for j, c in enumerate(row))
           for row in [head] + body]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


MD_BEGIN = "<!-- realworld.py:begin (generated by benchmarks/realworld.py --markdown) -->"
MD_END = "<!-- realworld.py:end -->"


def write_markdown(path: str, table: str, workloads: list, results: dict, command: str,
                   started: str, elapsed: float, reps: int, busy: float) -> None:
    sys.path.insert(0, HERE)
    import bench  # its machine description and section writer

    m = bench.machine_info()
    pk = ", ".join(f"{k} {v}" for k, v in m["packages"].items() if v not in ("?", "not installed"))
    errors = [f"- {w} on {POOL_LABEL[p]}: {r['error']}" for w in workloads
              for p, r in results.get(w, {}).items() if "error" in r]
    lines = [MD_BEGIN, "",
             f"Run {started}, {elapsed:.0f} s in all; {N_WORKERS} workers per pool; each "
             f"(pool, workload) pair in its own fresh process. Cold = pool start + first run; "
             f"warm = median of {reps} more runs on the same pool. Ratios are zexec time / "
             f"PPE time: **below 1 means zexec is faster**. Machine CPU use in the second "
             f"before the run: {busy:.0f}% (other work on the machine skews every number).", "",
             table, "", "Workloads (the user functions live in the script's `__main__`):", ""]
    lines += [f"- {w}: {WORKLOADS[w][0]}" for w in workloads]
    if errors:
        lines += ["", "Errors:", "", *errors]
    lines += ["", f"Machine: {m['nproc']} CPUs ({m['cpu']}), {m['platform']}, "
              f"Python {m['python']}. Packages: {pk}; scipy {_version('scipy')}, "
              f"emcee {_version('emcee')}. zexec source: {m['source']}.", "",
              "Command:", "", "```", command, "```", "", MD_END]
    bench.replace_section(path, MD_BEGIN, MD_END, "\n".join(lines), heading="## Real programs")


def _version(mod: str) -> str:
    try:
        return __import__(mod).__version__
    except Exception:  # noqa: BLE001
        return "?"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", default=",".join(WORKLOADS),
                    help=f"comma-separated subset of {','.join(WORKLOADS)}")
    ap.add_argument("--pools", default=",".join(POOLS), help=f"subset of {','.join(POOLS)}")
    ap.add_argument("--reps", type=int, default=3, help="warm runs after the cold one")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per (pool, workload)")
    ap.add_argument("--markdown", metavar="FILE", help="also write the table into FILE")
    ap.add_argument("--json", action="store_true", help="also print every figure as JSON")
    ap.add_argument("--child", nargs=2, metavar=("POOL", "WORKLOAD"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return run_child(args.child[0], args.child[1], args.reps)
    workloads = [w for w in args.workloads.split(",") if w]
    pools = [p for p in args.pools.split(",") if p]
    for w in workloads:
        if w not in WORKLOADS:
            ap.error(f"unknown workload {w!r}")
    for p in pools:
        if p not in POOLS:
            ap.error(f"unknown pool {p!r}")
    import psutil

    busy = psutil.cpu_percent(interval=1.0)
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    t0 = time.monotonic()
    results: dict = {}
    for w in workloads:
        for p in pools:
            t = time.monotonic()
            r = results.setdefault(w, {})[p] = run_pair(p, w, args.reps, args.timeout)
            state = r.get("error") or f"cold {r['cold']:.3f} s, warm {_secs(r['warm'])} s"
            print(f"  [{w} on {POOL_LABEL[p]}: {state}; {time.monotonic() - t:.0f} s]",
                  file=sys.stderr, flush=True)
    elapsed = time.monotonic() - t0
    print(build_table(results, pools, workloads, markdown=False))
    print(f"\nratios: zexec time / PPE time (below 1: zexec faster); machine CPU use before "
          f"the run {busy:.0f}%; total {elapsed:.0f} s")
    if args.json:
        print(json.dumps(results, indent=1))
    if args.markdown:
        command = shlex.join(["python", os.path.relpath(os.path.abspath(__file__)),
                              *(argv if argv is not None else sys.argv[1:])])
        write_markdown(args.markdown, build_table(results, pools, workloads, markdown=True),
                       workloads, results, command, started, elapsed, args.reps, busy)
        print(f"wrote {args.markdown}", file=sys.stderr)
    return 0 if all("error" not in r for rw in results.values() for r in rw.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
