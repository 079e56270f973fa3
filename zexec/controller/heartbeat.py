"""The heartbeat monitor: pings every engine's heart and tells the hub who stopped answering.

::

    ping PUB  ---- beat number ---->  heart SUB  }  C FORWARDER device in a thread
    pong ROUTER <-- same bytes, engine id -- heart DEALER }  of each engine
    DEALER --> hub registrar: heart_beating / heart_failure (signed)

Each period the monitor publishes a new beat number; a heart echoes it with its
identity (the engine's uuid).  The ping socket is an XPUB: a new heart's subscription
is answered with the current beat at once, so a new engine goes live in milliseconds,
not up to a period later (an engine recycled after every task would wait that long).
A heart whose last echo is more than ``misses`` beats old is reported failed
(``policy.heart_failures``).  A heart whose TCP/IPC connection
closes (its process died) is reported at once: each pong carries the file descriptor it
arrived on, and the socket monitor reports that descriptor's disconnect.
"""

from __future__ import annotations

import logging
import time

import zmq

from .. import wire
from ..connection import ConnectionInfo, context, guard_xpub, secure
from ..protocol import RateLimitedLog, Session
from . import policy

log = logging.getLogger("zexec.heartbeat")

#: pongs read between two looks at the clock (a ping is due every period)
PONGS_PER_TURN = 1000
#: the current beat is sent again for new hearts at most this often
AGAIN_GAP = 0.02


class HeartMonitor:
    def __init__(self, info: ConnectionInfo, period: float, misses: int) -> None:
        self.info = info
        self.period = period
        self.misses = misses
        self.session = Session(info.key_bytes)
        self.beat = 0
        self.last_seen: dict[bytes, int] = {}
        self.fd_of: dict[int, bytes] = {}
        self.bad = RateLimitedLog(log)

    def report(self, kind: str, heart: bytes, **extra) -> None:
        content = {"uuid": heart.decode(errors="replace"), **extra}
        self.hub.send_multipart(self.session.pack(kind, content))

    def run(self) -> None:
        ctx = context()
        info = self.info
        ping = ctx.socket(zmq.XPUB)
        ping.setsockopt(zmq.XPUB_VERBOSE, 1)  # every heart's subscription, not only the first
        pong = ctx.socket(zmq.ROUTER)
        for s in (ping, pong):
            s.linger = 0
        guard_xpub(ping, info)
        secure(ping, info, server=True)
        secure(pong, info, server=True)
        ping.bind(info.bind_url("hb_ping"))
        pong.bind(info.bind_url("hb_pong"))
        monitor = pong.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.hub = ctx.socket(zmq.DEALER)
        self.hub.linger = 1000
        secure(self.hub, info, server=False)
        self.hub.connect(info.url("registration"))
        poller = zmq.Poller()
        poller.register(pong, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        poller.register(ping, zmq.POLLIN)
        subscriptions = wire.SubscriptionGate(ping, (poller,))
        next_beat = time.monotonic()
        again_at = None  # when to send the current beat again, for new hearts
        last_sent = 0.0
        log.info("heartbeat monitor up: period %.2fs, %d misses", self.period, self.misses)
        try:
            while True:
                now = time.monotonic()
                if now >= next_beat:
                    self._verdicts()
                    self.beat += 1
                    ping.send(str(self.beat).encode())
                    last_sent = now
                    next_beat = now + self.period
                    again_at = None  # new hearts hear this one
                elif again_at is not None and now >= again_at:
                    ping.send(str(self.beat).encode())  # the beat again: old hearts ignore it
                    last_sent = now
                    again_at = None
                wake = next_beat if again_at is None else min(next_beat, again_at)
                reopen = subscriptions.reopen_at(now)
                if reopen is not None:
                    wake = min(wake, reopen)
                ready = dict(poller.poll(max(0, int((wake - time.monotonic()) * 1000)) + 1))
                if ping in ready and subscriptions.read() and self.beat and again_at is None:
                    # a new heart hears the current beat at once; a flood of subscriptions
                    # gets it once per AGAIN_GAP (every heart echoes every beat it hears)
                    again_at = max(time.monotonic(), last_sent + AGAIN_GAP)
                if pong in ready:
                    # bounded, like every read here: a stranger can send pongs as fast as
                    # we read them, and the next ping must still go out on time
                    wire.drain(pong, self._on_pong, PONGS_PER_TURN)
                if monitor in ready:
                    for _ in range(PONGS_PER_TURN):  # strangers can connect and leave fast too
                        if not monitor.get(zmq.EVENTS) & zmq.POLLIN:
                            break
                        _, fd = wire.recv_monitor_event(monitor)
                        heart = self.fd_of.pop(fd, None)
                        if heart is not None and heart in self.last_seen:
                            del self.last_seen[heart]
                            log.info("heart %s disconnected", heart)
                            self.report("heart_failure", heart, reason="disconnected")
        finally:
            ctx.destroy(linger=0)

    def _on_pong(self, frames: list) -> None:
        if len(frames) != 2:
            self.bad("pong frame count", str(len(frames)))
            return
        heart = frames[0].bytes
        try:
            beat = int(frames[1].bytes)
        except ValueError:
            self.bad("pong payload")
            return
        if not 0 < beat <= self.beat:
            self.bad("pong from the future")
            return
        if heart not in self.last_seen:
            self.report("heart_beating", heart)
            try:
                self.fd_of[frames[1].get(zmq.SRCFD)] = heart
            except zmq.ZMQError:
                pass
        if beat > self.last_seen.get(heart, 0):
            self.last_seen[heart] = beat

    def _verdicts(self) -> None:
        for heart in policy.heart_failures(self.last_seen, self.beat, self.misses):
            del self.last_seen[heart]
            log.warning("heart %s missed %d beats", heart, self.misses)
            self.report("heart_failure", heart,
                        reason=f"missed {self.misses} heartbeats ({self.misses * self.period:.1f}s and more)")


def main(info: ConnectionInfo) -> None:
    HeartMonitor(info, info.heartbeat_period, info.heartbeat_misses).run()
