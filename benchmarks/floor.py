#!/usr/bin/env python
"""The round-trip floor of the seed's message path on this machine, next to PPE's.

A direct zexec task travels client -> MUX device -> engine -> MUX device -> client: four
process hops, each through libzmq's I/O threads.  This script times that path with no
zexec code at all (pyzmq's C ``monitored_queue`` as the device, a bare Python echo as
the engine, the client receiving in its own thread), and ProcessPoolExecutor's round trip,
in one run::

    python benchmarks/floor.py            # 2,000 round trips each, medians in µs

If the floor alone is above a target ratio, no change inside zexec can meet it on this
machine; what zexec adds on top of the floor is its own cost.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import zmq
from zmq.devices import monitored_queue

N = 2000
WARM = 200


def _noop() -> None:
    return None


def _device(a: str, b: str, mon: str) -> None:
    ctx = zmq.Context()
    front, back, pub = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER), ctx.socket(zmq.PUB)
    front.bind(a)
    back.bind(b)
    pub.bind(mon)
    monitored_queue(front, back, pub, b"in", b"out")


def _echo(b: str) -> None:
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.identity = b"engine"
    s.connect(b)
    while True:
        s.send_multipart(s.recv_multipart())


def _median(fn) -> float:
    for _ in range(WARM):
        fn()
    samples = []
    for _ in range(N):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples) * 1e6


def floor_us(tmp: str) -> float:
    a, b, m = (f"ipc://{tmp}/{n}" for n in ("client", "engine", "monitor"))
    procs = [mp.Process(target=_device, args=(a, b, m), daemon=True),
             mp.Process(target=_echo, args=(b,), daemon=True)]
    for p in procs:
        p.start()
    ctx = zmq.Context()
    c = ctx.socket(zmq.DEALER)
    c.connect(a)
    sub = ctx.socket(zmq.SUB)  # a subscriber on the monitor, as the hub is
    sub.subscribe(b"")
    sub.connect(m)
    msg = [b"engine", b"<IDS|MSG>", b"0" * 64, b"h" * 200, b"p" * 200, b"{}", b"f" * 40, b"a" * 40]
    try:
        deadline = time.monotonic() + 10
        while not c.poll(100):  # until the echo is connected (the ROUTER drops before that)
            if time.monotonic() > deadline:
                raise SystemExit("floor: no echo within 10 s")
            c.send_multipart(msg)
        while c.poll(100):
            c.recv_multipart()

        def rt() -> None:
            c.send_multipart(msg)
            c.recv_multipart()
        return _median(rt)
    finally:
        for p in procs:
            p.kill()
            p.join()
        ctx.destroy(linger=0)


def ppe_us() -> float:
    with ProcessPoolExecutor(4, mp_context=mp.get_context("fork")) as ex:
        return _median(lambda: ex.submit(_noop).result())


def main() -> int:
    mp.set_start_method("fork", force=True)
    with tempfile.TemporaryDirectory(prefix="zexec-floor-") as tmp:
        rows = []
        for _ in range(3):  # alternated, so drift on a shared machine hits both
            rows.append((ppe_us(), floor_us(tmp)))
    ppe = statistics.median(r[0] for r in rows)
    flo = statistics.median(r[1] for r in rows)
    print(f"ProcessPoolExecutor(4) round trip:           {ppe:6.0f} µs (median of 3 x {N})")
    print(f"seed path floor (client->C device->echo->back): {flo:6.0f} µs = {flo / ppe:.2f}x PPE")
    print(f"machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, libzmq {zmq.zmq_version()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
