"""The hub: registrar, notifications, heartbeat verdicts and task records.

::

    engines, clients, heartbeat monitor, launchers --DEALER--> [registrar ROUTER]
    [notification PUB] --> clients, task scheduler, launchers:
                           registration / unregistration / hub_beat (every second)
    MUX, control (C devices), task scheduler --PUB--> [monitor SUB]  (loopback/ipc only)

The hub assigns engine ids (0, 1, 2... in registration order, never reused) and decides
when an engine is alive (registered, sockets connected and heart beating) and when it
is dead (heart failure, process exit reported by its launcher, or its own goodbye).
Every decision is published, and ``hub_beat`` repeats the live set each second so a
subscriber that missed a notification converges.  It reads JSON only, never pickles.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import time

import zmq

from .. import wire
from ..connection import ConnectionInfo, context, guard_xpub, secure
from ..errors import ProtocolError
from ..protocol import DELIM, MAX_ID, RateLimitedLog, Session, loads, split_idents

log = logging.getLogger("zexec.hub")

BEAT_INTERVAL = 1.0
#: task records from the devices are read at most this often (see Hub.run)
MONITOR_BATCH = 0.02
#: a batch of task records yields the CPU every this many records.  A batch takes
#: milliseconds, and the kernel lets a running task finish its slice before a task it
#: woke on the same CPU runs, even when the other CPU goes idle: an engine or device
#: woken there waited out the whole batch (`perf sched`: two in three round trips
#: slower than 1.5 ms waited behind the hub).  Yielding costs a system call.
YIELD_EVERY = 4
_yield = getattr(os, "sched_yield", lambda: None)
#: the processes whose PUB connects to the monitor: MUX, control and IOPub devices,
#: task scheduler.  Engines go live only once all are connected (or after
#: MONITOR_GRACE): a copy published before that is dropped, and a message a device
#: lost then could not be reported to its owner
MONITOR_PEERS = 4
MONITOR_GRACE = 2.0
#: the lost messages whose owner can recover them (a lost status or abort reply cannot be)
RECOVERABLE = ("apply_request", "apply_reply", "resend_request", "resend_reply")
NUDGE = [b"zexec-nobody", DELIM, b"", b"{}", b"{}", b"{}"]
#: where, in a glued copy, the lost message's delimiter is looked for (see Hub._glued)
MAX_GLUED_IDENTS = 16
#: the task outcomes status() counts by name.  The monitor's copies are unsigned (anyone
#: who reaches the MUX can put a word there): any other word is counted as "other", so
#: neither a flood of distinct words nor one that cannot be encoded lands in the table
STATUSES = frozenset({"ok", "error", "aborted", "engine_died", "no_engines"})
REGISTRATION_TIMEOUT = 30.0
#: new subscribers to the notifications are answered (a hub_beat) at most this often
ANSWER_GAP = 0.02
#: an engine set (launcher) not heard for this long is gone: killed, or its host lost
LAUNCHER_LOST = 3.5
#: engine sets tracked at most (each beats every second: a bound against a buggy peer)
MAX_LAUNCHERS = 10_000
#: dead engines' records kept (for late exit reports, status and a late heart); ids
#: are never reused, so max_tasks_per_child=1 makes one per task
DEAD_KEPT = 256
#: after a heart disconnects, how long to wait for its launcher's exit report
EXIT_REPORT_GRACE = 0.3
#: how long a queue_request waits for the task scheduler's records (see _do_queue_request)
FLUSH_WAIT = 0.5


class Hub:
    def __init__(self, info: ConnectionInfo, max_records: int = 10_000) -> None:
        self.info = info
        self.session = Session(info.key_bytes)
        #: checks messages the devices lost: copies, so the same signature may come again
        self.verifier = Session(info.key_bytes, check_replay=False)
        self.max_records = max_records
        self.next_id = 0
        self.engines: dict[str, dict] = {}      # uuid -> record, pending or live
        self.dead: collections.OrderedDict[str, dict] = collections.OrderedDict()
        self.pending_death: dict[str, tuple[float, str]] = {}
        self.records: collections.OrderedDict[str, list] = collections.OrderedDict()
        self.counts = collections.Counter()
        self.done_by_engine = collections.Counter()
        self.task_queue = 0
        self.bad = RateLimitedLog(log)
        self.stopping = False
        self.monitor_peers = 0
        #: live engine sets (launchers), by id: pid, hostname, when last heard
        self.launchers: dict[str, dict] = {}
        self.started = time.monotonic()
        self.last_live = 0.0
        self.flush_seq = 0
        self.flushed = 0
        self.status_waiting: list[tuple[int, float, object]] = []

    # -- lifecycle -----------------------------------------------------------------------
    def run(self) -> None:
        ctx = context()
        info = self.info
        self.registrar = ctx.socket(zmq.ROUTER)
        self.registrar.linger = 0
        secure(self.registrar, info, server=True)
        self.registrar.bind(info.bind_url("registration"))
        # an XPUB: a PUB drops what it publishes before a subscriber's connection is up,
        # and engines can go live within milliseconds of the controller's start, before
        # the task scheduler has connected; so every new subscription gets the list of
        # live engines (a hub_beat) at once instead of at the next beat
        self.notif = ctx.socket(zmq.XPUB)
        self.notif.setsockopt(zmq.XPUB_VERBOSE, 1)
        self.notif.linger = 0
        self.notif.sndhwm = 0
        guard_xpub(self.notif, info)
        secure(self.notif, info, server=True)
        self.notif.bind(info.bind_url("notification"))
        self.monitor = ctx.socket(zmq.SUB)
        self.monitor.rcvhwm = 0
        for prefix in (b"mux", b"ctrl", b"task"):
            self.monitor.subscribe(prefix)
        mon_url = info.bind_url("monitor")
        if info.transport == "tcp":
            mon_url = f"tcp://127.0.0.1:{info.addresses['monitor']}"  # never off this host
        secure(self.monitor, info, server=True)
        peers = self.monitor.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)  # before bind
        self.monitor.bind(mon_url)
        # one DEALER on each side of the MUX and control devices, to nudge them each beat
        self.nudges = []
        for chan in ("mux_client", "mux_engine", "control_client", "control_engine"):
            s = ctx.socket(zmq.DEALER)
            s.linger = 0
            s.sndhwm = 10
            secure(s, info, server=False)
            s.connect(info.url(chan))
            self.nudges.append(s)
        poller = zmq.Poller()
        poller.register(self.registrar, zmq.POLLIN)
        poller.register(self.monitor, zmq.POLLIN)
        poller.register(self.notif, zmq.POLLIN)
        poller.register(peers, zmq.POLLIN)
        registrar_only = zmq.Poller()
        registrar_only.register(self.registrar, zmq.POLLIN)
        registrar_only.register(self.notif, zmq.POLLIN)
        registrar_only.register(peers, zmq.POLLIN)
        subscriptions = wire.SubscriptionGate(self.notif, (poller, registrar_only))
        next_beat = time.monotonic()
        monitor_due = 0.0
        log.info("hub up: registrar at %s", info.bind_url("registration"))
        try:
            while not self.stopping:
                now = time.monotonic()
                if now >= next_beat:
                    self._beat()
                    next_beat = now + BEAT_INTERVAL
                self._timers(now)
                timeout = next_beat - now
                reopen = subscriptions.reopen_at(now)
                if reopen is not None:
                    timeout = min(timeout, reopen - now)
                if self.status_waiting:
                    # a status request waits on the task scheduler's records: read them at
                    # once, not a monitor batch later
                    monitor_due = 0.0
                    timeout = min(timeout, min(t for _, t, _ in self.status_waiting) - now)
                if self.pending_death:
                    timeout = min(timeout, min(t for t, _ in self.pending_death.values()) - now)
                # Task records are read in batches, MONITOR_BATCH apart: a hub woken for
                # every message a device relays would take a core's share from the
                # tasks themselves (two wake-ups per direct task, measured ~30% of the
                # round trip on two cores).  Registrations are answered at once.
                if now < monitor_due:
                    timeout = min(timeout, monitor_due - now)
                    ready = dict(registrar_only.poll(max(1, int(timeout * 1000) + 1)))
                    if time.monotonic() >= monitor_due and self.monitor.get(zmq.EVENTS) & zmq.POLLIN:
                        ready[self.monitor] = zmq.POLLIN
                else:
                    ready = dict(poller.poll(max(1, int(timeout * 1000) + 1)))
                if self.notif in ready and subscriptions.read():
                    # a new subscriber gets the live engines at once; a flood of them gets
                    # one answer per ANSWER_GAP, not one per read
                    next_beat = min(next_beat, self.last_live + ANSWER_GAP)
                if peers in ready:
                    while peers.get(zmq.EVENTS) & zmq.POLLIN:
                        peers.recv_multipart()
                        self.monitor_peers += 1
                    self._all_maybe_live()
                if self.registrar in ready:
                    for _ in range(1000):
                        if not self.registrar.get(zmq.EVENTS) & zmq.POLLIN:
                            break
                        self._on_registrar(self.registrar.recv_multipart())
                if self.monitor in ready:
                    monitor_due = time.monotonic() + MONITOR_BATCH
                    for i in range(5000):
                        if not self.monitor.get(zmq.EVENTS) & zmq.POLLIN:
                            break
                        self._on_monitor(self.monitor.recv_multipart(copy=False))
                        if i % YIELD_EVERY == YIELD_EVERY - 1:
                            _yield()
                if self.status_waiting:
                    self._answer_status(time.monotonic())
        finally:
            ctx.destroy(linger=200)

    def _publish(self, kind: str, content: dict) -> None:
        self.notif.send_multipart(self.session.pack(kind, content, idents=[kind.encode()]))

    def _publish_live(self) -> None:
        self.last_live = time.monotonic()
        live = {str(e["id"]): _public(e) for e in self.engines.values() if e["state"] == "live"}
        # what the snapshot cannot speak for: engines still starting, and those that
        # register after it (ids from next_id on); a client that learnt of them from a
        # newer connection reply must not take them for gone
        pending = [e["id"] for e in self.engines.values() if e["state"] == "pending"]
        self._publish("hub_beat", {"engines": live, "pending": pending, "next_id": self.next_id,
                                   "launchers": len(self.launchers)})

    def _beat(self) -> None:
        self._publish_live()
        # A one-frame message leaves a C device waiting, inside its recv, for frames
        # that will never come, and it relays nothing meanwhile.  A message routed to
        # nobody completes it (the merged message goes nowhere and is reported lost
        # to its owner), and costs nothing when the device is not stuck.
        for s in self.nudges:
            try:
                s.send_multipart(NUDGE, zmq.NOBLOCK)
            except zmq.Again:
                pass

    def _timers(self, now: float) -> None:
        if now - self.started > MONITOR_GRACE:
            self._all_maybe_live()
        for lid, rec in list(self.launchers.items()):
            if now - rec["last"] > LAUNCHER_LOST:
                self._launcher_gone(lid, f"no word from it for {LAUNCHER_LOST:.1f}s: killed, "
                                         f"or its host is lost")
        for uuid, (deadline, reason) in list(self.pending_death.items()):
            if now >= deadline:
                del self.pending_death[uuid]
                eng = self.engines.get(uuid)
                if eng is not None:
                    self._declare_dead(eng, reason)
        for eng in list(self.engines.values()):
            if eng["state"] == "pending" and now - eng["t_request"] > REGISTRATION_TIMEOUT:
                self._declare_dead(eng, "registration did not complete")

    # -- registrar -----------------------------------------------------------------------
    def _reply(self, idents: list, kind: str, content: dict, parent: dict) -> None:
        self.registrar.send_multipart(self.session.pack(kind, content, parent=parent, idents=idents))

    def _on_registrar(self, frames: list) -> None:
        try:
            msg = self.session.unpack(frames)
        except ProtocolError as e:
            who = frames[0].hex()[:16] if frames else "?"
            self.bad("registrar", f"{e} (peer {who})")
            return
        handler = getattr(self, "_do_" + str(msg.header["msg_type"]), None)
        if handler is None:
            self.bad("unknown msg_type on registrar", str(msg.header["msg_type"]))
            return
        try:
            handler(msg)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            self.bad("malformed " + str(msg.header["msg_type"]), repr(e))

    def _addresses(self) -> dict:
        return {k: v for k, v in self.info.addresses.items() if k != "monitor"}

    def _do_registration_request(self, msg) -> None:
        c = msg.content
        uuid = str(c["uuid"])
        if uuid in self.engines or uuid in self.dead:
            self._reply(msg.idents, "registration_reply",
                        {"status": "error", "reason": "uuid already registered"}, msg.header)
            return
        eid = self.next_id
        self.next_id += 1
        eng = {"id": eid, "uuid": uuid, "hostname": str(c.get("hostname", "?")),
               "pid": c.get("pid"), "log": c.get("log"), "launcher": c.get("launcher"),
               "max_tasks": c.get("max_tasks"), "state": "pending", "ready": False,
               "heart": False, "t_request": time.monotonic(), "registered": None}
        self.engines[uuid] = eng
        lid = c.get("launcher")
        if isinstance(lid, str) and lid not in self.launchers and len(self.launchers) < MAX_LAUNCHERS:
            # its engine set may be killed before its first beat reaches us: known from
            # its engine, its silence is noticed all the same (its own beat fills in the pid)
            self.launchers[lid] = {"pid": None, "hostname": eng["hostname"], "last": time.monotonic()}
        self._reply(msg.idents, "registration_reply",
                    {"status": "ok", "id": eid, "addresses": self._addresses(),
                     "heartbeat_period": self.info.heartbeat_period,
                     "heartbeat_misses": self.info.heartbeat_misses}, msg.header)
        log.info("engine %d registering (uuid %s, pid %s on %s)", eid, uuid, eng["pid"], eng["hostname"])

    def _do_registration_complete(self, msg) -> None:
        eng = self.engines.get(str(msg.content["uuid"]))
        if eng is not None:
            eng["ready"] = True
            self._maybe_live(eng)

    def _do_heart_beating(self, msg) -> None:
        uuid = str(msg.content["uuid"])
        eng = self.engines.get(uuid)
        if eng is None:
            if uuid in self.dead:
                self._tell_dead(uuid)
            return
        eng["heart"] = True
        self.pending_death.pop(uuid, None)
        self._maybe_live(eng)

    def _monitors_up(self) -> bool:
        return (self.monitor_peers >= MONITOR_PEERS
                or time.monotonic() - self.started > MONITOR_GRACE)

    def _all_maybe_live(self) -> None:
        for eng in list(self.engines.values()):
            if eng["state"] == "pending":
                self._maybe_live(eng)

    def _maybe_live(self, eng: dict) -> None:
        if eng["state"] == "pending" and eng["ready"] and eng["heart"] and self._monitors_up():
            eng["state"] = "live"
            eng["registered"] = time.time()
            log.info("engine %d live", eng["id"])
            self._publish("registration", _public(eng))

    def _do_heart_failure(self, msg) -> None:
        uuid = str(msg.content["uuid"])
        eng = self.engines.get(uuid)
        if eng is None:
            return
        reason = str(msg.content.get("reason", "heart failure"))
        if reason == "disconnected" and eng.get("launcher"):
            # the process probably exited: give its launcher a moment to say how
            self.pending_death.setdefault(uuid, (time.monotonic() + EXIT_REPORT_GRACE, "connection lost"))
        else:
            self._declare_dead(eng, reason)

    def _do_engine_exit(self, msg) -> None:
        c = msg.content
        for eng in list(self.engines.values()):
            if eng.get("launcher") == c["launcher"] and eng.get("pid") == c["pid"]:
                self._declare_dead(eng, "process exited", c.get("exitcode"))
                return
        for eng in self.dead.values():
            if eng.get("launcher") == c["launcher"] and eng.get("pid") == c["pid"]:
                eng.setdefault("exitcode", c.get("exitcode"))

    def _do_launcher_beat(self, msg) -> None:
        c = msg.content
        lid = c["launcher"]
        rec = self.launchers.get(lid)
        if rec is None:
            if len(self.launchers) >= MAX_LAUNCHERS:
                self.bad("too many engine sets", lid)
                return
            rec = self.launchers[lid] = {"pid": c.get("pid"), "hostname": c.get("hostname")}
            log.info("engine set %s up (pid %s on %s)", lid, rec["pid"], rec["hostname"])
        elif rec["pid"] is None:
            rec["pid"] = c.get("pid")  # first known through one of its engines
        rec["last"] = time.monotonic()

    def _do_launcher_exit(self, msg) -> None:
        if msg.content["launcher"] in self.launchers:
            self._launcher_gone(msg.content["launcher"], str(msg.content.get("reason") or "it exited"))

    def _launcher_gone(self, lid: str, reason: str) -> None:
        """An engine set stopped or was lost: say so, for the task scheduler (which fails
        queued tasks at once if no engine and no engine set is left) and the clients."""
        rec = self.launchers.pop(lid)
        log.warning("engine set %s (pid %s on %s) gone: %s", lid, rec["pid"], rec["hostname"], reason)
        self._publish("launcher_gone", {"launcher": lid, "pid": rec["pid"], "hostname": rec["hostname"],
                                        "reason": reason, "left": len(self.launchers)})

    def _do_unregistration_notification(self, msg) -> None:
        eng = self.engines.get(str(msg.content["uuid"]))
        if eng is not None:
            eng["fatal"] = bool(msg.content.get("fatal"))
            tb = msg.content.get("traceback")
            if isinstance(tb, str):
                eng["traceback"] = tb[-16384:]  # a failed initializer's, for the clients
            self._declare_dead(eng, str(msg.content.get("reason", "unregistered")),
                               msg.content.get("exitcode"))

    def _declare_dead(self, eng: dict, reason: str, exitcode: int | None = None) -> None:
        uuid = eng["uuid"]
        self.engines.pop(uuid, None)
        self.pending_death.pop(uuid, None)
        eng["state"] = "dead"
        eng["reason"] = reason
        if exitcode is not None:
            eng["exitcode"] = exitcode
        self.dead[uuid] = eng
        while len(self.dead) > DEAD_KEPT:
            self.dead.popitem(last=False)
        self.done_by_engine.pop(eng["id"], None)  # reported for live engines only
        log.warning("engine %d dead: %s%s", eng["id"], reason,
                    f" (exit code {exitcode})" if exitcode is not None else "")
        self._publish("unregistration", _public(eng))
        self._tell_dead(uuid)

    def _tell_dead(self, uuid: str) -> None:
        """An engine declared dead that still talks (e.g. resumed after SIGSTOP) must exit."""
        self.registrar.send_multipart(self.session.pack("unregistered", {"uuid": uuid},
                                                        idents=[uuid.encode()]))

    def _do_connection_request(self, msg) -> None:
        live = {str(e["id"]): _public(e) for e in self.engines.values() if e["state"] == "live"}
        self._reply(msg.idents, "connection_reply",
                    {"status": "ok", "addresses": self._addresses(), "engines": live}, msg.header)

    def _do_queue_request(self, msg) -> None:
        """Answered once the task scheduler has sent every record it holds.

        It sends its records in batches, RECORD_INTERVAL apart, so the counts could lag
        the replies a client already has by that much.  Asked to flush (a notification
        with a sequence number), it sends what it holds at once, tagged with the number;
        records it has forwarded replies for are all in that batch, or before it on the
        same connection.  Should it not answer within FLUSH_WAIT, the reply goes out
        anyway, marked ``"current": False``.
        """
        self.flush_seq += 1
        self._publish("flush_records", {"seq": self.flush_seq})
        self.status_waiting.append((self.flush_seq, time.monotonic() + FLUSH_WAIT, msg))

    def _answer_status(self, now: float) -> None:
        waiting, self.status_waiting = self.status_waiting, []
        for seq, deadline, msg in waiting:
            if seq <= self.flushed:
                self._queue_reply(msg, current=True)
            elif now >= deadline:
                self._queue_reply(msg, current=False)
            else:
                self.status_waiting.append((seq, deadline, msg))

    def _queue_reply(self, msg, current: bool) -> None:
        engines = []
        for e in sorted(self.engines.values(), key=lambda e: e["id"]):
            d = _public(e)
            d["state"] = e["state"]
            d["tasks_done"] = self.done_by_engine.get(e["id"], 0)
            d["queued"] = sum(1 for r in self.records.values() if r[1] == e["id"] and r[4] is None)
            engines.append(d)
        dead = [dict(_public(e), reason=e.get("reason"), exitcode=e.get("exitcode"))
                for e in list(self.dead.values())[-20:]]
        self._reply(msg.idents, "queue_reply",
                    {"status": "ok", "engines": engines, "dead": dead,
                     "task_queue": self.task_queue, "tasks": dict(self.counts),
                     "records": len(self.records), "current": current}, msg.header)

    def _do_shutdown_request(self, msg) -> None:
        log.info("shutdown requested")
        # engine sets stop with the controller (their engines would only be replaced,
        # then wait for a hub that is gone); the context's linger sends this before exit
        self._publish("shutdown", {"reason": "the controller was stopped"})
        self._reply(msg.idents, "shutdown_reply", {"status": "ok"}, msg.header)
        self.stopping = True

    # -- monitor (copies of scheduler traffic) -------------------------------------------
    def _on_monitor(self, frames: list) -> None:
        # copies of whatever anyone sent to the devices: untrusted, so nothing in them
        # may raise out of here (a dead hub is a dead controller)
        try:
            self._monitor_copy(frames)
        except (ProtocolError, ValueError, IndexError, TypeError, KeyError, AttributeError,
                UnicodeDecodeError) as e:
            self.bad("monitor", repr(e))

    def _monitor_copy(self, frames: list) -> None:
        prefix = frames[0].bytes
        if prefix == b"task":
            self._task_records(loads(frames[1]))
            return
        idents, rest = split_idents(frames[1:])
        if len(idents) != 2:
            self._glued(prefix, frames[1:])
            return
        header = loads(rest[1])
        if not isinstance(header, dict):
            raise ValueError("header is not an object")
        kind = header.get("msg_type")
        if prefix == b"mux_in" and kind == "apply_request":
            # the device copies after swapping: [engine, client]
            eng = self.engines.get(idents[0].bytes.decode(errors="replace"))
            self._record(header.get("msg_id"), eng["id"] if eng else None, header.get("date"))
        elif prefix == b"mux_out" and kind == "apply_reply":
            self._finish(header.get("parent_id"), header.get("status"), header.get("engine"))

    def _glued(self, prefix: bytes, frames: list) -> None:
        """A C device glued the next message onto a malformed one and routed both to nowhere.

        A message of one frame leaves the device reading the next message that arrives
        as the rest of it: the copy is the lone frame, its sender's identity, then that
        whole next message.  If the next one is genuine, its owner must hear it was
        lost (its future would wait forever).  Where it starts is found by its
        signature, not by the first delimiter: the lone frame may be a delimiter itself
        (``[b"<IDS|MSG>"]``), and then the first one leads to the stranger's frames.
        """
        if prefix == b"mux_in" and frames[0].bytes.decode(errors="replace") in self.engines:
            return  # the lone frame named a live engine: the glued request reached it
        for i, f in enumerate(frames[:MAX_GLUED_IDENTS]):
            if f.bytes != DELIM or len(frames) - i < 5:
                continue
            rest = frames[i + 1:]
            try:
                header = loads(rest[1])
            except ValueError:
                continue
            if not isinstance(header, dict):
                continue
            kind = header.get("msg_type")
            lost = header.get("msg_id") if prefix.endswith(b"_in") else header.get("parent_id")
            if not (_id(lost) and kind in RECOVERABLE):
                continue
            try:
                # the header's signature is enough to trust whom to tell, and costs no
                # hashing of a big payload
                self.verifier.verify(rest, routing=True)
            except ProtocolError:
                continue
            self.bad("malformed message on a device", f"{prefix.decode()} lost {lost}")
            self._publish("lost_message", {"msg_id": lost, "device": prefix.decode()})
            return
        self.bad("malformed message on a device", f"{prefix.decode()}: nothing genuine lost")

    def _record(self, msg_id, engine_id, t) -> None:
        if not _id(msg_id):
            return
        if not isinstance(t, (int, float)):
            t = None
        if msg_id not in self.records:  # sent again (retried, given back): one task still
            self.counts["submitted"] += 1
        self.records[msg_id] = [t, engine_id if isinstance(engine_id, int) else None, None, None, None]
        while len(self.records) > self.max_records:
            self.records.popitem(last=False)  # oldest first: the table stays bounded

    def _finish(self, msg_id, status, engine_id, started=None, completed=None) -> None:
        status = status if isinstance(status, str) and status in STATUSES else "other"
        rec = self.records.get(msg_id) if _id(msg_id) else None
        if rec is not None:
            rec[2] = started if isinstance(started, (int, float)) else None
            rec[3] = completed if isinstance(completed, (int, float)) else None
            rec[4] = status
        self.counts[status] += 1
        if isinstance(engine_id, int):
            self.done_by_engine[engine_id] += 1

    def _task_records(self, rec: dict) -> None:
        # thousands of records in one message under load: yield now and then, as above
        for i, (msg_id, engine_id, t) in enumerate(rec.get("submitted", ())):
            self._record(msg_id, engine_id, t)
            if i % (YIELD_EVERY * 8) == YIELD_EVERY * 8 - 1:
                _yield()
        for i, (msg_id, status, started, completed) in enumerate(rec.get("done", ())):
            r = self.records.get(msg_id)
            if status == "given_back":
                # back in the task scheduler's queue: no engine holds it, and it is not done
                self.counts["given_back"] += 1
                if r is not None:
                    r[1] = None
                continue
            self._finish(msg_id, status, r[1] if r else None, started, completed)
            if i % (YIELD_EVERY * 8) == YIELD_EVERY * 8 - 1:
                _yield()
        queue = rec.get("queue")
        if isinstance(queue, int):
            self.task_queue = queue
        flushed = rec.get("flushed")
        if isinstance(flushed, int):
            self.flushed = max(self.flushed, flushed)


def _id(v) -> bool:
    return isinstance(v, str) and len(v) <= MAX_ID


def _public(eng: dict) -> dict:
    keys = ("id", "uuid", "hostname", "pid", "log", "launcher", "max_tasks", "reason", "exitcode", "fatal",
            "traceback")
    return {k: eng[k] for k in keys if eng.get(k) is not None}


def main(info: ConnectionInfo) -> None:
    Hub(info).run()
    log.info("hub stopped (pid %d on %s)", os.getpid(), socket.gethostname())
