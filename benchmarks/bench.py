#!/usr/bin/env python
"""zexec against its peers, on the same workloads, each peer in its own subprocess.

Usage::

    python benchmarks/bench.py                     # every importable peer, full sizes (~4-5 min)
    python benchmarks/bench.py --quick             # smaller sizes (~1 min)
    python benchmarks/bench.py --peers zexec,ppe   # a subset
    python benchmarks/bench.py --markdown docs/performance.md   # also write the table there
    python benchmarks/bench.py --peer zexec --json # one peer, here, as JSON lines (what the
                                                   # parent runs for each peer)

Peers (4 workers each): zexec (``ZmqExecutor(max_workers=4)``), the stdlib
``ProcessPoolExecutor`` (default start method: fork on Linux), and, when importable, loky,
ipyparallel and dask.distributed (``pip install -e '.[bench]'``).  A peer that cannot start
is skipped, and the reason printed.

The parent runs ``bench.py --peer NAME --json`` for each peer, one after another, reads one
JSON object per line from its stdout (so a peer that hangs or is killed still reports what
it measured), then sweeps for processes that outlived the subprocess (and ends them), and
prints one table with zexec's ratio to each peer, oriented so that >1 means zexec is better.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import _workloads as W  # noqa: E402  (shipped to workers by reference)

N_WORKERS = 4
TAG_VAR = "ZEXEC_BENCH_TAG"  # marks every process a peer subprocess starts (orphan sweep)
RESULT_PREFIX = "@@BENCH "
TASK_TIMEOUT = 120.0  # no single wait in a workload may exceed this

SIZES = {
    "full": dict(lat_warm=50, lat_n=500, tput_n=5000, tput_reps=3, map_n=20000, map1_reps=1,
                 map100_reps=3, arr_mib=64, arr_reps=3, lb_n=160, lb_reps=3, lb_max=0.020,
                 rep_budget=10.0, peer_timeout=200.0),
    "quick": dict(lat_warm=20, lat_n=100, tput_n=1000, tput_reps=1, map_n=2000, map1_reps=1,
                  map100_reps=1, arr_mib=16, arr_reps=1, lb_n=160, lb_reps=1, lb_max=0.020,
                  rep_budget=10.0, peer_timeout=120.0),
}

PEERS = ["zexec", "zexec-pure", "ppe", "loky", "ipyparallel", "dask"]
PEER_LABEL = {"zexec": "zexec", "zexec-pure": "pure", "ppe": "PPE", "loky": "loky",
              "ipyparallel": "ipp", "dask": "dask"}
PEER_MODULE = {"zexec": "zexec", "zexec-pure": "zexec", "ppe": "concurrent.futures", "loky": "loky",
               "ipyparallel": "ipyparallel", "dask": "distributed"}
PEER_API = {
    "zexec": "`ZmqExecutor(max_workers=4)`: `submit`, `map(chunksize=)`; direct = `ex.engine(0)`",
    "zexec-pure": "`ZmqExecutor(max_workers=4, scheme=\"pure\")`: load-balanced by the client "
                  "through the C MUX device (no task scheduler on the path)",
    "ppe": "`concurrent.futures.ProcessPoolExecutor(4)` (fork): `submit`, `map(chunksize=)`",
    "loky": "`loky.ProcessPoolExecutor(4)`: `submit`, `map(chunksize=)`",
    "ipyparallel": "`ipp.Cluster(n=4).start_and_connect_sync()`; `load_balanced_view()` "
                   "`.executor.submit`, `.map(chunksize=)`; direct = `rc[0].apply_async`",
    "dask": "`Client(LocalCluster(n_workers=4, threads_per_worker=1, processes=True))`: "
            "`client.submit/map(pure=False)` + `gather`; chunksize 100 = `client.map` over "
            "chunks; direct = `submit(workers=[first worker])`",
}


# ---------------------------------------------------------------------------------------
# rows of the table: key, label (may use sizes), unit, which way is better
# ---------------------------------------------------------------------------------------
def rows(cfg: dict) -> list[tuple[str, str, str, str]]:
    return [
        ("startup", "1. startup to first result", "s", "lower"),
        ("lat_med", f"2. no-op round trip, load-balanced, median (n={cfg['lat_n']})", "µs",
         "lower"),
        ("lat_p99", "2. no-op round trip, load-balanced, p99", "µs", "lower"),
        ("dlat_med", "2. no-op round trip, direct (engine 0), median", "µs", "lower"),
        ("dlat_p99", "2. no-op round trip, direct (engine 0), p99", "µs", "lower"),
        ("tput", f"3. {cfg['tput_n']:,} no-op submits, then wait all", "tasks/s", "higher"),
        ("map1", f"4. map over {cfg['map_n']:,} items, chunksize 1", "items/s", "higher"),
        ("map100", f"4. map over {cfg['map_n']:,} items, chunksize 100", "items/s", "higher"),
        ("array", f"5. {cfg['arr_mib']} MiB numpy array through identity", "GB/s", "higher"),
        ("balance", f"6. {cfg['lb_n']} random 0-{cfg['lb_max'] * 1000:g} ms sleeps: "
                    "makespan / ideal", "x", "lower"),
        ("shutdown", "7. shutdown", "s", "lower"),
        ("leftover", "8. child processes alive 2 s after shutdown", "count", "lower"),
        ("orphans", "8b. processes alive after the bench subprocess exits", "count", "lower"),
    ]


# ---------------------------------------------------------------------------------------
# peers: each exposes submit / direct_submit / gather / map / shutdown
# ---------------------------------------------------------------------------------------
class Peer:
    name = "?"
    #: the direct (one-worker) row uses plain submit for peers without such a thing
    has_direct = False

    def start(self) -> None:
        raise NotImplementedError

    def submit(self, fn, *args):
        return self.ex.submit(fn, *args)

    def direct_submit(self, fn, *args):
        return self.submit(fn, *args)

    def result(self, fut):
        return fut.result(TASK_TIMEOUT)

    def gather(self, futs: list) -> list:
        return [f.result(TASK_TIMEOUT) for f in futs]

    def map(self, fn, items, chunksize: int) -> list:
        return list(self.ex.map(fn, items, chunksize=chunksize, timeout=TASK_TIMEOUT))

    def shutdown(self) -> None:
        self.ex.shutdown(wait=True)


class ZexecPeer(Peer):
    name = "zexec"
    has_direct = True

    def start(self) -> None:
        from zexec import ZmqExecutor
        self.ex = ZmqExecutor(max_workers=N_WORKERS)
        self.direct = self.ex.engine(min(self.ex.engines))

    def direct_submit(self, fn, *args):
        return self.direct.submit(fn, *args)


class ZexecPurePeer(ZexecPeer):
    name = "zexec-pure"

    def start(self) -> None:
        from zexec import ZmqExecutor
        self.ex = ZmqExecutor(max_workers=N_WORKERS, scheme="pure")
        self.direct = self.ex.engine(min(self.ex.engines))


class PPEPeer(Peer):
    name = "ppe"

    def start(self) -> None:
        from concurrent.futures import ProcessPoolExecutor
        self.ex = ProcessPoolExecutor(N_WORKERS)


class LokyPeer(Peer):
    name = "loky"

    def start(self) -> None:
        import loky
        self.ex = loky.ProcessPoolExecutor(max_workers=N_WORKERS)

    def map(self, fn, items, chunksize: int) -> list:
        return list(self.ex.map(fn, items, chunksize=chunksize, timeout=TASK_TIMEOUT))


class IppPeer(Peer):
    name = "ipyparallel"
    has_direct = True

    def start(self) -> None:
        import logging

        import ipyparallel as ipp
        self.cluster = ipp.Cluster(n=N_WORKERS, log_level=logging.ERROR)
        self.rc = self.cluster.start_and_connect_sync()
        self.rc.wait_for_engines(N_WORKERS, timeout=60)
        self.view = self.rc.load_balanced_view()
        self.ex = self.view.executor
        self.dview = self.rc[min(self.rc.ids)]

    def direct_submit(self, fn, *args):
        return self.dview.apply_async(fn, *args)

    def result(self, fut):
        return fut.get(TASK_TIMEOUT)

    def gather(self, futs: list) -> list:
        return [f.get(TASK_TIMEOUT) for f in futs]

    def map(self, fn, items, chunksize: int) -> list:
        ar = self.view.map(fn, items, chunksize=chunksize, block=False)
        return list(ar.get(TASK_TIMEOUT))

    def shutdown(self) -> None:
        self.rc.close()
        self.cluster.stop_cluster_sync()


class DaskPeer(Peer):
    name = "dask"
    has_direct = True

    def start(self) -> None:
        import logging

        from distributed import Client, LocalCluster
        warnings.filterwarnings("ignore", message=".*Large object.*")
        warnings.filterwarnings("ignore", message=".*Sending large graph.*")
        self.cluster = LocalCluster(n_workers=N_WORKERS, threads_per_worker=1, processes=True,
                                    dashboard_address=None, silence_logs=logging.ERROR)
        self.client = Client(self.cluster)
        self.worker0 = sorted(self.client.scheduler_info()["workers"])[0]

    def submit(self, fn, *args):
        return self.client.submit(fn, *args, pure=False)

    def direct_submit(self, fn, *args):
        return self.client.submit(fn, *args, pure=False, workers=[self.worker0])

    def gather(self, futs: list) -> list:
        return self.client.gather(futs)

    def map(self, fn, items, chunksize: int) -> list:
        items = list(items)
        if chunksize == 1:
            return self.client.gather(self.client.map(fn, items, pure=False))
        chunks = [items[i:i + chunksize] for i in range(0, len(items), chunksize)]
        fs = self.client.map(W.run_chunk, [fn] * len(chunks), chunks, pure=False)
        return [x for part in self.client.gather(fs) for x in part]

    def shutdown(self) -> None:
        self.client.close()
        self.cluster.close()


PEER_CLASS = {"zexec": ZexecPeer, "zexec-pure": ZexecPurePeer, "ppe": PPEPeer, "loky": LokyPeer,
              "ipyparallel": IppPeer, "dask": DaskPeer}


# ---------------------------------------------------------------------------------------
# the workloads: each a function of (peer, cfg) returning a number (or a few named ones)
# ---------------------------------------------------------------------------------------
def w_startup(peer: Peer, cfg: dict) -> float:
    """Constructing the executor/cluster until the first result of a trivial task."""
    t0 = time.perf_counter()
    peer.start()
    peer.result(peer.submit(W.noop))
    return time.perf_counter() - t0


def _latencies(submit, result, cfg: dict) -> dict:
    for _ in range(cfg["lat_warm"]):
        result(submit(W.noop))
    samples = []
    for _ in range(cfg["lat_n"]):
        t = time.perf_counter()
        result(submit(W.noop))
        samples.append(time.perf_counter() - t)
    samples.sort()
    p99 = samples[min(len(samples) - 1, int(round(0.99 * (len(samples) - 1))))]
    return {"med": statistics.median(samples) * 1e6, "p99": p99 * 1e6}


def w_latency(peer: Peer, cfg: dict) -> dict:
    r = _latencies(peer.submit, peer.result, cfg)
    return {"lat_med": r["med"], "lat_p99": r["p99"]}


def w_direct_latency(peer: Peer, cfg: dict) -> dict:
    r = _latencies(peer.direct_submit, peer.result, cfg)
    return {"dlat_med": r["med"], "dlat_p99": r["p99"]}


def _reps(cfg: dict, reps: int):
    """Up to ``reps`` repeats; another starts only while the workload has used less than
    ``rep_budget`` seconds (slow peers get one repeat, keeping the whole run short)."""
    t0 = time.monotonic()
    for i in range(reps):
        if i and time.monotonic() - t0 > cfg["rep_budget"]:
            return
        yield i


def w_throughput(peer: Peer, cfg: dict) -> float:
    n, rates = cfg["tput_n"], []
    for _ in _reps(cfg, cfg["tput_reps"]):
        t = time.perf_counter()
        futs = [peer.submit(W.noop) for _ in range(n)]
        peer.gather(futs)
        rates.append(n / (time.perf_counter() - t))
        del futs
    return statistics.median(rates)


def _map_rate(peer: Peer, cfg: dict, chunksize: int, reps: int) -> float:
    n, rates = cfg["map_n"], []
    items = range(n)
    for _ in _reps(cfg, reps):
        t = time.perf_counter()
        out = peer.map(W.inc, items, chunksize)
        rates.append(n / (time.perf_counter() - t))
        if len(out) != n or out[0] != 1 or out[-1] != n:
            raise AssertionError(f"map returned wrong results (len {len(out)})")
    return statistics.median(rates)


def w_map1(peer: Peer, cfg: dict) -> float:
    return _map_rate(peer, cfg, 1, cfg["map1_reps"])


def w_map100(peer: Peer, cfg: dict) -> float:
    return _map_rate(peer, cfg, 100, cfg["map100_reps"])


def w_array(peer: Peer, cfg: dict) -> float:
    import numpy as np
    nbytes = cfg["arr_mib"] * 2**20
    arr = np.arange(nbytes // 8, dtype=np.float64)
    peer.result(peer.submit(W.identity, arr))  # warm-up (buffers, first-use paths)
    times = []
    for _ in range(cfg["arr_reps"]):
        t = time.perf_counter()
        out = peer.result(peer.submit(W.identity, arr))
        times.append(time.perf_counter() - t)
        if out.shape != arr.shape or out[-1] != arr[-1]:
            raise AssertionError("identity returned a different array")
        del out
    return nbytes / statistics.median(times) / 1e9


def lb_durations(cfg: dict) -> list[float]:
    rng = random.Random(20240611)  # the same durations for every peer
    return [rng.uniform(0.0, cfg["lb_max"]) for _ in range(cfg["lb_n"])]


def w_balance(peer: Peer, cfg: dict) -> float:
    durations = lb_durations(cfg)
    ideal = sum(durations) / N_WORKERS
    ratios = []
    for _ in _reps(cfg, cfg["lb_reps"]):
        t = time.perf_counter()
        futs = [peer.submit(W.sleep_for, d) for d in durations]
        peer.gather(futs)
        ratios.append((time.perf_counter() - t) / ideal)
    return statistics.median(ratios)


def w_shutdown(peer: Peer, cfg: dict) -> float:
    t = time.perf_counter()
    peer.shutdown()
    return time.perf_counter() - t


def live_children() -> list:
    import psutil
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            pass
    return out


def w_leftover(peer: Peer, cfg: dict) -> tuple[float, list]:
    """Children of this process still alive after shutdown (waiting up to 2 s for them)."""
    deadline = time.monotonic() + 2.0
    while True:
        alive = live_children()
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    names = []
    for p in alive:
        try:
            names.append(" ".join(p.cmdline())[:120])
        except Exception:  # noqa: BLE001
            names.append(f"pid {p.pid}")
    return float(len(alive)), names


WORKLOADS = [("startup", w_startup), ("latency", w_latency), ("direct", w_direct_latency),
             ("tput", w_throughput), ("map1", w_map1), ("map100", w_map100),
             ("array", w_array), ("balance", w_balance), ("shutdown", w_shutdown),
             ("leftover", w_leftover)]
#: workloads every run has: the peer must start, and is checked for leftovers
ALWAYS = ("startup", "shutdown", "leftover")


def emit(obj: dict) -> None:
    sys.stdout.write(RESULT_PREFIX + json.dumps(obj) + "\n")
    sys.stdout.flush()


def run_peer(name: str, cfg: dict) -> int:
    """Child mode: run every workload on one peer, one JSON line per result."""
    def on_term(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    peer = PEER_CLASS[name]()
    emit({"version": _version(PEER_MODULE[name])})
    started = shut = False
    try:
        for key, fn in WORKLOADS:
            if cfg.get("rows") and key not in cfg["rows"] and key not in ALWAYS:
                continue
            if key == "shutdown":
                shut = True  # whatever happens, do not shut down twice
            if key != "startup" and not started:
                break
            t = time.perf_counter()
            try:
                val = fn(peer, cfg)
            except BaseException as e:  # noqa: BLE001 - reported, then the next workload
                emit({"key": key, "error": f"{type(e).__name__}: {e}"[:500]})
                if isinstance(e, (KeyboardInterrupt, SystemExit)):
                    raise
                continue
            finally:
                sys.stderr.write(f"  [{name}] {key}: {time.perf_counter() - t:.1f} s\n")
            if key == "startup":
                started = True
            if key == "leftover":
                emit({"key": "leftover", "value": val[0], "detail": val[1]})
            elif isinstance(val, dict):
                for k, v in val.items():
                    emit({"key": k, "value": v})
            else:
                emit({"key": key, "value": val})
    finally:
        if started and not shut:
            try:
                peer.shutdown()
            except Exception:  # noqa: BLE001
                pass
    emit({"done": True})
    return 0


# ---------------------------------------------------------------------------------------
# parent: one subprocess per peer, then the table
# ---------------------------------------------------------------------------------------
def _version(module: str) -> str:
    from importlib import metadata
    dist = {"concurrent.futures": None, "distributed": "distributed"}.get(module, module)
    if dist is None:
        return f"stdlib (Python {platform.python_version()})"
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"


def importable(name: str) -> bool:
    import importlib.util
    mod = PEER_MODULE[name]
    try:
        return importlib.util.find_spec(mod) is not None
    except (ImportError, ValueError):
        return False


def sweep_orphans(tag: str, wait: float = 3.0) -> list[str]:
    """Processes carrying our tag that outlived the peer subprocess; ends them by pid."""
    import psutil

    def find():
        found = []
        for p in psutil.process_iter():
            if p.pid == os.getpid():
                continue
            try:
                if p.environ().get(TAG_VAR) == tag and p.status() != psutil.STATUS_ZOMBIE:
                    found.append(p)
            except psutil.Error:
                pass
        return found

    deadline = time.monotonic() + wait
    found = find()
    while found and time.monotonic() < deadline:
        time.sleep(0.1)
        found = find()
    desc = []
    for p in found:
        try:
            desc.append(f"{p.pid}: " + " ".join(p.cmdline())[:120])
            p.kill()
        except psutil.Error:
            pass
    return desc


def run_child(name: str, args, cfg: dict) -> dict:
    """Runs ``bench.py --peer NAME --json``; returns {key: value}, errors, notes."""
    tag = uuid.uuid4().hex
    env = dict(os.environ)
    env[TAG_VAR] = tag
    env.setdefault("PYTHONUNBUFFERED", "1")
    cmd = [sys.executable, os.path.abspath(__file__), "--peer", name, "--json"]
    if args.quick:
        cmd.append("--quick")
    if cfg.get("rows"):
        cmd += ["--rows", ",".join(cfg["rows"])]
    res: dict = {"values": {}, "errors": {}, "notes": [], "version": "?", "done": False}
    stderr_lines: list[str] = []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, stdin=subprocess.DEVNULL, start_new_session=True)

    def read_out():
        for line in proc.stdout:
            if not line.startswith(RESULT_PREFIX):
                continue
            msg = json.loads(line[len(RESULT_PREFIX):])
            if "version" in msg:
                res["version"] = msg["version"]
            elif msg.get("done"):
                res["done"] = True
            elif "error" in msg:
                res["errors"][msg["key"]] = msg["error"]
                log(f"[{name}] {msg['key']}: FAILED {msg['error']}")
            else:
                res["values"][msg["key"]] = msg["value"]
                if msg.get("detail"):
                    res["notes"].append(f"{msg['key']}: " + "; ".join(msg["detail"]))
                log(f"[{name}] {msg['key']} = {fmt(msg['value'])}")

    def read_err():
        for line in proc.stderr:
            stderr_lines.append(line)
            if args.verbose:
                sys.stderr.write(f"    {name}| {line}")

    threads = [threading.Thread(target=read_out, daemon=True),
               threading.Thread(target=read_err, daemon=True)]
    for t in threads:
        t.start()
    try:
        proc.wait(cfg["peer_timeout"])
    except subprocess.TimeoutExpired:
        log(f"[{name}] timed out after {cfg['peer_timeout']:.0f} s: sending SIGTERM")
        res["notes"].append(f"timed out after {cfg['peer_timeout']:.0f} s")
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for t in threads:
        t.join(5)
    orphans = sweep_orphans(tag)
    if res["values"]:
        res["values"]["orphans"] = float(len(orphans))
    if orphans:
        res["notes"].append("orphans (killed by the sweep): " + "; ".join(orphans))
    if proc.returncode not in (0, None) or not res["done"]:
        res["notes"].append(f"subprocess exit code {proc.returncode}")
    res["stderr_tail"] = "".join([ln for ln in stderr_lines if not ln.startswith("  [")][-15:])
    return res


def wait_quiet(max_wait: float, threshold: float = 20.0) -> float:
    """CPU use of the whole machine (%), sampled for 1 s; waits up to ``max_wait`` seconds
    for it to fall under ``threshold`` (other work on the machine skews every number)."""
    import psutil
    deadline = time.monotonic() + max_wait
    while True:
        busy = psutil.cpu_percent(interval=1.0)
        if busy < threshold or time.monotonic() >= deadline:
            if busy >= threshold:
                log(f"warning: the machine is busy ({busy:.0f}% CPU) before this peer")
            return busy
        log(f"machine busy ({busy:.0f}% CPU): waiting for it to quiet down")
        time.sleep(4.0)


def log(msg: str) -> None:
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


def fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, str):
        return v
    a = abs(v)
    if a == 0:
        return "0"
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def ratio(z, p, better: str, unit: str) -> str:
    if z is None or p is None:
        return "—"
    if unit == "count":
        return "=" if z == p else ("better" if z < p else "worse")
    if z <= 0 or p <= 0:
        return "—"
    r = z / p if better == "higher" else p / z
    return f"{r:.2f}"


def build_table(results: dict, cfg: dict, markdown: bool) -> str:
    peers = [p for p in PEERS if p in results]
    others = [p for p in peers if p != "zexec"]
    pure_vs_ppe = "zexec-pure" in peers and "ppe" in peers
    head = ["workload", "unit"] + [PEER_LABEL[p] for p in peers] + \
           [f"zexec/{PEER_LABEL[p]}" for p in others] + (["pure/PPE"] if pure_vs_ppe else [])
    body = []
    for key, label, unit, better in rows(cfg):
        vals = {p: results[p]["values"].get(key) for p in peers}
        cells = [label, unit + (" ↓" if better == "lower" else " ↑")]
        for p in peers:
            v = vals[p]
            if key.startswith("dlat") and p in ("ppe", "loky") and v is not None:
                cells.append(fmt(v) + "*")
            elif v is None and key in results[p]["errors"]:
                cells.append("error")
            elif unit == "count" and v is not None:
                cells.append(str(int(v)))
            else:
                cells.append(fmt(v))
        z = vals.get("zexec")
        cells += [ratio(z, vals[p], better, unit) for p in others]
        if pure_vs_ppe:
            cells.append(ratio(vals["zexec-pure"], vals["ppe"], better, unit))
        body.append(cells)
    if markdown:
        lines = ["| " + " | ".join(head) + " |",
                 "|" + "|".join(["---", "---"] + ["---:"] * (len(head) - 2)) + "|"]
        lines += ["| " + " | ".join(c) + " |" for c in body]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
    out = []
    for i, r in enumerate([head] + body):
        out.append("  ".join(c.ljust(widths[j]) if j == 0 else c.rjust(widths[j])
                             for j, c in enumerate(r)))
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


LEGEND = ("zexec/peer columns: >1 means zexec is better (less time, more throughput, "
          "better balance); ↓ = lower is better, ↑ = higher is better. "
          "`*` PPE and loky have no per-worker submit: their 'direct' rows repeat plain submit. "
          "Array GB/s = array bytes / round-trip time (the data crosses twice). "
          "Ideal makespan = sum(sleeps) / 4. Row 8 counts non-zombie descendants of the "
          "benchmark subprocess after shutdown; 8b counts processes (tagged by an environment "
          "variable) still alive 3 s after that subprocess exited — the sweep then kills them.")


def machine_info() -> dict:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import zmq
        libzmq = zmq.zmq_version()
    except Exception:  # noqa: BLE001
        libzmq = "?"
    pkgs = {}
    for mod in ("zexec", "pyzmq", "cloudpickle", "numpy", "psutil", "loky", "ipyparallel",
                "distributed", "dask"):
        pkgs[mod] = _version(mod)
    pkgs["libzmq"] = libzmq
    return {"nproc": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "platform": platform.platform(), "packages": pkgs, "source": source_state()}


def source_state() -> str:
    """The zexec source measured: git commit, and whether zexec/ had uncommitted changes."""
    try:
        import zexec
        root = os.path.dirname(os.path.dirname(os.path.abspath(zexec.__file__)))
        git = ["git", "-C", root]
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run([*git, "status", "--porcelain", "--", "zexec"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001 - not a git checkout
        return "?"
    if not head:
        return "not a git checkout"
    return f"git {head}" + (" with uncommitted changes in zexec/" if dirty else "")


MD_BEGIN = "<!-- bench.py:begin (generated by benchmarks/bench.py --markdown) -->"
MD_END = "<!-- bench.py:end -->"


def write_markdown(path: str, results: dict, cfg: dict, command: str, started: str,
                   elapsed: float, skipped: dict) -> None:
    m = machine_info()
    pk = ", ".join(f"{k} {v}" for k, v in m["packages"].items())
    lines = [MD_BEGIN, "",
             f"Run {started}, {elapsed:.0f} s in all, "
             f"{'`--quick` sizes' if cfg['mode'] == 'quick' else 'full sizes'}; "
             f"every peer with {N_WORKERS} workers, each peer in its own subprocess.", "",
             build_table(results, cfg, markdown=True), "", LEGEND, "",
             "Machine: " + f"{m['nproc']} CPUs ({m['cpu']}), {m['platform']}, "
             f"Python {m['python']}.", "", "Packages: " + pk + ".", "",
             f"zexec source: {m['source']}.", "",
             "Machine CPU use (all processes) in the second before each peer started: "
             + ", ".join(f"{PEER_LABEL[p]} {results[p].get('busy_before', float('nan')):.0f}%"
                         for p in PEERS if p in results)
             + " (other work on the machine skews every number).", "",
             "Command:", "", "```", command, "```", "", "Peers:", ""]
    for p in PEERS:
        if p in results:
            lines.append(f"- {PEER_LABEL[p]} ({results[p]['version']}): {PEER_API[p]}")
    for p, why in skipped.items():
        lines.append(f"- {PEER_LABEL[p]}: skipped — {why}")
    notes = [(p, n) for p in PEERS if p in results for n in results[p]["notes"]]
    notes += [(p, f"{k} failed: {e}") for p in PEERS if p in results
              for k, e in results[p]["errors"].items()]
    if notes:
        lines += ["", "Notes from the run:", ""]
        lines += [f"- {PEER_LABEL[p]}: {n}" for p, n in notes]
    lines += ["", MD_END]
    block = "\n".join(lines)
    replace_section(path, MD_BEGIN, MD_END, block, footer=(
        "\n\n## How to run\n\n```\npip install -e '.[bench]'\npython benchmarks/bench.py "
        "--markdown docs/performance.md\n```\n"))


def replace_section(path: str, begin: str, end: str, block: str, heading: str = "",
                    footer: str = "") -> None:
    """Put ``block`` (which starts with ``begin`` and ends with ``end``) into the file at
    ``path``: in place of the section between those markers, else at the end (under
    ``heading``); a new file gets a "# Performance" title and ``footer``."""
    text = None
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
    if text and begin in text and end in text:
        pre, rest = text.split(begin, 1)
        text = pre + block + rest.split(end, 1)[1]
    elif text:
        text = text.rstrip("\n") + "\n\n" + (heading + "\n\n" if heading else "") + block + "\n"
    else:
        text = "# Performance\n\n" + (heading + "\n\n" if heading else "") + block + footer + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    ap.add_argument("--peers", default=",".join(PEERS),
                    help=f"comma-separated subset of {','.join(PEERS)} (zexec is always run)")
    ap.add_argument("--peer", choices=PEERS, help="child mode: run one peer here")
    ap.add_argument("--json", action="store_true",
                    help="with --peer: JSON lines on stdout; otherwise print all results as JSON")
    ap.add_argument("--markdown", metavar="FILE", help="also write the table into FILE")
    ap.add_argument("--timeout", type=float, help="seconds allowed for each peer subprocess")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                    help="before each peer, wait up to this long for the machine's CPU use "
                         "to fall under 20%% (it is always measured and reported)")
    ap.add_argument("-v", "--verbose", action="store_true", help="echo the peers' stderr")
    ap.add_argument("--rows", metavar="KEYS",
                    help="comma-separated workloads to run, of " + ",".join(
                        k for k, _ in WORKLOADS if k not in ALWAYS) + " (default all; "
                        + ", ".join(ALWAYS) + " always run)")
    args = ap.parse_args(argv)
    cfg = dict(SIZES["quick" if args.quick else "full"], mode="quick" if args.quick else "full")
    if args.rows:
        cfg["rows"] = [k.strip() for k in args.rows.split(",") if k.strip()]
        unknown = set(cfg["rows"]) - {k for k, _ in WORKLOADS}
        if unknown:
            ap.error(f"unknown rows {sorted(unknown)}")
    if args.timeout:
        cfg["peer_timeout"] = args.timeout

    if args.peer:
        return run_peer(args.peer, cfg)

    # workers of every peer must import _workloads: put this folder on PYTHONPATH first
    pp = os.environ.get("PYTHONPATH", "")
    if HERE not in pp.split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join(x for x in (HERE, pp) if x)

    wanted = ["zexec"] + [p.strip() for p in args.peers.split(",")
                          if p.strip() and p.strip() != "zexec"]
    for p in wanted:
        if p not in PEERS:
            ap.error(f"unknown peer {p!r} (peers: {', '.join(PEERS)})")
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    t0 = time.monotonic()
    results, skipped = {}, {}
    for p in PEERS:
        if p not in wanted:
            continue
        if not importable(p):
            skipped[p] = f"{PEER_MODULE[p]} is not importable (pip install -e '.[bench]')"
            log(f"skipping {p}: {skipped[p]}")
            continue
        busy = wait_quiet(args.wait_quiet)
        log(f"== {p} (CPU busy before it: {busy:.0f}%)")
        t = time.monotonic()
        r = run_child(p, args, cfg)
        r["busy_before"] = busy
        log(f"== {p}: {time.monotonic() - t:.0f} s")
        if "startup" not in r["values"]:
            why = r["errors"].get("startup") or "; ".join(r["notes"]) or "no result"
            tail = r["stderr_tail"].strip().splitlines()[-3:]
            skipped[p] = f"did not start: {why}" + (f" ({' | '.join(tail)})" if tail else "")
            log(f"skipping {p}: {skipped[p]}")
            continue
        results[p] = r
    elapsed = time.monotonic() - t0

    if args.json:
        print(json.dumps({"sizes": cfg, "results": results, "skipped": skipped,
                          "machine": machine_info()}, indent=1, default=str))
    else:
        print()
        print(build_table(results, cfg, markdown=False))
        print()
        print(LEGEND)
        for p, why in skipped.items():
            print(f"skipped {p}: {why}")
        for p in PEERS:
            if p in results:
                for n in results[p]["notes"]:
                    print(f"note {p}: {n}")
                for k, e in results[p]["errors"].items():
                    print(f"error {p} {k}: {e}")
        print(f"total {elapsed:.0f} s")
    if args.markdown:
        rel = os.path.relpath(os.path.abspath(__file__))
        command = shlex.join(["python", rel, *(argv if argv is not None else sys.argv[1:])])
        write_markdown(args.markdown, results, cfg, command, started, elapsed, skipped)
        log(f"wrote {args.markdown}")
    return 0 if "zexec" in results else 1


if __name__ == "__main__":
    sys.exit(main())
