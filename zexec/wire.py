"""Multipart send and receive without pyzmq's per-frame Python checks.

``Socket.send_multipart``/``recv_multipart`` validate and dispatch each frame in Python
(about 12 us for an 8-frame message here); calling the Cython backend directly costs
a quarter of that.  Every process relays several messages per task, so this is the
hot path of the whole cluster.  Frames come back as ``zmq.Frame`` (no copy); small
frames are copied on send (cheaper than pinning them), large ones are not.
"""

from __future__ import annotations

import struct
import time
from typing import Any, Sequence

import zmq
from zmq.backend.cython._zmq import Socket as _BackendSocket

_send = _BackendSocket.send
_recv = _BackendSocket.recv
_SNDMORE = zmq.SNDMORE
_NOBLOCK = zmq.NOBLOCK
COPY_THRESHOLD = 65536

Again = zmq.Again


def send_frames(sock: zmq.Socket, frames: Sequence[Any]) -> None:
    """Send one multipart message; an interrupted one is ended, never left half-sent.

    A KeyboardInterrupt can arrive between two frames.  libzmq would then glue the next
    message onto the frames already sent, and the receiver would drop both as one
    malformed message: a later, innocent task would be lost.  So an interrupted message
    is ended with an empty frame before the exception goes on; its receiver drops that
    malformed (or empty) message alone.
    """
    last = len(frames) - 1
    try:
        for i, f in enumerate(frames):
            copy = isinstance(f, bytes) and len(f) < COPY_THRESHOLD
            _send(sock, f, _SNDMORE if i < last else 0, copy)
    except zmq.ZMQError:
        raise
    except BaseException:
        try:
            _send(sock, b"", 0, True)
        except zmq.ZMQError:
            pass
        raise


def recv_frames(sock: zmq.Socket, flags: int = 0) -> list:
    """One whole message as ``zmq.Frame`` objects; ``zmq.Again`` with NOBLOCK if none."""
    f = _recv(sock, flags, False)
    out = [f]
    while f.more:
        f = _recv(sock, 0, False)
        out.append(f)
    return out


def drain(sock: zmq.Socket, handler, limit: int = 1000) -> int:
    """Hand up to ``limit`` waiting messages to ``handler``; returns how many."""
    n = 0
    try:
        while n < limit:
            handler(recv_frames(sock, _NOBLOCK))
            n += 1
    except zmq.Again:
        pass
    return n


class SubscriptionGate:
    """Reads an XPUB's subscriptions within a budget per window of time.

    An XPUB takes in its subscribers' next subscriptions (and, for a new topic, keeps
    it) every time its owner calls it; a stranger subscribing to ever new topics as
    fast as it can would grow it as fast as the owner reads.  Out of budget, the XPUB
    leaves the owner's pollers until the window ends, and takes in almost nothing
    meanwhile (its owner still publishes on it).  Our own subscribers send a few
    subscriptions each when they connect: far below the budget.
    """

    def __init__(self, xpub: zmq.Socket, pollers, per_window: int = 100, window: float = 0.1) -> None:
        self.xpub = xpub
        self.pollers = pollers
        self.per_window = per_window
        self.window = window
        self.left = per_window
        self.window_end = 0.0
        self.closed = False

    def read(self) -> bool:
        """Read what the budget allows; True if anyone (re)subscribed."""
        now = time.monotonic()
        if now >= self.window_end:
            self.left, self.window_end = self.per_window, now + self.window
        subscribed = False
        n = 0
        try:
            while n < self.left:
                subscribed |= _recv(self.xpub, _NOBLOCK, True)[:1] == b"\x01"  # else unsubscriptions
                n += 1
        except zmq.Again:
            pass
        self.left -= n
        if self.left <= 0 and not self.closed:
            for p in self.pollers:
                p.unregister(self.xpub)
            self.closed = True
        return subscribed

    def reopen_at(self, now: float) -> float | None:
        """Put the XPUB back in the pollers once its window has ended; while it is out,
        when to call again (for the poll timeout)."""
        if not self.closed:
            return None
        if now < self.window_end:
            return self.window_end
        for p in self.pollers:
            p.register(self.xpub, zmq.POLLIN)
        self.closed = False
        self.left, self.window_end = self.per_window, now + self.window
        return None


def recv_monitor_event(monitor: zmq.Socket) -> tuple[int, int]:
    """The next event of a socket monitor: (event, value; a descriptor for connection
    events).  What ``zmq.utils.monitor.recv_monitor_message`` reads, without importing
    that module: it imports asyncio, a tenth of a second of every engine's and
    controller's start."""
    frames = monitor.recv_multipart()
    if len(frames) != 2 or len(frames[0]) != 6:
        raise ValueError(f"not a socket monitor event: {len(frames)} frames")
    return struct.unpack("=hi", frames[0])
