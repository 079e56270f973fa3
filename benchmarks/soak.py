#!/usr/bin/env python
"""Soak: many small tasks through one LocalCluster; does memory stay flat?

Submits ``--n`` tasks (default 100,000) to a ``LocalCluster(4)`` in batches of ``--batch``
(``ex.map(inc, range(batch), chunksize=1)``, every result consumed and checked), and
samples the resident memory (RSS) of the client (this process), of every controller
process (hub, heartbeat, mux, control, iopub, task: the children of the ``controller``
subprocess, named from the controller's log line ``controller up: hub=PID, ...``, else by
fork order) and of the engines, at the start, every ``--every`` tasks and at the end.

    python benchmarks/soak.py                       # 100k tasks (a minute or a few)
    python benchmarks/soak.py --n 20000             # shorter
    python benchmarks/soak.py --markdown docs/performance.md   # also write the figures there
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import shlex
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import psutil  # noqa: E402

import _workloads as W  # noqa: E402

PARTS = ("hub", "heartbeat", "mux", "control", "iopub", "task")  # the supervisor's fork order
MIB = 2**20


def cluster_processes(cluster) -> dict[str, psutil.Process]:
    """name -> process for the client, each controller part and each engine."""
    out = {"client": psutil.Process()}
    ctl = psutil.Process(cluster.procs["controller"].pid)
    kids = sorted(ctl.children(), key=lambda p: p.pid)
    by_pid = {}
    try:
        with open(cluster.logs["controller"], errors="replace") as f:
            m = re.search(r"controller up: (.*)", f.read())
        if m:
            for part in m.group(1).split(","):
                name, _, pid = part.strip().partition("=")
                by_pid[int(pid)] = name
    except (OSError, ValueError):
        by_pid = {}
    for i, p in enumerate(kids):
        name = by_pid.get(p.pid) or (PARTS[i] if i < len(PARTS) else f"controller-child{i}")
        out[name] = p
    out["controller-supervisor"] = ctl
    eng = psutil.Process(cluster.procs["engines"].pid)
    out["engine-supervisor"] = eng
    for i, p in enumerate(sorted(eng.children(), key=lambda p: p.pid)):
        out[f"engine{i}"] = p
    return out


def rss(procs: dict[str, psutil.Process]) -> dict[str, float]:
    out = {}
    for name, p in procs.items():
        try:
            out[name] = p.memory_info().rss / MIB
        except psutil.Error:
            out[name] = float("nan")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000, help="tasks in all")
    ap.add_argument("--batch", type=int, default=5_000, help="tasks per ex.map call")
    ap.add_argument("--every", type=int, default=20_000, help="sample RSS every this many tasks")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--json", action="store_true", help="print the samples as JSON")
    ap.add_argument("--markdown", metavar="FILE", help="also write the figures into FILE")
    args = ap.parse_args(argv)

    from zexec import LocalCluster, __version__

    busy = psutil.cpu_percent(interval=1.0)  # other work on the machine skews the rates
    print(f"machine CPU use before the soak: {busy:.0f}%")
    samples = []
    t_start = time.monotonic()
    cluster = LocalCluster(args.workers)
    with cluster as ex:
        procs = cluster_processes(cluster)

        def sample(label: str, done: int, rate: float | None) -> None:
            gc.collect()
            s = {"label": label, "tasks": done, "elapsed": time.monotonic() - t_run,
                 "rate": rate, "rss": rss(procs)}
            samples.append(s)
            r = s["rss"]
            print(f"{label:>10} {done:>8,} tasks {s['elapsed']:7.1f} s  "
                  f"{'' if rate is None else f'{rate:7,.0f} tasks/s'}  client {r['client']:6.1f} "
                  f"hub {r.get('hub', float('nan')):6.1f} task {r.get('task', float('nan')):6.1f} "
                  f"MiB", flush=True)

        t_run = time.monotonic()
        sample("start", 0, None)
        done, next_sample, t_batch, done_at_sample = 0, args.every, time.monotonic(), 0
        while done < args.n:
            k = min(args.batch, args.n - done)
            total = 0
            for r in ex.map(W.inc, range(k), chunksize=1, timeout=600):
                total += r
            if total != k * (k + 1) // 2:
                raise AssertionError(f"wrong results in batch at {done}")
            done += k
            if done >= next_sample or done >= args.n:
                now = time.monotonic()
                rate = (done - done_at_sample) / (now - t_batch)
                sample("end" if done >= args.n else "", done, rate)
                t_batch, done_at_sample = now, done
                next_sample += args.every
        time.sleep(2.0)
        sample("idle +2 s", done, None)
        status = ex.status()
        pending = len(getattr(ex.client, "_futures", ()))
    wall = time.monotonic() - t_start
    left = [p for p in psutil.Process().children(recursive=True)
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

    first, last = samples[0]["rss"], samples[-2]["rss"]
    names = list(first)
    print()
    print(f"{'process':<22}{'start MiB':>10}{'end MiB':>10}{'growth':>10}")
    for n in names:
        print(f"{n:<22}{first[n]:>10.1f}{last[n]:>10.1f}{last[n] - first[n]:>+10.1f}")
    print(f"\n{done:,} tasks in {samples[-2]['elapsed']:.1f} s "
          f"({done / samples[-2]['elapsed']:,.0f} tasks/s); wall {wall:.1f} s with start/stop")
    print(f"hub records at the end: {status.get('records')}, tasks by state: {status.get('tasks')}")
    print(f"client futures still registered: {pending}; processes left after stop: {len(left)}")

    if args.json:
        print(json.dumps({"samples": samples, "status": status, "pending": pending,
                          "left": len(left)}, indent=1, default=str))
    if args.markdown:
        cmd = shlex.join(["python", os.path.relpath(os.path.abspath(__file__)),
                          *(argv if argv is not None else sys.argv[1:])])
        write_markdown(args.markdown, samples, status, pending, len(left), done, cmd,
                       __version__, args, busy)
        print(f"wrote {args.markdown}", file=sys.stderr)
    return 0


MD_BEGIN = "<!-- soak.py:begin (generated by benchmarks/soak.py --markdown) -->"
MD_END = "<!-- soak.py:end -->"


def write_markdown(path, samples, status, pending, left, done, cmd, version, args,
                   busy) -> None:
    cols = ["client", "hub", "heartbeat", "mux", "control", "iopub", "task"]
    eng = [k for k in samples[0]["rss"] if re.fullmatch(r"engine\d+", k)]
    head = ["sample", "tasks", "elapsed s", "tasks/s"] + [f"{c} MiB" for c in cols] + \
           ["engines MiB (max)"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for s in samples:
        r = s["rss"]
        cells = [s["label"] or "", f"{s['tasks']:,}", f"{s['elapsed']:.1f}",
                 "" if s["rate"] is None else f"{s['rate']:,.0f}"]
        cells += [f"{r.get(c, float('nan')):.1f}" for c in cols]
        cells.append(f"{max(r[e] for e in eng):.1f}" if eng else "")
        lines.append("| " + " | ".join(cells) + " |")
    end = samples[-2]
    block = "\n".join([
        MD_BEGIN, "",
        f"{done:,} no-op-sized tasks (`inc`) through `LocalCluster({args.workers})`, "
        f"`ex.map` over batches of {args.batch:,} with chunksize 1, every result consumed; "
        f"{done / end['elapsed']:,.0f} tasks/s overall. RSS (MiB) of the client, of every "
        f"controller process and of the largest engine; the last row is 2 s after the last "
        f"batch. zexec {version}, Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs; machine CPU use in the second before the soak: {busy:.0f}%.",
        "",
        *lines, "",
        f"At the end the hub held {status.get('records')} task records "
        f"(tasks by state: `{json.dumps(status.get('tasks'))}`); the client had {pending} "
        f"futures registered; {left} processes were left after the cluster stopped.", "",
        "Command:", "", "```", cmd, "```", "", MD_END])
    text = open(path).read() if os.path.exists(path) else ""
    if MD_BEGIN in text and MD_END in text:
        pre, rest = text.split(MD_BEGIN, 1)
        text = pre + block + rest.split(MD_END, 1)[1]
    else:
        text = (text.rstrip("\n") + "\n\n" if text else "# Performance\n\n") + \
               "## Soak\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(text)


if __name__ == "__main__":
    sys.exit(main())
