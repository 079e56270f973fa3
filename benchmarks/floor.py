#!/usr/bin/env python
"""The round-trip floors of the seed's message paths on this machine, next to PPE's.

A direct zexec task travels client -> MUX device -> engine -> MUX device -> client; a
load-balanced one client -> task scheduler -> engine -> task scheduler -> client.  Each
arrow is a process hop through libzmq's I/O threads.  This script times those paths with
no zexec code at all, and ProcessPoolExecutor's round trip, alternated in one run::

    python benchmarks/floor.py            # 2,000 round trips each, medians in µs

The paths, each with a bare Python echo as the engine:

- ``direct, bare``: pyzmq's C ``monitored_queue`` as the MUX device, the client's
  calling thread sending and receiving itself.
- ``direct, IO thread``: the same, but shaped as DESIGN.md fixes the client: replies are
  received by an IO thread that resolves a ``concurrent.futures.Future``, on which the
  calling thread waits.
- ``direct, IO thread, no hub``: the same without the subscriber that stands for the
  hub: what the hub's copy of every MUX message costs the round trip.
- ``load-balanced, IO thread``: a bare Python ROUTER/ROUTER forwarder (no parsing, no
  signing: it swaps the routing frames and forwards) as the task scheduler, with the same
  IO-thread client.

On the direct paths a subscriber in another process reads the device's monitor stream,
as zexec's hub does (two copies per task, which it needs to see lost messages); the
forwarder publishes nothing, as zexec's task scheduler sends its records in batches.
If a floor alone is above a target ratio, no change inside zexec can meet that target on
this machine; what zexec measures above the floor is its own cost.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor

import zmq
from zmq.devices import monitored_queue

N = 2000
WARM = 200
#: what a no-op request and its reply weigh on zexec's wire (routing, delimiter,
#: signature, header, parent, content, function key, arguments)
BODY = [b"<IDS|MSG>", b"0" * 64, b"h" * 200, b"p" * 200, b"{}", b"f" * 40, b"a" * 40]


def _noop() -> None:
    return None


def _device(a: str, b: str, mon: str) -> None:
    ctx = zmq.Context()
    front, back, pub = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER), ctx.socket(zmq.PUB)
    front.bind(a)
    back.bind(b)
    pub.bind(mon)
    monitored_queue(front, back, pub, b"in", b"out")


def _forwarder(a: str, b: str, mon: str) -> None:
    """The least a Python task scheduler does: route each request to the (one) engine and
    each reply back to the client it names."""
    ctx = zmq.Context()
    front, back = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
    front.bind(a)
    back.bind(b)
    poller = zmq.Poller()
    poller.register(front, zmq.POLLIN)
    poller.register(back, zmq.POLLIN)
    while True:
        for sock, _ in poller.poll():
            frames = sock.recv_multipart()
            if sock is front:  # [client, engine, ...] -> [engine, client, ...]
                back.send_multipart([frames[1], frames[0], *frames[2:]])
            else:  # [engine, reply_to, ...] -> [reply_to, ...]
                front.send_multipart(frames[1:])


def _echo(b: str) -> None:
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.identity = b"engine"
    s.connect(b)
    while True:
        frames = s.recv_multipart()  # [sender, reply_to, ...]: reply to reply_to
        s.send_multipart(frames[1:])


def _monitor(mon: str) -> None:
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.subscribe(b"")
    sub.connect(mon)
    while True:
        sub.recv_multipart()


def _median(fn) -> float:
    for _ in range(WARM):
        fn()
    samples = []
    for _ in range(N):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples) * 1e6


def floor_us(tmp: str, router, io_thread: bool, hub: bool) -> float:
    a, b, m = (f"ipc://{tmp}/{n}" for n in ("client", "engine", "monitor"))
    procs = [mp.Process(target=router, args=(a, b, m), daemon=True),
             mp.Process(target=_echo, args=(b,), daemon=True)]
    if hub:
        procs.append(mp.Process(target=_monitor, args=(m,), daemon=True))
    for p in procs:
        p.start()
    ctx = zmq.Context()
    tx, rx = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
    tx.identity, rx.identity = b"tx", b"rx"  # requests leave on tx, replies come to rx
    tx.connect(a)
    rx.connect(a)
    msg = [b"engine", b"rx", *BODY]
    stop_r, stop_w = os.pipe()
    thread = None
    try:
        deadline = time.monotonic() + 10
        while not rx.poll(100):  # until the echo is connected (the ROUTER drops before that)
            if time.monotonic() > deadline:
                raise SystemExit("floor: no echo within 10 s")
            tx.send_multipart(msg)
        while rx.poll(100):
            rx.recv_multipart()
        if not io_thread:
            def rt() -> None:
                tx.send_multipart(msg)
                rx.recv_multipart()
            return _median(rt)

        pending: list[Future] = []

        def io_loop() -> None:
            poller = zmq.Poller()
            poller.register(rx, zmq.POLLIN)
            poller.register(stop_r, zmq.POLLIN)
            while True:
                for s, _ in poller.poll():
                    if s == stop_r:
                        return
                    rx.recv_multipart()
                    pending.pop().set_result(None)

        thread = threading.Thread(target=io_loop, daemon=True)
        thread.start()

        def rt_io() -> None:
            fut: Future = Future()
            pending.append(fut)
            tx.send_multipart(msg)
            fut.result()
        return _median(rt_io)
    finally:
        if thread is not None:
            os.write(stop_w, b"x")
            thread.join(10)
        os.close(stop_r)
        os.close(stop_w)
        for p in procs:
            p.kill()
            p.join()
        ctx.destroy(linger=0)


def ppe_us() -> float:
    with ProcessPoolExecutor(4, mp_context=mp.get_context("fork")) as ex:
        return _median(lambda: ex.submit(_noop).result())


PATHS = {
    "direct, bare (C device)": (_device, False, True),
    "direct, IO thread (C device)": (_device, True, True),
    "direct, IO thread, no hub": (_device, True, False),
    "load-balanced, IO thread (Python forwarder)": (_forwarder, True, False),
}


def main() -> int:
    mp.set_start_method("fork", force=True)
    rows: dict[str, list[float]] = {"PPE": [], **{k: [] for k in PATHS}}
    with tempfile.TemporaryDirectory(prefix="zexec-floor-") as tmp:
        for _ in range(3):  # alternated, so drift on a shared machine hits every path
            rows["PPE"].append(ppe_us())
            for name, args in PATHS.items():
                rows[name].append(floor_us(tmp, *args))
    ppe = statistics.median(rows.pop("PPE"))
    print(f"{'ProcessPoolExecutor(4) round trip':50s} {ppe:6.0f} µs  (median of 3 x {N})")
    for name, vals in rows.items():
        v = statistics.median(vals)
        print(f"{'floor: ' + name:50s} {v:6.0f} µs = {v / ppe:.2f}x PPE")
    print(f"machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, libzmq {zmq.zmq_version()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
