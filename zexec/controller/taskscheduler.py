"""The task scheduler: load-balanced routing of apply requests to engines.

::

    clients (DEALER) --> [client ROUTER]  TaskScheduler  [engine ROUTER] <--> engines (DEALER)
                                 |             ^  |
               notification SUB (hub) ---------+  +--> monitor XPUB (compact records to the hub)

It behaves like a ROUTER/ROUTER queue from the outside, with Python inside: it verifies
every message (a big one by its routing signature, over the header), picks an engine by
least load (``policy.choose_engine``) under an adaptive bound on outstanding tasks per
engine, holds the rest in a FIFO queue, drops aborted tasks wherever they wait, takes
back the tasks queued at an engine whose current task runs long when another engine
is idle (``give_back``: they go to a free engine instead of waiting), and when
the hub reports an engine dead it resubmits that engine's tasks that have retries left
and fails the others with an EngineDiedError reply (after a clean exit, it first waits a
few seconds for the last replies).  Queued tasks fail with NoEnginesError when no engine
has been there for ``no_engine_timeout``.  Replies and task-started notices go to the
client's ``reply_to`` socket.  It reads JSON only; payload frames are forwarded without
being copied or unpickled.
"""

from __future__ import annotations

import collections
import logging
import time

import zmq

from .._proc import malloc_trim
from ..connection import ConnectionInfo, context, secure
from ..errors import ProtocolError
from .. import wire
from ..wire import send_frames
from ..protocol import DELIM, RateLimitedLog, Session, check_content, check_header, dumps, loads, split_idents
from . import policy

log = logging.getLogger("zexec.taskscheduler")

#: how long an engine that exited cleanly has to deliver its last replies
DRAIN_TIMEOUT = 5.0
#: dead engines remembered (hub_beats are in order with deaths: recent ones suffice)
DEAD_KEPT = 1000
#: how often task records go to the hub
RECORD_INTERVAL = 0.1
#: an engine reports a task started once it has run this long (engine.WATCH_AFTER)
STARTED_AFTER = 0.01
#: while an engine runs a reported task, look this often whether it runs long
LONG_CHECK = 0.05


#: tasks taken in before the scheduler, once idle, returns memory (see _give_back_memory)
TRIM_AFTER = 10_000


class _Task:
    __slots__ = ("msg_id", "idents", "rest", "retries", "engine", "aborted", "sent", "parent", "reply")

    def __init__(self, msg_id, idents, rest, retries, reply):
        self.msg_id = msg_id
        self.reply = reply
        self.idents = idents
        self.rest = rest
        self.retries = retries
        self.engine = None
        self.aborted = False
        self.sent = 0.0
        self.parent = rest[1]


def _reply_idents(header: dict, idents: list) -> list:
    """Where replies go: the client's receiving socket named in the header, else the sender."""
    reply_to = header.get("reply_to")
    return [reply_to.encode()] if isinstance(reply_to, str) else idents


class _Engine:
    __slots__ = ("id", "uuid", "outstanding", "sent", "max_tasks", "info", "running", "giving_back")

    def __init__(self, info: dict):
        self.id = info["id"]
        self.uuid = info["uuid"].encode()
        self.outstanding: dict[str, _Task] = {}
        self.sent = 0
        mt = info.get("max_tasks")
        self.max_tasks = mt if type(mt) is int and mt > 0 else None
        self.info = info
        #: (msg_id, monotonic time it began) of the task it reported started, until its reply
        self.running: tuple[str, float] | None = None
        #: the msg_id of our abort_request asking for its queued tasks back, until answered
        self.giving_back: str | None = None


class TaskScheduler:
    def __init__(self, info: ConnectionInfo, hwm: int | None = None,
                 no_engine_timeout: float = 30.0) -> None:
        self.info = info
        self.session = Session(info.key_bytes)
        self.fixed_hwm = hwm
        self.engines: dict[bytes, _Engine] = {}
        self.draining: dict[bytes, tuple] = {}
        self.unreachable: dict[bytes, float] = {}
        self.no_engines_since: float | None = None
        #: the hub's last word on engine sets: the last one gone, and how many are left
        self.launcher_gone: dict | None = None
        self.launchers_live: int | None = None
        self.no_engine_timeout = no_engine_timeout
        self.order: list[bytes] = []
        #: recent dead engines' uuids, not to be taken back from an older hub_beat
        self.dead: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self.queue: collections.deque[_Task] = collections.deque()
        self.tasks: dict[str, _Task] = {}
        self.rr = 0
        self.mean_runtime: float | None = None
        self.mean_overhead: float | None = None
        self.bad = RateLimitedLog(log)
        self._submitted: list = []
        self._next_flush = 0.0
        self._done: list = []
        self._taken = 0  # tasks taken in since memory was last given back
        self.n_running = 0  # engines with a reported-started task (cheap test in the loop)
        self.giving_back: dict[str, bytes] = {}  # our abort_request's msg_id -> engine
        self.hub_listens = False  # the hub's subscription to our records has arrived

    # -- sockets -------------------------------------------------------------------------
    def _sockets(self, ctx: zmq.Context) -> None:
        info = self.info
        self.client = ctx.socket(zmq.ROUTER)
        self.engine_sock = ctx.socket(zmq.ROUTER)
        self.engine_sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # no ROUTER_HANDOVER: a stranger would take an engine's route by its (public)
        # uuid; the first connection keeps an identity (see devices.py)
        for s in (self.client, self.engine_sock):
            s.sndhwm = s.rcvhwm = 0
            s.linger = 0
        secure(self.client, info, server=True)
        secure(self.engine_sock, info, server=True)
        self.client.bind(info.bind_url("task_client"))
        self.engine_sock.bind(info.bind_url("task_engine"))
        # XPUB, to see the hub subscribe: a PUB drops whatever it sends before the
        # subscription arrives, and the first records (tasks submitted at once) were
        # lost, so the hub counted their replies but never them (see _flush_records)
        self.mon = ctx.socket(zmq.XPUB)
        self.mon.sndhwm = 0
        self.mon.linger = 0
        secure(self.mon, info, server=False)
        self.mon.connect(info.url("monitor"))
        self.notif = ctx.socket(zmq.SUB)
        self.notif.linger = 0
        self.notif.subscribe(b"")
        secure(self.notif, info, server=False)
        self.notif.connect(info.url("notification"))

    def run(self) -> None:
        ctx = context()
        self._sockets(ctx)
        poller = zmq.Poller()
        for s in (self.client, self.engine_sock, self.notif, self.mon):
            poller.register(s, zmq.POLLIN)
        log.info("task scheduler up")
        try:
            while True:
                timeout = 100 if self.draining or self._submitted or self._done else 1000
                if self.n_running:
                    timeout = min(timeout, int(LONG_CHECK * 1000))  # see _rebalance
                ready = dict(poller.poll(timeout))
                # replies before notifications: an engine's last reply and the news
                # of its exit often arrive together
                if self.engine_sock in ready:
                    self._drain(self.engine_sock, self._on_engine)
                if self.notif in ready:
                    self._drain(self.notif, self._on_notification)
                if self.mon in ready:
                    self._drain(self.mon, self._on_subscription)
                if self.draining:
                    self._check_draining()
                if not self.order and self.queue:
                    self._check_no_engines()
                if self.client in ready:
                    self._drain(self.client, self._on_client)
                self._dispatch()
                if self.n_running:
                    self._rebalance()
                self._flush_records()
                if self._taken > TRIM_AFTER and not self.tasks:
                    self._give_back_memory()
        finally:
            ctx.destroy(linger=0)

    def _give_back_memory(self) -> None:
        """Every task is done after many came in: return the memory they used.

        A dict keeps the table of its largest size, and the C heap keeps freed pages
        (message frames are malloc'ed): after a flood drained, both go back to the
        system, so the scheduler's memory returns near its start."""
        self._taken = 0
        self.tasks = {}
        malloc_trim()

    _drain = staticmethod(wire.drain)

    # -- clients -------------------------------------------------------------------------
    def _on_client(self, frames: list) -> None:
        try:
            idents, rest = split_idents(frames)
            self.session.verify(rest, routing=True)
            header = check_header(loads(rest[1]))  # types checked here, once (see protocol)
            msg_type = header["msg_type"]
            msg_id = header["msg_id"]
        except (ProtocolError, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            self.bad("task client socket", str(e))
            return
        if msg_type == "apply_request":
            if msg_id in self.tasks:
                self.bad("duplicate msg_id", msg_id)
                return
            retries = header.get("retries") or 0
            task = _Task(msg_id, idents, rest, retries, _reply_idents(header, idents))
            self.tasks[msg_id] = task
            self._taken += 1
            self.queue.append(task)
        elif msg_type == "abort_request":
            try:
                ids = check_content(msg_type, loads(rest[3]))["msg_ids"]
            except (ProtocolError, ValueError) as e:
                self.bad("malformed abort_request", str(e))
                return
            self._abort(idents, rest[1], ids, _reply_idents(header, idents))
        else:
            self.bad("unknown msg_type on task socket", str(msg_type))

    def _abort(self, idents: list, parent, ids: list, reply: list) -> None:
        """Drop tasks still queued here and answer for them; ask engines about the rest."""
        per_engine: dict[bytes, list] = {}
        aborted, not_found = [], []
        for msg_id in ids:
            task = self.tasks.get(msg_id)
            if task is None:
                not_found.append(msg_id)  # finished, or failed with its engine
            elif task.engine is None:
                task.aborted = True  # the queue skips it lazily
                del self.tasks[msg_id]
                aborted.append(msg_id)
            else:
                per_engine.setdefault(task.engine, []).append(msg_id)
        self.client.send_multipart(self.session.pack(
            "abort_reply", {"aborted": aborted, "not_found": not_found}, parent=parent,
            idents=reply), copy=False)
        for euuid, mids in per_engine.items():
            # behind the tasks on the same pipe: the engine has them queued, or started
            msg = self.session.pack("abort_request", {"msg_ids": mids}, parent=parent,
                                    idents=[euuid, *reply])
            if not self._send_engine(msg):
                self.client.send_multipart(self.session.pack(
                    "abort_reply", {"aborted": [], "not_found": mids}, parent=parent,
                    idents=reply), copy=False)

    # -- engines -------------------------------------------------------------------------
    def _on_engine(self, frames: list) -> None:
        try:
            euuid = frames[0].bytes
            idents, rest = split_idents(frames[1:])
            self.session.verify(rest, routing=True)
            header = check_header(loads(rest[1]))
        except (ProtocolError, ValueError, IndexError, UnicodeDecodeError) as e:
            self.bad("task engine socket", str(e))
            return
        eng = self.engines.get(euuid) or self.draining.get(euuid, (None,))[0]
        kind = header.get("msg_type")
        if eng is None:
            return  # a reply from an engine already declared dead: its task moved on
        if kind == "status":
            mid = header.get("parent_id")
            if isinstance(mid, str) and mid in eng.outstanding:
                if eng.running is None:
                    self.n_running += 1
                eng.running = (mid, time.monotonic() - STARTED_AFTER)
            send_frames(self.client, [*idents, DELIM, *rest])  # a task started: to its client
            return
        if kind == "give_back":
            self._take_back(eng, euuid, rest)
            return
        if kind == "abort_reply":
            if self.giving_back:
                try:
                    asked = loads(rest[2]).get("msg_id")
                except (ValueError, AttributeError, TypeError):
                    asked = None
                if isinstance(asked, str) and asked in self.giving_back:
                    self._given_back(eng, asked, rest[3])
                    return
            try:
                aborted = check_content(kind, loads(rest[3])).get("aborted", ())
            except (ProtocolError, ValueError) as e:
                self.bad("malformed abort_reply", str(e))
                return
            for msg_id in aborted:
                if eng.outstanding.pop(msg_id, None) is not None:
                    eng.sent -= 1  # never ran: not one of its max_tasks
                    self.tasks.pop(msg_id, None)
                    self._done.append((msg_id, "aborted", None, None))
            send_frames(self.client, [*idents, DELIM, *rest])
            return
        if kind != "apply_reply":
            self.bad("unexpected msg_type from engine", str(kind))
            return
        task = eng.outstanding.pop(header.get("parent_id"), None)
        if task is None:
            return
        if eng.running is not None and eng.running[0] == task.msg_id:
            eng.running = None
            self.n_running -= 1
        self.tasks.pop(task.msg_id, None)
        now = time.time()
        elapsed = header.get("elapsed")
        if isinstance(elapsed, (int, float)):
            self.mean_runtime = policy.ewma(self.mean_runtime, elapsed)
            self.mean_overhead = policy.ewma(self.mean_overhead, max(0.0, now - task.sent - elapsed))
        send_frames(self.client, [*idents, DELIM, *rest])
        self._done.append((task.msg_id, header.get("status"), header.get("started"), header.get("completed")))

    def _take_back(self, eng: _Engine, euuid: bytes, rest: list) -> None:
        """An engine about to exit hands back a task it has not started (see
        Engine._give_back): it goes first in the queue again (``_requeue``, as for
        ``give_back``), the engine gets no more tasks, and it hears that the task is
        back (only then does it exit, so its death cannot overtake the task).

        The request comes back with it: the payload of a task sent to an engine with
        nothing outstanding is not kept here (see ``_dispatch``), yet such a task may
        wait there behind a direct one."""
        try:
            c = check_content("give_back", loads(rest[3]))
            n = c["nidents"]
            frames = rest[4:]
            if not isinstance(n, int) or not 0 <= n <= len(frames) - 4:
                raise ValueError("bad nidents")
            msg_id = check_header(loads(frames[n + 1]))["msg_id"]
        except (ProtocolError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
            self.bad("malformed give_back", str(e))
            return
        self._remove_from_routing(euuid)
        task = eng.outstanding.get(msg_id)
        if task is not None:  # else not one this engine holds (aborted, or already failed)
            if task.rest is None:
                task.rest = frames[n:]  # the original request, signed by its client
            self._requeue(eng, [task])
        self._send_engine(self.session.pack("give_back_reply", {"msg_id": msg_id}, idents=[euuid]))
    def _bound(self) -> int:
        if self.fixed_hwm:
            return self.fixed_hwm
        if self.mean_runtime is None:
            # nothing measured yet: the first tasks may be long, and one queued behind
            # a long task could not move to an engine that frees first
            return 1
        return policy.outstanding_bound(self.mean_runtime, self.mean_overhead or 0.0)

    def _dispatch(self) -> None:
        queue = self.queue
        while queue and queue[0].aborted:
            queue.popleft()
        if not queue or not self.order:
            return
        bound = self._bound()
        loads_ = {u: len(e.outstanding) for u, e in self.engines.items()}
        cap = {}
        for u, e in self.engines.items():
            c = bound
            if e.max_tasks is not None:
                c = min(c, e.max_tasks - e.sent + len(e.outstanding))
            cap[u] = c
        if self.n_running:
            # nothing more behind a task that runs long: it would wait for it
            mono = time.monotonic()
            for u, e in self.engines.items():
                if e.running is not None and policy.runs_long(mono - e.running[1], self.mean_runtime):
                    cap[u] = min(cap[u], len(e.outstanding))
        if self.unreachable:
            mono = time.monotonic()
            for u, until in list(self.unreachable.items()):
                if mono >= until or u not in self.engines:
                    del self.unreachable[u]
                else:
                    cap[u] = 0
        now = time.time()
        while queue:
            task = queue[0]
            if task.aborted:
                queue.popleft()
                continue
            euuid = policy.choose_engine(self.order, loads_, cap, self.rr)
            if euuid is None:
                return
            queue.popleft()
            eng = self.engines[euuid]
            if not self._send_engine([euuid, *task.idents, DELIM, *task.rest]):
                queue.appendleft(task)
                cap[euuid] = 0
                continue
            self.rr = (self.order.index(euuid) + 1) % len(self.order)
            task.engine = euuid
            task.sent = now
            if task.retries <= 0 and not eng.outstanding:
                # nothing to resend, and it starts at once: let the payload go.  A task
                # queued behind another keeps it, to be given back (see give_back)
                task.rest = None
            eng.outstanding[task.msg_id] = task
            eng.sent += 1
            loads_[euuid] += 1
            self._submitted.append((task.msg_id, eng.id, now))

    # -- giving back the tasks queued behind a long one --------------------------------
    def _rebalance(self) -> None:
        """Tasks queued behind a long-running task go to an idle engine (``policy.give_back_from``)."""
        now = time.monotonic()
        loads_, room, long = {}, {}, {}
        routed = set(self.order)
        for u, e in self.engines.items():
            loads_[u] = len(e.outstanding)
            room[u] = 0 if u not in routed or u in self.unreachable or (
                e.max_tasks is not None and e.sent >= e.max_tasks) else 1
            long[u] = e.running is not None and policy.runs_long(now - e.running[1], self.mean_runtime)
        for u in policy.give_back_from(loads_, room, long, len(self.queue)):
            eng = self.engines[u]
            self.give_back(u, [m for m in eng.outstanding if m != eng.running[0]])

    def give_back(self, euuid: bytes, msg_ids: list) -> int:
        """Ask engine ``euuid`` to return tasks it holds but has not started.

        An abort_request of our own, behind the tasks on the same pipe: the engine drops
        those still in its queue and names them in its abort_reply (``_given_back``),
        and they wait here again, first in line, for the engine the policy picks.  Any
        it has started meanwhile stays there and is answered as usual.  Only tasks whose
        payload is still held here can come back (see ``_dispatch``).  One request per
        engine at a time; returns how many tasks were asked for.
        """
        eng = self.engines.get(euuid)
        if eng is None or eng.giving_back is not None:
            return 0
        ids = [m for m in msg_ids if m in eng.outstanding and eng.outstanding[m].rest is not None]
        if not ids:
            return 0
        header = self.session.header("abort_request")
        # "give_back": they may come to this engine again (see Engine._abort)
        if not self._send_engine(self.session.pack("abort_request", {"msg_ids": ids, "give_back": True},
                                                   header=header, idents=[euuid])):
            return 0
        eng.giving_back = header["msg_id"]
        self.giving_back[header["msg_id"]] = euuid
        return len(ids)

    def _given_back(self, eng: _Engine, asked: str, content) -> None:
        """The engine's answer to ``give_back``: requeue what it dropped, in order."""
        del self.giving_back[asked]
        if eng.giving_back == asked:
            eng.giving_back = None
        try:
            dropped = set(check_content("abort_reply", loads(content)).get("aborted", ()))
        except (ProtocolError, ValueError, TypeError) as e:
            self.bad("malformed abort_reply", str(e))
            return
        back = [t for m, t in eng.outstanding.items() if m in dropped]
        self._requeue(eng, back)
        if back:
            log.info("engine %s gave back %d tasks queued behind a long one", eng.id, len(back))

    def _requeue(self, eng: _Engine, back: list) -> None:
        """Tasks ``eng`` held but never started wait here again, first in line, in order."""
        for task in back:
            del eng.outstanding[task.msg_id]
            eng.sent -= 1  # never ran there: not one of its max_tasks
            task.engine = None
            self._done.append((task.msg_id, "given_back", None, None))
        self.queue.extendleft(reversed(back))

    def _send_engine(self, frames: list) -> bool:
        try:
            send_frames(self.engine_sock, frames)
            return True
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:
                raise
            euuid = frames[0]
            log.warning("engine %r unreachable; routing around it for a second", euuid)
            # its connection is down: the hub declares it dead if it is, else it is back
            self.unreachable[euuid] = time.monotonic() + 1.0
            return False

    def _remove_from_routing(self, euuid: bytes) -> None:
        if euuid in self.order:
            self.order.remove(euuid)
            self.rr = 0

    # -- hub notifications ---------------------------------------------------------------
    def _on_notification(self, frames: list) -> None:
        try:
            msg = self.session.unpack(frames[1:] if frames and frames[0].bytes != DELIM else frames)
        except ProtocolError as e:
            self.bad("notification", str(e))
            return
        kind = msg.header["msg_type"]
        c = msg.content
        if kind == "registration":
            self._add_engine(c)
        elif kind == "unregistration":
            self._engine_died(c)
        elif kind == "flush_records":
            self._flush_records(flushed=c.get("seq"))
        elif kind == "launcher_gone":
            self.launcher_gone = c
            self.launchers_live = c.get("left")
        elif kind == "hub_beat":
            if isinstance(c.get("launchers"), int):
                self.launchers_live = c["launchers"]
            live = c.get("engines", {})
            for info in live.values():
                if info["uuid"].encode() not in self.engines and info["uuid"].encode() not in self.dead:
                    self._add_engine(info)
            live_uuids = {i["uuid"].encode() for i in live.values()}
            for euuid in [u for u in self.engines if u not in live_uuids]:
                self._engine_died(dict(self.engines[euuid].info, reason="unregistered"))

    def _add_engine(self, info: dict) -> None:
        euuid = info["uuid"].encode()
        if euuid in self.engines or euuid in self.dead:
            return
        self.engines[euuid] = _Engine(info)
        self.order.append(euuid)
        self.no_engines_since = None
        log.info("engine %s joined", info["id"])

    def _engine_died(self, info: dict) -> None:
        euuid = info["uuid"].encode()
        self.dead[euuid] = None
        if len(self.dead) > DEAD_KEPT:
            self.dead.popitem(last=False)  # bounded: max_tasks_per_child=1 makes one per task
        eng = self.engines.pop(euuid, None)
        self._remove_from_routing(euuid)
        if eng is None:
            return
        if eng.running is not None:
            eng.running = None
            self.n_running -= 1
        if eng.giving_back is not None:
            # its answer may never come; should it come (draining), it is a plain abort_reply
            self.giving_back.pop(eng.giving_back, None)
            eng.giving_back = None
        if info.get("exitcode") == 0 and eng.outstanding:
            # a clean exit (recycled, shut down): its last replies are still on the way
            self.draining[euuid] = (eng, time.monotonic() + DRAIN_TIMEOUT, info)
            return
        self._fail_or_retry(eng, info)

    def _no_engine_set(self) -> str | None:
        """Why no engine can come, if the last engine set is gone (and none is running)."""
        c = self.launcher_gone
        if c is None or self.launchers_live != 0:
            return None
        return (f"no engine is left, and no engine set is running to start one: the last "
                f"(pid {c.get('pid')} on {c.get('hostname')}) is gone: {c.get('reason')}")

    def _check_no_engines(self) -> None:
        """Queued tasks fail once no engine has been there for ``no_engine_timeout``, or
        at once when no engine set is left to start one."""
        now = time.monotonic()
        if self.engines:
            self.no_engines_since = now
            return
        why = self._no_engine_set()
        if self.no_engines_since is None and why is None:
            self.no_engines_since = now
            return
        if why is None and now - self.no_engines_since < self.no_engine_timeout:
            return
        failed = 0
        while self.queue:
            task = self.queue.popleft()
            if task.aborted:
                continue
            self.tasks.pop(task.msg_id, None)
            text = why or f"no engine joined the cluster for {self.no_engine_timeout:.0f}s"
            send_frames(self.client, self.session.pack(
                "apply_reply", {"status": "error", "ename": "NoEnginesError", "evalue": text},
                parent=task.parent, idents=task.reply, parent_id=task.msg_id, status="error"))
            self._done.append((task.msg_id, "no_engines", None, None))
            failed += 1
        log.warning("%s: failed %d queued tasks", why or f"no engines for {self.no_engine_timeout:.0f}s",
                    failed)
        self.no_engines_since = None

    def _check_draining(self) -> None:
        now = time.monotonic()
        for euuid, (eng, deadline, info) in list(self.draining.items()):
            if not eng.outstanding or now > deadline:
                del self.draining[euuid]
                self._fail_or_retry(eng, info)

    def _fail_or_retry(self, eng: _Engine, info: dict) -> None:
        retried, failed = 0, 0
        for task in reversed(list(eng.outstanding.values())):
            if task.rest is not None and task.retries > 0:
                task.retries -= 1
                task.engine = None
                self.queue.appendleft(task)
                retried += 1
            else:
                self.tasks.pop(task.msg_id, None)
                reply = self.session.pack(
                    "apply_reply",
                    {"status": "error", "ename": "EngineDiedError", "engine": info},
                    parent=task.parent, idents=task.reply, parent_id=task.msg_id,
                    status="error", engine=eng.id)
                self.client.send_multipart(reply, copy=False)
                self._done.append((task.msg_id, "engine_died", None, None))
                failed += 1
        log.info("engine %s gone (%s): %d tasks resubmitted, %d failed",
                 eng.id, info.get("reason", "?"), retried, failed)

    def _on_subscription(self, frames: list) -> None:
        """The hub subscribed to our records: from now on they reach it."""
        # the hub subscribes to other topics on this socket too (the devices' copies)
        if frames and frames[0].bytes[:1] == b"\x01" and b"task".startswith(frames[0].bytes[1:]):
            self.hub_listens = True

    def _flush_records(self, flushed: int | None = None) -> None:
        # batched on a clock: a message to the hub per task would wake it per task,
        # and on a small machine every extra wake-up is latency for someone else.
        # ``flushed``: the hub asks for everything now, to answer a status request.
        # Held until the hub listens: sent before, they would be dropped (see _sockets)
        if not self.hub_listens:
            return
        now = time.monotonic()
        if flushed is not None or (
                (self._submitted or self._done) and (now >= self._next_flush or len(self._done) > 5000)):
            self._next_flush = now + RECORD_INTERVAL
            rec = {"submitted": self._submitted, "done": self._done, "queue": len(self.queue)}
            if isinstance(flushed, int):
                rec["flushed"] = flushed
            self.mon.send_multipart([b"task", dumps(rec)])
            self._submitted = []
            self._done = []


def main(info: ConnectionInfo, hwm: int | None = None, no_engine_timeout: float = 30.0) -> None:
    TaskScheduler(info, hwm, no_engine_timeout).run()
