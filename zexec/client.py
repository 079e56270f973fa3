"""The client: user threads send, one IO thread receives and resolves futures.

::

    user threads (under one lock):
               --DEALER task_send--> task scheduler   apply and abort requests
               --DEALER mux_send---> MUX device       engine-targeted apply and abort requests
                 (each names the IO thread's socket in header "reply_to")
    IO thread:
               <-DEALER task-------- task scheduler   replies, abort verdicts
               <-DEALER mux--------- MUX device       replies, abort verdicts; resends of lost ones
               --DEALER control----> control device   shutdown and interrupt requests to engines
               <-DEALER registrar--> hub              connection and status queries
               <--SUB iopub--------- IOPub device     task started (future -> RUNNING), output
               <--SUB notif--------- hub              engines joining/leaving, hub_beat, lost_message
    user threads hand the IO thread other work through an outbox and a wake-up pipe.

The IO thread sends on the *_send sockets too, under the same lock (an expired time
limit's abort, a task whose argument futures are done): nothing may hold that lock
while it waits for the IO thread.

A task is registered before it is sent, so its reply (which may come back at once)
finds its future.  The registry maps each message id to its future until the reply
comes, the future is cancelled, its engine dies, or the hub is lost; then the entry
goes, so finished futures are never retained here.
"""

from __future__ import annotations

import atexit
import collections
import functools
import heapq
import itertools
import logging
import math
import os
import sys
import threading
import time
import types
import weakref
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures._base import PENDING, RUNNING
from typing import Any, Callable

import zmq

from . import serialize, wire
from ._proc import malloc_trim
from .connection import ConnectionInfo, context, secure
from .errors import (ClusterLostError, EngineDiedError, InitializerError, NoEnginesError,
                     ProtocolError, RemoteTraceback, TaskInterrupted, ZexecError)
from .futures import Verdicts, ZFuture, cancel_dropped, resolve
from .futures import fail as _fail
from .logforward import handle_records
from .protocol import RateLimitedLog, Session, check_content, check_header, loads, split_idents

log = logging.getLogger("zexec.client")

#: a client that hears nothing from the hub for this long declares the cluster lost
HUB_TIMEOUT = 4.0
#: then a direct query to the registrar must be answered within this long
PROBE_TIMEOUT = 4.0
FN_CACHE_SIZE = 128
#: how often the IO thread asks ``Client.watch``
WATCH_INTERVAL = 0.2
#: dead engines whose details are kept for error messages (ids are never reused, so
#: ``max_tasks_per_child=1`` makes one per task: all of them would grow without end)
DEAD_KEPT = 256
#: seconds an interrupted task has to stop before its engine gives up on it and exits
INTERRUPT_GRACE = 5.0
#: the longest a batch of a map call's short items may run on one engine
BATCH_TIME = 0.005
#: the least work a batch carries when its call has that much: each batch costs the
#: client, the task scheduler and an engine about this much (messages, wake-ups), so
#: spreading less work over more engines only adds trips (measured: a map of 16 tiny
#: items as one batch costs 2.5x less CPU in all than as one batch per engine)
BATCH_MIN = 0.001
#: load-balanced tasks a client has at the task scheduler at most; the rest wait here,
#: as their signed frames, and leave as replies come back (back-pressure: a flood of
#: submits costs the scheduler no memory, and it keeps dispatching at its own rate)
MAX_IN_FLIGHT = 2000
#: held tasks past which a submitting thread waits (``Client.pace``) until the IO thread
#: has sent half of them: a thread that submits without pause holds the GIL, and the
#: IO thread, which gives it up at every socket call, would get it back only once per
#: switch interval (5 ms): replies would go unread and the scheduler's queue run dry
MAX_HELD = 2000
#: a submitting thread waits for room as long as the IO thread sends at least
#: PACE_MIN held tasks every PACE_WAIT seconds; slower, the tasks are long (their
#: submitter holds the GIL for little of their time), and it no longer waits, until
#: the held tasks are down to half again or they leave that fast again (a pause of
#: the whole process, a full garbage collection, must not end the pacing for good)
PACE_WAIT = 1.0
PACE_MIN = 100
#: load-balanced tasks of ours at the scheduler from which a plain function's small
#: task is held to leave in a batch (see _Held): a new task waits behind those anyway,
#: and one by one, a flood costs the scheduler and the engines more than its work
COALESCE_AT = 256
#: held tasks looked at per task a batch may take, to find those of its function
SCAN_PER_TASK = 4
#: replies after which the client, once nothing is pending, gives memory back
#: (see _give_back_memory)
TRIM_AFTER = 10_000

_clients: "weakref.WeakSet[Client]" = weakref.WeakSet()
_CACHEABLE = (types.FunctionType, types.BuiltinFunctionType)


def _stat_key(fn: Callable):
    """What a function's run times are recorded under: the function a partial or a
    bound method holds, else the callable's type (a wrapper's instances share it)."""
    f = getattr(fn, "func", fn)
    f = getattr(f, "__func__", f)
    return f if isinstance(f, _CACHEABLE) else type(f)


def batch_size(n: int, engines: int, mean: float) -> int:
    """How many of a map call's ``n`` items, of ``mean`` seconds each, go as one batch.

    Items whose batch would run over BATCH_TIME are not batched (1): long items spread
    one by one, to whichever engine frees first.  Otherwise up to ``n / engines`` per
    batch, so every engine gets a share, but never less than BATCH_MIN of work per
    batch: below that a batch costs more in trips than it gains in parallel work (the
    16 tiny items of an optimiser's generation go as one batch), and never more than
    BATCH_TIME.
    """
    if n < 2 or engines < 1 or mean * 2 > BATCH_TIME:
        return 1
    k = max(-(-n // engines), math.ceil(BATCH_MIN / mean) if mean > 0 else n)
    if mean > 0:
        k = min(k, int(BATCH_TIME / mean))
    return max(1, min(k, n))


def _batch_done(fut: Future) -> None:
    """A batch failed or was dropped as a whole: so did each of its items.

    Then it lets its items go: each item keeps its batch (``_zbatch``), and a caller
    who keeps one item must not keep every other item and its result with it."""
    items, fut._items = fut._items, ()
    if fut.cancelled():
        for item in items:
            cancel_dropped(item)
        return
    exc = fut.exception()
    if exc is not None:
        for item in items:
            _fail(item, exc)


class _Held:
    """A load-balanced task held here unsent as its pickled parts, not yet a message.

    Held only in a flood (the scheduler has COALESCE_AT of ours, or tasks are held
    already) and only a small task (one argument frame, no time limit; a callable
    object rides in its arguments, see ``Client._held_task``): the IO thread sends it
    with the held tasks of the same function beside it as one batch when that
    function is known short (``_coalesce``), one trip for many instead of a message
    per task through the scheduler and an engine, which cost more CPU than such a
    task itself.  Its arguments were pickled at submit (what the
    caller changes later is not seen, as for any task)."""

    __slots__ = ("fut", "key", "fn_frames", "arg_frames", "retries", "refs")

    def __init__(self, fut: ZFuture, key: str, fn_frames: list, arg_frames: list, retries: int,
                 refs: dict) -> None:
        self.fut = fut
        self.key = key
        self.fn_frames = fn_frames
        self.arg_frames = arg_frames
        self.retries = retries
        self.refs = refs  # key -> frames of the by-value functions its payload refers to


@atexit.register
def _close_all() -> None:
    for c in list(_clients):
        c.close()


class Client:
    """A connection to one cluster, shared by its ZmqExecutor and DirectViews."""

    def __init__(self, connection: str | ConnectionInfo, *, timeout: float = 10.0,
                 forward_output: bool = True) -> None:
        info = connection if isinstance(connection, ConnectionInfo) else ConnectionInfo.read(connection)
        self.info = info
        self.session = Session(info.key_bytes)
        self.forward_output = forward_output
        if not forward_output:
            self.session.fixed = {"forward": False}  # tasks' log records stay on the engine
        self.ctx = context()
        self._futures: dict[str, tuple[Future, int | None]] = {}
        self._outbox: collections.deque = collections.deque()
        self._requests: dict[str, Future] = {}
        self._abort_waits: dict[str, Verdicts] = {}
        self._direct_frames: dict[str, list] = {}
        self._lost_tries: dict[str, int] = {}
        self._resend_for: dict[str, str] = {}
        self._draining: dict[int, tuple] = {}
        # time limits: a heap of (deadline, seq, weakref to future, limit, grace), pushed
        # by user threads under _timer_lock, expired by the IO thread; interrupts waiting
        # for their task's engine to be known (it reports the start)
        self._deadlines: list = []
        self._timer_lock = threading.Lock()
        self._timer_seq = itertools.count()
        self._compact_at = 1024
        self._want_interrupt: dict[str, tuple] = {}
        self._engines: dict[int, dict] = {}
        self._dead: collections.OrderedDict[int, dict] = collections.OrderedDict()
        self._last_id = -1  # the highest engine id seen: a lower one not live has died
        self._cond = threading.Condition()
        self._broken: BaseException | None = None
        self._closing = False
        self._fn_cache: collections.OrderedDict = collections.OrderedDict()
        self._runtimes: dict = {}
        self._held: collections.OrderedDict = collections.OrderedDict()  # msg_id -> frames or _Held
        self._inflight: set = set()  # load-balanced tasks at the scheduler
        #: batches of held tasks at the scheduler: msg_id -> their tasks beyond the first,
        #: and those tasks' sum, counted with ``_inflight`` (both only in the IO thread)
        self._batched: dict[str, int] = {}
        self._batched_n = 0
        self._room = threading.Condition(threading.Lock())  # the IO thread sent held tasks
        self._pacing = True  # False once a wait for room timed out (see pace)
        self._unpaced = (0.0, 0)  # since when, and the count of released then
        self._released = 0  # held tasks sent so far (see pace)
        self._replies = 0  # replies since memory was last given back
        self._fn_lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._bad = RateLimitedLog(log)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._wake_pending = False
        self.shm = info.shm_store()
        self._shm_out: dict[str, dict] = {}
        try:
            reply = self._connect(timeout)
        except BaseException:
            self.ctx.destroy(linger=0)
            os.close(self._wake_r)
            os.close(self._wake_w)
            raise
        for info_ in reply["engines"].values():
            self._engines[info_["id"]] = info_
        self._last_beat = time.monotonic()
        self._probe: tuple | None = None
        #: set by whoever started the cluster's processes and can see them die (a
        #: LocalCluster): returns the reason the cluster cannot serve, or None
        self.watch: Callable[[], BaseException | None] | None = None
        self._next_look = 0.0
        self._thread = threading.Thread(target=self._io_loop, name="zexec-client-io", daemon=True)
        self._thread.start()
        _clients.add(self)

    # -- connecting ----------------------------------------------------------------------
    def _connect(self, timeout: float) -> dict:
        info = self.info
        self.registrar = self._socket(zmq.DEALER)
        self.registrar.connect(info.url("registration"))
        self.notif = self._socket(zmq.SUB)
        for topic in (b"registration", b"unregistration", b"hub_beat", b"lost_message",
                      b"launcher_gone"):
            self.notif.subscribe(topic)
        self.notif.connect(info.url("notification"))
        req = self.session.pack("connection_request", {})
        self.registrar.send_multipart(req)
        if not self.registrar.poll(int(timeout * 1000)):
            raise ClusterLostError(f"no answer from the controller at {info.url('registration')} "
                                   f"within {timeout:.0f}s (is it running, and is the key right?)")
        msg = self.session.unpack(self.registrar.recv_multipart())
        reply = msg.content
        host = None
        if info.transport != "ipc":
            host = info.url("registration").split("//", 1)[1].rsplit(":", 1)[0].strip("[]")
        addrs = info.with_(addresses=reply["addresses"])
        # requests leave from user threads through the *_send sockets (one lock), and
        # every reply is addressed to the IO thread's sockets (header "reply_to")
        recv_id, send_id = (self.session.session + "-r").encode(), (self.session.session + "-s").encode()
        self.reply_to = recv_id.decode()
        self.task = self._socket(zmq.DEALER, recv_id)
        self.mux = self._socket(zmq.DEALER, recv_id)
        self.iopub = self._socket(zmq.SUB)
        self.iopub.subscribe(self.session.session.encode())
        # watched from before they connect: a handshake that has happened is not reported
        handshakes = [s.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
                      for s in (self.task, self.mux, self.iopub)]
        self.task.connect(addrs.url("task_client", host))
        self.mux.connect(addrs.url("mux_client", host))
        self.iopub.connect(addrs.url("iopub_client", host))
        self.task_send = self._socket(zmq.DEALER, send_id)
        self.task_send.connect(addrs.url("task_client", host))
        self.mux_send = self._socket(zmq.DEALER, send_id)
        self.mux_send.connect(addrs.url("mux_client", host))
        self.control = self._socket(zmq.DEALER)
        self.control.connect(addrs.url("control_client", host))
        # a device's ROUTER drops a reply for an identity it does not know yet, and a
        # PUB what a subscriber has not asked for yet: the receiving sockets must be
        # connected before the first task goes out on the sending ones, or the first
        # reply (or output) can be lost (bounded wait; then the hub probe decides)
        deadline = time.monotonic() + timeout
        for sock, handshake in zip((self.task, self.mux, self.iopub), handshakes):
            if handshake.poll(max(0, int((deadline - time.monotonic()) * 1000))):
                handshake.recv_multipart()
            sock.disable_monitor()
            handshake.close(linger=0)
        return reply

    def _socket(self, kind: int, identity: bytes | None = None) -> zmq.Socket:
        s = self.ctx.socket(kind)
        if identity is not None:
            s.identity = identity
        secure(s, self.info, server=False)
        s.linger = 0
        s.sndhwm = s.rcvhwm = 0
        return s

    # -- user-thread API -----------------------------------------------------------------
    @property
    def engines(self) -> list[int]:
        return sorted(self._engines)

    def engine_info(self, engine_id: int) -> dict | None:
        return self._engines.get(engine_id) or self._dead.get(engine_id)

    def check(self) -> None:
        if self._broken is not None:
            raise self._broken
        if self._closing:
            raise RuntimeError("cannot schedule new futures after the client was closed")

    def pace(self) -> None:
        """Wait, before a load-balanced submit, while MAX_HELD tasks wait here unsent.

        Back-pressure on the submitting thread: it goes on once the IO thread has sent
        half of them, so replies are read and the task scheduler stays fed while a
        flood is submitted.  Never in the IO thread (a done-callback that submits), and
        only while the tasks go fast: when fewer than PACE_MIN leave in PACE_WAIT, the
        tasks are long, and the caller no longer waits until the held tasks are down
        to half or go fast again (a submit loop of long tasks returns at once, as on
        a process pool).
        """
        if len(self._held) < MAX_HELD or self._broken is not None \
                or threading.current_thread() is self._thread:
            return
        if not self._pacing:
            # no longer waiting: look again, once per PACE_WAIT, whether tasks go fast
            now = time.monotonic()
            since, mark = self._unpaced
            if now - since < PACE_WAIT:
                return
            self._unpaced = (now, self._released)
            if self._released - mark < PACE_MIN:
                return
            self._pacing = True
        with self._room:
            mark, deadline = self._released, time.monotonic() + PACE_WAIT
            while len(self._held) > MAX_HELD // 2 and self._broken is None and not self._closing:
                left = deadline - time.monotonic()
                if left <= 0:
                    if self._released - mark < PACE_MIN:
                        self._pacing = False
                        self._unpaced = (time.monotonic(), self._released)
                        return
                    mark, deadline = self._released, time.monotonic() + PACE_WAIT
                    continue
                self._room.wait(left)

    def _pack_fn(self, fn: Callable, refs: dict) -> tuple[str, list]:
        """Pickle each function once per client; engines cache it by its key.

        A plain function is sent as its cached frames and key.  A callable object (a
        partial, a bound method, a wrapper) carries state that may change between
        submits, so it is pickled every time and unpickled afresh for each task (key
        ""), as ProcessPoolExecutor would; but a function inside it that would go by
        value (one of ``__main__``) is written as a reference to its cached frames,
        which ``refs`` collects (key -> frames): only the state is pickled per task.
        The arguments are pickled the same way (a function passed to a task).
        """
        if not isinstance(fn, _CACHEABLE):
            return "", serialize.dumps(fn, functools.partial(self._ref_fn, refs))
        return self._cached_fn(fn)

    def _cached_fn(self, fn: Callable) -> tuple[str, list]:
        entry = self._fn_cache.get(id(fn))
        if entry is not None and entry[0] is fn:
            return entry[1], entry[2]
        frames = serialize.dumps(fn)
        with self._fn_lock:
            key = self.session.new_id()
            self._fn_cache[id(fn)] = (fn, key, frames)
            if len(self._fn_cache) > FN_CACHE_SIZE:
                self._fn_cache.popitem(last=False)
        return key, frames

    def _ref_fn(self, refs: dict, fn: Callable) -> str:
        """The persistent id of a by-value function met inside a task's payload."""
        key, frames = self._cached_fn(fn)
        refs[key] = frames
        return key

    def batch_size(self, fn: Callable, n: int) -> int:
        """How many of a map call's ``n`` items to send together as one task.

        Only items known to be short (this function's recent runs, see ``_runtimes``):
        their cost is the trip, not the work (see the module's ``batch_size``).
        Engines that recycle after ``max_tasks_per_child`` count tasks: no batches.
        """
        return self._batch_for(_stat_key(fn), n)

    def _batch_for(self, stat, n: int) -> int:
        """``batch_size`` for a function recorded under ``stat`` (see ``_stat_key``)."""
        engines = len(self._engines)
        mean = self._runtimes.get(stat)
        if mean is None or engines == 0:
            return 1
        if any(e.get("max_tasks") for e in list(self._engines.values())):
            return 1
        return batch_size(n, engines, mean)

    def _ran(self, key, seconds) -> None:
        """Record how long one run of a function took (an item of a batch, or a task)."""
        if isinstance(seconds, (int, float)) and key is not None:
            runtimes = self._runtimes
            old = runtimes.get(key)
            runtimes[key] = seconds if old is None else old + 0.3 * (seconds - old)
            if len(runtimes) > 256:
                runtimes.pop(next(iter(runtimes)))

    def submit(self, fn: Callable, args: Any, kwargs: dict | None = None, *,
               target: int | None = None, retries: int = 0, chunk: bool = False,
               timeout: float | None = None, grace: float = INTERRUPT_GRACE,
               batch: list | None = None) -> ZFuture:
        """Send one task: load-balanced, or to engine ``target``; returns its future.

        With ``timeout``, the task fails with TimeoutError that many seconds after this
        call, and is dropped where it waits or interrupted where it runs (``_expire``).
        With ``batch`` (a list of (future, args) items, ``args`` ignored), the items go
        as one task to one engine and come back in one reply; each item's future gets
        its own result or exception.  The returned future is the batch's own.
        """
        self.check()
        if target is not None and target not in self._engines:
            self._no_engine(target)
        fut = ZFuture()
        if (target is None and batch is None and not chunk and timeout is None
                and (self._held or len(self._inflight) + self._batched_n >= COALESCE_AT)):
            entry = self._held_task(fut, fn, args, kwargs, retries)
            if entry is not None:
                return self._hold(entry)
        fn_refs: dict = {}
        try:
            key, fn_frames = self._pack_fn(fn, fn_refs)
            by_ref = functools.partial(self._ref_fn, fn_refs)
            if batch is None:
                arg_frames = serialize.dumps(args if chunk else (args, kwargs or {}), by_ref)
            else:
                arg_frames, items, packed = self._pack_items(fut, batch, by_ref)
                if not items:
                    fut.set_result(None)  # every item failed to pickle
                    return fut
        except Exception as e:  # noqa: BLE001 - an unpicklable argument fails this future only
            fut.set_exception(e)
            return fut
        fut._zclient = self
        fut._zstat = _stat_key(fn)
        header = self.session.header("apply_request", retries=retries, reply_to=self.reply_to)
        fut.msg_id = msg_id = header["msg_id"]
        content = {"fn": key, "nfn": len(fn_frames)}
        if chunk:
            content["chunk"] = True
        if batch is not None:
            content["batch"] = items
            if packed:
                content["packed"] = packed
        ref_frames = self._refs(content, fn_refs)
        buffers = [*ref_frames, *fn_frames, *arg_frames]
        if self.shm is not None and len(arg_frames) > 1:
            refs = self.shm.export(buffers, len(ref_frames) + len(fn_frames))  # [] when tmpfs is full
            if refs:
                content["shm"] = refs
                names = [r[1] for r in refs]
                self._shm_out[msg_id] = {r[1]: r[3] for r in refs}
                fut.add_done_callback(lambda _f, names=names, m=msg_id: self._shm_done(m, names))
        serialize.snapshot(buffers)  # what a shared-memory file does not hold yet
        futures = self._futures
        try:
            # registered before it is sent (the reply may beat us back), and only then is
            # the engine checked: the IO thread removes a dead engine first and fails its
            # futures after, so either it finds this future or we see the engine gone
            futures[msg_id] = (fut, target)
            if target is None:
                sock, idents = self.task_send, ()
            else:
                info = self._engines.get(target)
                if info is None:
                    self._no_engine(target)
                sock, idents = self.mux_send, (info["uuid"].encode(),)
            frames = self.session.pack("apply_request", content, header=header,
                                       buffers=buffers, idents=idents)
            if target is not None:
                self._direct_frames[msg_id] = frames  # to resend if the MUX device loses it
            with self._send_lock:
                self.check()
                if futures is not self._futures:
                    # the IO thread rebuilt the registry since (_give_back_memory)
                    self._futures[msg_id] = (fut, target)
                if target is not None:
                    wire.send_frames(sock, frames)
                elif self._held or self._full():
                    self._held[msg_id] = frames  # the IO thread sends it (_release_held)
                else:
                    # counted before it leaves: its reply may come back at once
                    self._inflight.add(msg_id)
                    try:
                        wire.send_frames(sock, frames)
                    except BaseException:
                        self._inflight.discard(msg_id)
                        raise
        except BaseException:
            # no engine, a closed client, or interrupted (KeyboardInterrupt, even between
            # two frames: see wire.send_frames): the caller never gets this future, so
            # nothing may wait for its reply or keep its shared memory
            futures.pop(msg_id, None)
            self._futures.pop(msg_id, None)
            self._direct_frames.pop(msg_id, None)
            if msg_id in self._shm_out:
                self._shm_done(msg_id, list(self._shm_out[msg_id]))
            raise
        if timeout is not None:
            self._arm(fut, timeout, grace)
        return fut

    def _full(self) -> bool:
        """Whether the scheduler holds MAX_IN_FLIGHT of our load-balanced tasks."""
        return len(self._inflight) + self._batched_n >= MAX_IN_FLIGHT

    def _held_task(self, fut: ZFuture, fn: Callable, args: Any, kwargs: dict | None,
                   retries: int) -> _Held | None:
        """A flood's task as the parts it waits here as (see _Held), or None when it
        cannot join a batch (large arguments, or they fail to pickle: ``submit`` then
        sends it, or reports the error, as a task of its own).

        A callable object (a partial, a bound method, a wrapper) is pickled with its
        arguments, as ``serialize.call``'s first one, and afresh for each task (its
        state may change between submits): so its tasks batch as a plain function's
        do, and the functions it refers to (``refs``) travel once per batch."""
        refs: dict = {}
        by_ref = functools.partial(self._ref_fn, refs)
        try:
            if isinstance(fn, _CACHEABLE):
                key, fn_frames = self._cached_fn(fn)
                arg_frames = serialize.dumps((args, kwargs or {}), by_ref)
            else:
                key, fn_frames = self._cached_fn(serialize.call)
                arg_frames = serialize.dumps(((fn, *args), kwargs or {}), by_ref)
        except Exception:  # noqa: BLE001 - submit pickles it again and fails this future only
            return None
        if len(arg_frames) != 1:
            return None  # out-of-band buffers (shared memory, snapshots): alone
        fut._zclient = self
        fut._zstat = _stat_key(fn)
        fut.msg_id = self.session.new_id()
        return _Held(fut, key, fn_frames, arg_frames, retries, refs)

    def _hold(self, entry: _Held) -> ZFuture:
        """Hold a flood's task here (the IO thread sends it at once, with those held
        beside it, if the scheduler has room: it is woken), or, should the flood be
        over, send it now as a message of its own."""
        fut, msg_id = entry.fut, entry.fut.msg_id
        futures = self._futures
        sent = False
        try:
            futures[msg_id] = (fut, None)  # registered first, as in submit
            with self._send_lock:
                self.check()
                if futures is not self._futures:
                    self._futures[msg_id] = (fut, None)  # see submit
                if self._held or len(self._inflight) + self._batched_n >= COALESCE_AT:
                    self._held[msg_id] = entry
                    room = not self._full()
                else:
                    frames = self._single(msg_id, entry)
                    self._inflight.add(msg_id)  # counted before it leaves, as in submit
                    sent = True
                    wire.send_frames(self.task_send, frames)
                    return fut
            if room:
                self._wake()
            return fut
        except BaseException:
            if sent:
                self._inflight.discard(msg_id)
            # interrupted (KeyboardInterrupt, in _wake's system call too): the caller never
            # gets this future, so its task must not leave later and run unseen
            futures.pop(msg_id, None)
            self._futures.pop(msg_id, None)
            with self._send_lock:
                self._held.pop(msg_id, None)
            raise

    def _single(self, msg_id: str, e: _Held) -> list:
        """A held task's message, alone."""
        content: dict = {"fn": e.key, "nfn": len(e.fn_frames)}
        header = self.session.header("apply_request", msg_id, retries=e.retries, reply_to=self.reply_to)
        return self.session.pack("apply_request", content, header=header,
                                 buffers=[*self._refs(content, e.refs), *e.fn_frames, *e.arg_frames])

    @staticmethod
    def _refs(content: dict, refs: dict) -> list:
        """The frames of the by-value functions a payload refers to, first in the
        message; ``content["refs"]`` names them ([[key, number of frames], ...])."""
        if not refs:
            return []
        content["refs"] = [[k, len(v)] for k, v in refs.items()]
        return [f for v in refs.values() for f in v]

    def _arm(self, fut: ZFuture, limit: float, grace: float) -> None:
        deadline = time.monotonic() + limit
        ref = weakref.ref(fut)  # a finished future is not kept until its deadline
        with self._timer_lock:
            heap = self._deadlines
            if len(heap) >= self._compact_at:
                # amortized: drop the entries of futures done or gone since they came
                heap[:] = [e for e in heap if (f := e[2]()) is not None and not f.done()]
                heapq.heapify(heap)
                self._compact_at = max(1024, 2 * len(heap))
            heapq.heappush(heap, (deadline, next(self._timer_seq), ref, limit, grace))
            first = heap[0][2] is ref
        if first:
            self._wake()  # the IO thread may sleep past this deadline otherwise

    def interrupt(self, fut: ZFuture, grace: float = INTERRUPT_GRACE) -> bool:
        """KeyboardInterrupt in ``fut``'s running task, or drop it where it waits.

        Returns False if the future is already done.  A task that has not started is
        cancelled (as ``cancel()``); a running one is interrupted through the control
        channel, and its future fails with TaskInterrupted once it stops (or with
        whatever it returns, if it catches the interrupt and returns).  If it has not
        stopped ``grace`` seconds later, its engine fails it and exits.  A task that
        left in a batch (a map's item, a flood's submit) runs inside its batch's task,
        which the engine knows, not it: unless cancelled, it runs on (False).
        """
        if fut.done() or getattr(fut, "_zclient", None) is not self:
            return False
        if not fut.running() and fut.cancel():
            return True
        if fut.done() or getattr(fut, "_zbatch", None) is not None:
            return False
        self._outbox.append(("interrupt", ("interrupt", grace), fut.msg_id, fut, None))
        self._wake()
        return True

    def _pack_items(self, fut: ZFuture, batch: list, by_ref) -> tuple[list, list, int]:
        """Pickle a batch's items: returns their frames, ``[[msg_id, frames], ...]`` and
        how many frames hold them all as one payload (``serialize.dumps_items``: much
        cheaper to write and read than a pickle per item), or 0 when they go one by
        one: when they share a mutable object (each must get its own copy, as with a
        task per item) or one cannot be pickled (that one fails alone)."""
        futs = [item for item, _ in batch]
        argsets = [(args, {}) for _, args in batch]
        frames: list = []
        if not serialize.shared([args for _, args in batch]):
            try:
                frames = serialize.dumps_items(argsets, by_ref)
            except Exception:  # noqa: BLE001 - one by one below, to fail only the culprit
                frames = []
        packed = len(frames)
        counts = [0] * len(futs)
        if not packed:
            futs, counts = [], []
            for (item, _), args in zip(batch, argsets):
                try:
                    f = serialize.dumps(args, by_ref)
                except Exception as e:  # noqa: BLE001
                    item.set_exception(e)
                    continue
                futs.append(item)
                counts.append(len(f))
                frames += f
        items = []
        for item, n in zip(futs, counts):
            item.msg_id = self.session.new_id()
            item._zclient = self
            item._zbatch = fut
            items.append([item.msg_id, n])
        fut._items = futs
        fut.add_done_callback(_batch_done)
        return frames, items, packed

    def _resolve_batch(self, fut: ZFuture, outcomes: list, buffers: list, packed=0) -> None:
        """A batch's reply: each item's future gets its own outcome (see submit).

        With ``packed``, its first frames hold the results of its items "ok" without
        a frame count of their own, as one payload (see serialize.run_batch)."""
        items = fut._items
        if not isinstance(outcomes, list) or len(outcomes) != len(items):
            raise ProtocolError("a batch reply does not match its request")
        if type(packed) is not int or not 0 <= packed <= len(buffers):
            raise ProtocolError("a batch reply's packed results do not match its frames")
        results: Any = None
        if packed:
            try:
                results = serialize.loads(buffers[:packed])
                if type(results) is not list:
                    raise ProtocolError("a batch reply's packed results are not a list")
            except BaseException as e:  # noqa: BLE001 - fails the items whose results they are
                results = e
            results_iter = iter(results) if isinstance(results, list) else None
        off = packed
        for item, out in zip(items, outcomes):
            self._ran(fut._zstat, out.get("elapsed"))
            if out.get("status") == "ok" and packed and "n" not in out:
                if results_iter is None:
                    _fail(item, results)
                    continue
                try:
                    resolve(item, next(results_iter))
                except StopIteration:
                    _fail(item, ProtocolError("a batch reply holds fewer results than items"))
                continue
            n = out.get("n", 0)
            frames = buffers[off:off + n]
            off += n
            if out.get("status") == "ok":
                try:
                    result = serialize.loads(frames)
                except BaseException as e:  # noqa: BLE001 - fails this item only
                    _fail(item, e)
                    continue
                resolve(item, result)
            else:
                _fail(item, serialize.rebuild_exception(out, frames))
        resolve(fut, None)

    def _shm_done(self, msg_id: str, names: list) -> None:
        self._shm_out.pop(msg_id, None)
        self.shm.unlink(names)

    def _no_engine(self, target: int):
        dead = self._dead.get(target)
        if dead is not None:
            raise EngineDiedError.from_info(dead)
        if isinstance(target, int) and 0 <= target < self._last_id:
            raise EngineDiedError(target, "no longer in the cluster (died earlier)")
        raise ValueError(f"no engine {target} in this cluster (engines: {self.engines})")

    def _abort_sync(self, futures: list, timeout: float = 10.0) -> dict:
        """Ask where each task waits to drop it; msg_id -> True if it was dropped."""
        if threading.current_thread() is self._thread:
            # a done-callback cancelling: we cannot wait on ourselves, and dropping the
            # future locally could let its task run unseen, so report nothing dropped
            return {}
        if any(getattr(f, "_zbatch", None) is not None for f in futures):
            return self._abort_batched(futures, timeout)
        verdict = Verdicts(f.msg_id for f in futures)
        groups: dict = {}
        for f in futures:
            entry = self._futures.get(f.msg_id)
            if entry is None:
                verdict.decide(f.msg_id, False)  # already resolved
            else:
                self._abort_waits[f.msg_id] = verdict
                groups.setdefault(entry[1], []).append(f.msg_id)
        # aborts follow their tasks on the same socket, so they arrive after them
        held = []
        with self._send_lock:
            for target, ids in groups.items():
                if self._broken is not None or self._closing:
                    break
                if target is None and self._held:
                    held = [i for i in ids if self._held.pop(i, None) is not None]
                    if held:
                        dropped = set(held)
                        ids = [i for i in ids if i not in dropped]
                    if not ids:
                        continue
                msg = self.session.pack("abort_request", {"msg_ids": ids}, reply_to=self.reply_to)
                if target is None:
                    wire.send_frames(self.task_send, msg)
                elif target in self._engines:
                    uuid = self._engines[target]["uuid"].encode()
                    wire.send_frames(self.mux_send, [uuid, *msg])
        if held:
            self._dropped(held)  # never sent: dropped here
        verdict.event.wait(timeout)
        return verdict.result

    def _abort_batched(self, futures: list, timeout: float) -> dict:
        """Items of a batch are dropped together: a batch whose every pending item is
        asked for is aborted as one task; items of a batch asked for in part run."""
        plain, batches, verdict = [], {}, {}
        for f in futures:
            b = getattr(f, "_zbatch", None)
            if b is None:
                plain.append(f)
            else:
                batches.setdefault(b, []).append(f)
        whole = []
        for b, fs in batches.items():
            asked = {id(f) for f in fs}
            if not b.done() and all(i.done() or id(i) in asked for i in b._items):
                whole.append((b, fs))
            else:
                verdict.update((f.msg_id, False) for f in fs)
        result = self._abort_sync(plain + [b for b, _ in whole], timeout)
        for b, fs in whole:
            verdict.update((f.msg_id, bool(result.get(b.msg_id))) for f in fs)
        result.update(verdict)
        return result

    def _dropped(self, ids) -> None:
        """Tasks dropped before they ran (an abort's verdict, or still held here)."""
        for msg_id in ids:
            self._landed(msg_id)
            entry = self._futures.pop(msg_id, None)
            self._direct_frames.pop(msg_id, None)
            w = self._abort_waits.pop(msg_id, None)
            if entry is not None:
                if isinstance(w, _Expiry):
                    _fail(entry[0], w.exc)  # its time limit passed before it started
                else:
                    # cancel here, not only in the waiting thread: a verdict that
                    # comes after its wait timed out must still settle the future
                    cancel_dropped(entry[0])
            if w is not None:
                w.decide(msg_id, True)

    def _release_held(self) -> None:
        """Send held tasks as the scheduler's share of this client's work drains."""
        held, inflight = self._held, self._inflight
        with self._send_lock:
            while held and len(inflight) + self._batched_n < MAX_IN_FLIGHT:
                if self._broken is not None or self._closing:
                    return
                msg_id, frames = held.popitem(last=False)
                n = 1
                if type(frames) is _Held:
                    msg_id, frames, n = self._coalesce(msg_id, frames)
                inflight.add(msg_id)
                wire.send_frames(self.task_send, frames)
                self._released += n
        if len(held) <= MAX_HELD // 2:
            self._make_room()

    def _coalesce(self, msg_id: str, first: _Held) -> tuple[str, list, int]:
        """A held task's message (IO thread, under the send lock): alone, or as a batch
        with held tasks of the same function from among the next few, when that
        function is known to be short (``_batch_for``).  Each task keeps its own future and
        gets its own result or exception (``_resolve_batch``); the batch goes and
        comes back as one message, through the scheduler and one engine.  Returns
        the message's id, its frames and how many tasks it carries.

        A batch holds at most a quarter of an engine's share of MAX_IN_FLIGHT, so
        every engine has several queued while one is answered.  Once sent, a task
        of a batch is cancelled only with the whole batch (as a map's items)."""
        held = self._held
        group = [first]
        k = self._batch_for(first.fut._zstat, len(held) + 1)
        if k > 1:
            k = min(k, max(1, MAX_IN_FLIGHT // (4 * max(1, len(self._engines)))))
            # the held tasks of the same function among the next few: threads that
            # flood different functions at once interleave theirs, and a batch of
            # consecutive tasks only would be a batch of one (tasks of different
            # threads, or functions, have no order between them to keep)
            take, seen = [], 0
            for nid, e in held.items():
                if seen >= SCAN_PER_TASK * k or len(take) + 1 >= k:
                    break
                seen += 1
                if (type(e) is _Held and e.key == first.key and e.retries == first.retries
                        and e.fut._zstat is first.fut._zstat and e.refs.keys() == first.refs.keys()):
                    take.append(nid)
            for nid in take:
                group.append(held.pop(nid))
        if len(group) == 1:
            return msg_id, self._single(msg_id, first), 1
        content: dict = {"fn": first.key, "nfn": len(first.fn_frames)}
        batch = ZFuture()
        batch._zclient = self
        batch._zstat = first.fut._zstat
        header = self.session.header("apply_request", retries=first.retries, reply_to=self.reply_to)
        batch.msg_id = bid = header["msg_id"]
        # the batch is registered before its tasks leave the registry: should anything
        # below fail, the IO thread's failure fails the batch, and so each of them
        batch._items = [e.fut for e in group]
        batch.add_done_callback(_batch_done)
        futures = self._futures
        futures[bid] = (batch, None)
        items, buffers = [], [*self._refs(content, first.refs), *first.fn_frames]
        for e in group:
            f = e.fut
            # a cancel from now on asks for the batch (Client._abort_batched)
            f._zbatch = batch
            futures.pop(f.msg_id, None)
            items.append([f.msg_id, len(e.arg_frames)])
            buffers += e.arg_frames
        self._batched[bid] = len(group) - 1
        self._batched_n += len(group) - 1
        content["batch"] = items
        return bid, self.session.pack("apply_request", content, header=header, buffers=buffers), len(group)

    def _landed(self, msg_id) -> None:
        """A load-balanced task (or batch) is no longer at the scheduler: answered or
        dropped there.  ``_batched`` changes only in the IO thread (see __init__)."""
        self._inflight.discard(msg_id)
        if self._batched:
            n = self._batched.pop(msg_id, 0)
            if n:
                self._batched_n -= n

    def _make_room(self) -> None:
        """Wake the threads waiting in ``pace`` (and let them wait again later)."""
        with self._room:
            self._pacing = True
            self._room.notify_all()

    def _fail_held(self, exc: BaseException) -> None:
        with self._send_lock:
            ids, self._held = list(self._held), collections.OrderedDict()
        self._make_room()
        for msg_id in ids:
            entry = self._futures.pop(msg_id, None)
            if entry is not None:
                _fail(entry[0], exc)

    def _wake(self) -> None:
        # one byte per sleep of the IO thread, not per message: it clears the flag
        # before it drains the outbox, so an append after that sees False and writes
        if not self._wake_pending:
            self._wake_pending = True
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass

    def request(self, msg_type: str, content: dict | None = None, timeout: float = 10.0) -> dict:
        """A query to the hub (connection_request, queue_request...); returns its content."""
        self.check()
        fut: Future = Future()
        frames = self.session.pack(msg_type, content or {})
        self._outbox.append(("request", None, None, fut, frames))
        self._wake()
        try:
            return fut.result(timeout)
        except (TimeoutError, FutureTimeout):
            raise TimeoutError(f"the hub did not answer {msg_type} within {timeout:.0f}s") from None

    def shutdown_engines(self, engine_ids: list) -> None:
        """Ask engines to exit after their current task (through the control device)."""
        for eid in engine_ids:
            info = self._engines.get(eid)
            if info is not None:
                frames = self.session.pack("shutdown_request", {}, idents=[info["uuid"].encode()])
                self._outbox.append(("control", None, None, None, frames))
        self._wake()

    def wait_for_engines(self, n: int, timeout: float = 30.0, check: Callable[[], None] | None = None) -> None:
        """Block until ``n`` engines are live; ``check`` may raise to give up early."""
        deadline = time.monotonic() + timeout
        while True:
            with self._cond:
                self._cond.wait_for(lambda: len(self._engines) >= n or self._broken is not None,
                                    timeout=0.2)
            if self._broken is not None:
                raise self._broken
            if len(self._engines) >= n:
                return
            if check is not None:
                check()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self._engines)} of {n} engines registered within {timeout:.0f}s")
            # the notification may have been published before our subscription took.
            # A snapshot may be older than notifications already handled: only add from
            # it, never remove (removals come in order on the notification socket)
            try:
                reply = self.request("connection_request", timeout=max(0.5, deadline - time.monotonic()))
            except (TimeoutError, FutureTimeout):
                continue
            for info in reply.get("engines", {}).values():
                self._add_engine(info)

    def close(self) -> None:
        """Stop the IO thread and fail whatever is still pending (nothing hangs)."""
        if self._closing:
            return
        self._closing = True
        self._wake_pending = False
        self._wake()
        if self._thread is not threading.current_thread():
            self._thread.join(10)
        _clients.discard(self)

    # -- IO thread -----------------------------------------------------------------------
    def _io_loop(self) -> None:
        poller = zmq.Poller()
        # notifications first: an engine's death is published by the hub before the
        # scheduler fails its tasks, so a caller woken by EngineDiedError finds the
        # engine already gone from ``engines`` when both arrive in one poll
        handlers = {self.notif: self._on_notification, self.task: self._on_reply,
                    self.mux: self._on_reply, self.iopub: self._on_iopub,
                    self.registrar: self._on_registrar, self.control: self._on_reply}
        for s in handlers:
            poller.register(s, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        try:
            while not self._closing:
                ready = poller.poll(0 if self._outbox else self._poll_ms() if self._deadlines else 500)
                self._wake_pending = False
                try:
                    while os.read(self._wake_r, 4096):
                        pass
                except BlockingIOError:
                    pass
                if self._outbox:
                    self._flush()
                for s, _ in ready:
                    h = handlers.get(s)
                    if h is None:
                        continue
                    if s is self.task and self._held:
                        self._drain_releasing(s, h)
                    else:
                        wire.drain(s, h, 5000)
                if self._held and not self._full():
                    self._release_held()
                if self._replies > TRIM_AFTER and not self._futures and not self._held:
                    self._give_back_memory()
                if self._deadlines:
                    self._expire_due()
                if self._broken is None and time.monotonic() - self._last_beat > HUB_TIMEOUT:
                    self._probe_hub()
                if self.watch is not None and self._broken is None:
                    self._look(self.watch)
                if self._draining:
                    now = time.monotonic()
                    for eid, (deadline, info) in list(self._draining.items()):
                        # a snapshot: user threads add futures while we look
                        if now > deadline or not any(t == eid for _, t in list(self._futures.values())):
                            del self._draining[eid]
                            self._fail_engine_tasks(eid, info)
        except Exception as e:  # noqa: BLE001 - never leave futures hanging on a bug here
            log.exception("client IO thread failed")
            self._break(ClusterLostError(f"zexec client IO thread failed: {e!r}"))
        finally:
            self._break(self._broken or ClusterLostError("the client was closed"), mark=False)
            with self._send_lock:  # user threads send on the *_send sockets under it
                self._closing = True
                self.ctx.destroy(linger=0)
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _give_back_memory(self) -> None:
        """Nothing is pending after many tasks: return the memory they used.

        A dict or set keeps the table of its largest size, and the C heap keeps freed
        pages (message frames are malloc'ed): after a flood drained, the registries are
        rebuilt at their size now (empty, or a task being submitted, which ``submit``
        registers again if it missed the new one) and the heap is trimmed."""
        with self._send_lock:
            self._replies = 0
            self._futures = dict(self._futures)
            self._held = collections.OrderedDict(self._held)
            self._inflight = set(self._inflight)
            self._batched = dict(self._batched)
        malloc_trim()

    def _drain_releasing(self, sock: zmq.Socket, handler) -> None:
        """Read replies in small batches and send held tasks between them: the
        scheduler's queue must not run dry while thousands of replies are read."""
        for _ in range(20):
            n = wire.drain(sock, handler, 250)
            if self._held and not self._full():
                self._release_held()
            if n < 250:
                return

    def _poll_ms(self) -> int:
        """Until the next time limit, at most 500 ms (the loop's usual wait)."""
        return max(0, min(500, int((self._deadlines[0][0] - time.monotonic()) * 1000) + 1))

    # -- time limits and interrupts (IO thread) ------------------------------------------
    def _expire_due(self) -> None:
        now = time.monotonic()
        due = []
        with self._timer_lock:
            heap = self._deadlines
            while heap and heap[0][0] <= now:
                due.append(heapq.heappop(heap))
        for _, _, ref, limit, grace in due:
            fut = ref()
            if fut is not None and not fut.done():
                self._expire(fut, limit, grace)

    def _expire(self, fut: ZFuture, limit: float, grace: float) -> None:
        """A task's time limit passed: it fails with TimeoutError.

        Running, it is interrupted.  Not known to have started, it is first dropped
        where it waits (it never runs); if it started meanwhile (the abort finds it no
        longer queued), it is interrupted then (``_Expiry``).
        """
        msg_id = fut.msg_id
        entry = self._futures.get(msg_id)
        if entry is None:
            return
        exc = TimeoutError(f"task {msg_id} ran past its time limit of {limit:g}s")
        if fut._state == RUNNING:
            _fail(fut, exc)  # its entry stays: the reply (after the interrupt) removes it
            self._interrupt_io(msg_id, "timeout", grace)
            return
        if msg_id in self._abort_waits:
            # a cancel() is asking already: look again once it has its answer
            with self._timer_lock:
                heapq.heappush(self._deadlines, (time.monotonic() + 0.1, next(self._timer_seq),
                                                 weakref.ref(fut), limit, grace))
            return
        self._abort_waits[msg_id] = _Expiry(self, fut, exc, grace)
        target = entry[1]
        msg = self.session.pack("abort_request", {"msg_ids": [msg_id]}, reply_to=self.reply_to)
        with self._send_lock:  # behind its task, on the same socket (see _abort_sync)
            if self._broken is not None or self._closing:
                return
            held = target is None and self._held.pop(msg_id, None) is not None
            if held:
                pass  # never sent: dropped here, below
            elif target is None:
                wire.send_frames(self.task_send, msg)
            elif target in self._engines:
                info = self._engines[target]
                wire.send_frames(self.mux_send, self.session.pack(
                    "abort_request", {"msg_ids": [msg_id]}, reply_to=self.reply_to,
                    idents=[info["uuid"].encode()]))
        if held:
            self._dropped([msg_id])

    def _interrupt_io(self, msg_id: str, reason: str, grace: float) -> None:
        """Ask the engine running ``msg_id`` to interrupt it (control channel).

        A load-balanced task's engine is known once it reports the start: until then
        the interrupt waits here (``_started`` sends it).
        """
        entry = self._futures.get(msg_id)
        if entry is None:
            return  # its reply came: nothing runs any more
        fut, target = entry
        eid = target if target is not None else getattr(fut, "_zengine", None)
        info = self._engines.get(eid) if eid is not None else None
        if info is None:
            self._want_interrupt[msg_id] = (reason, grace)
            return
        self.control.send_multipart(self.session.pack(
            "interrupt_request", {"msg_id": msg_id, "reason": reason, "grace": grace},
            idents=[info["uuid"].encode()]))

    def _interrupted(self, reason: str, parent_id, cause: BaseException) -> BaseException:
        """The error of a task its engine interrupted, chained from what the task raised."""
        if reason == "timeout":
            exc: BaseException = TimeoutError(f"task {parent_id} ran past its time limit")
        else:
            exc = TaskInterrupted(f"task {parent_id} was interrupted")
        exc.__cause__ = cause
        return exc

    def _look(self, watch: Callable[[], BaseException | None]) -> None:
        """Ask ``watch`` (at most every WATCH_INTERVAL) whether the cluster can still
        serve; a reason it cannot breaks the client at once, not HUB_TIMEOUT later."""
        now = time.monotonic()
        if now < self._next_look:
            return
        self._next_look = now + WATCH_INTERVAL
        exc = watch()
        if exc is not None:
            self._break(exc)

    def _probe_hub(self) -> None:
        """No hub_beat for HUB_TIMEOUT: ask the registrar directly before giving up.

        A busy machine can delay beats; a dead hub answers nothing.  The cluster is
        declared lost only when the probe, too, stays unanswered for PROBE_TIMEOUT.
        """
        now = time.monotonic()
        if self._probe is None:
            fut: Future = Future()
            frames = self.session.pack("connection_request", {})
            self._requests[loads(frames[2])["msg_id"]] = fut
            self.registrar.send_multipart(frames)
            self._probe = (fut, now)
            return
        fut, sent = self._probe
        if fut.done():
            self._probe = None
            self._last_beat = now
        elif now - sent > PROBE_TIMEOUT:
            self._break(ClusterLostError(
                f"lost contact with the controller at {self.info.url('registration')}: no word "
                f"from its hub for {HUB_TIMEOUT + PROBE_TIMEOUT:.0f}s"))

    def _flush(self, limit: int = 2000) -> None:
        outbox = self._outbox
        # bounded: a user thread submitting as fast as we send must not starve replies
        while outbox and limit > 0:
            limit -= 1
            kind, target, msg_id, fut, frames = outbox.popleft()
            if kind == "control":
                self.control.send_multipart(frames)
            elif kind == "interrupt":
                self._interrupt_io(msg_id, *target)
            elif kind == "request":
                hdr_id = loads(frames[2])["msg_id"]
                self._requests[hdr_id] = fut
                self.registrar.send_multipart(frames)

    def _on_reply(self, frames: list) -> None:
        try:
            idents, rest = split_idents(frames)
            self.session.verify(rest)
            header = check_header(loads(rest[1]))  # types checked here, once (see protocol)
            # a successful reply says so in its header: its content need not be parsed
            content = ({"status": "ok"} if header.get("status") == "ok" and not header.get("shm")
                       else check_content(header["msg_type"], loads(rest[3])))
        except (ProtocolError, ValueError, UnicodeDecodeError) as e:
            self._bad("reply", str(e))
            return
        if header.get("msg_type") == "status":
            self._started(content.get("msg_id"), content.get("engine"))
            return
        if header.get("msg_type") == "resend_reply":
            for msg_id in content.get("missing", ()):
                self._forget(msg_id, ZexecError("the reply of this task was lost in the MUX device "
                                                "and its engine no longer has it"))
            return
        if header.get("msg_type") == "abort_reply":
            self._dropped(content.get("aborted", ()))
            for msg_id in content.get("not_found", ()):
                w = self._abort_waits.pop(msg_id, None)
                if w is not None:
                    w.decide(msg_id, False)
            return
        if "log" in content and self.forward_output:
            self._log_records(content["log"], header.get("engine"))  # before its future resolves
        if ("stdout" in content or "stderr" in content) and self.forward_output:
            self._write_output(content)  # after its log records, as the engine ran them
        entry = self._futures.pop(header.get("parent_id"), None)
        self._replies += 1
        if self._inflight:
            self._landed(header.get("parent_id"))
        if self._direct_frames:
            self._direct_frames.pop(header.get("parent_id"), None)
            self._lost_tries.pop(header.get("parent_id"), None)
        if self._abort_waits:
            w = self._abort_waits.pop(header.get("parent_id"), None)
            if w is not None:
                w.decide(header.get("parent_id"), False)  # it ran: too late to cancel
        if self._want_interrupt:
            self._want_interrupt.pop(header.get("parent_id"), None)
        if entry is None:
            return  # cancelled, or already failed with its engine
        fut = entry[0]
        status = content.get("status")
        if status == "ok":
            try:
                buffers = rest[4:]
                if content.get("shm"):
                    if self.shm is None:
                        raise ProtocolError("a shared-memory buffer reached a client without one")
                    buffers = self.shm.open(buffers, content["shm"], unlink=True,
                                            trusted=self._shm_out.get(header.get("parent_id")))
                if "batch" in content:
                    self._resolve_batch(fut, content["batch"], buffers, content.get("packed", 0))
                    return
                self._ran(getattr(fut, "_zstat", None), header.get("elapsed"))
                result = serialize.loads(buffers)
            except BaseException as e:  # noqa: BLE001 - a result that fails to unpickle here
                _fail(fut, e)
                return
            # the message's frames go first: freeing a zmq frame releases the GIL, and
            # a caller woken by this result would find it still held here (the future
            # in this frame's locals), after it had dropped its own reference
            del frames, idents, rest, buffers
            resolve(fut, result)
        elif status == "error":
            if content.get("ename") == "EngineDiedError" and isinstance(content.get("engine"), dict):
                exc: BaseException = EngineDiedError.from_info(content["engine"])
            elif content.get("ename") == "NoEnginesError":
                exc = NoEnginesError(str(content.get("evalue", "")))
                if self._held:
                    self._fail_held(exc)  # what waits here would meet no engine either
            else:
                exc = serialize.rebuild_exception(content, rest[4:])
            if content.get("interrupted"):
                exc = self._interrupted(str(content["interrupted"]), header.get("parent_id"), exc)
            _fail(fut, exc)

    def _on_iopub(self, frames: list) -> None:
        try:
            msg = self.session.unpack(frames)
        except ProtocolError as e:
            self._bad("iopub", str(e))
            return
        kind = msg.header["msg_type"]
        c = msg.content
        if kind == "status" and c.get("state") == "started":
            self._started(c.get("msg_id"))
        elif kind == "stream" and self.forward_output:
            name = "stderr" if c.get("name") == "stderr" else "stdout"
            self._write_output({name: str(c.get("text", ""))})
        elif kind == "log" and self.forward_output:
            self._log_records(c["records"], c.get("engine"))

    def _write_output(self, content: dict) -> None:
        """A task's printed output, from its reply: to this process's streams."""
        for name, stream in (("stdout", sys.stdout), ("stderr", sys.stderr)):
            if name in content:
                try:
                    stream.write(content[name])
                    stream.flush()
                except Exception:  # noqa: BLE001 - a closed user stream must not kill the IO thread
                    pass

    def _log_records(self, records: list, engine) -> None:
        """A task's log records, handled by this process's loggers (see zexec.logforward)."""
        try:
            handle_records(records, engine)
        except Exception:  # noqa: BLE001 - a user's filter or handler must not kill the IO thread
            log.exception("a task's forwarded log record failed in this process's logging")

    def _started(self, msg_id, engine=None) -> None:
        """An engine reports the task started: its future turns RUNNING."""
        entry = self._futures.get(msg_id)
        if entry is not None:
            fut = entry[0]
            if engine is not None:
                fut._zengine = engine  # where to send an interrupt
                if self._want_interrupt and msg_id in self._want_interrupt:
                    self._interrupt_io(msg_id, *self._want_interrupt.pop(msg_id))
            with fut._condition:
                # what set_running_or_notify_cancel does, under the same lock, minus
                # its CRITICAL log when the future was cancelled or resolved meanwhile
                if fut._state == PENDING:
                    fut._state = RUNNING
            for item in getattr(fut, "_items", ()):
                with item._condition:
                    if item._state == PENDING:
                        item._state = RUNNING

    def _on_registrar(self, frames: list) -> None:
        try:
            msg = self.session.unpack(frames)
        except ProtocolError as e:
            self._bad("registrar reply", str(e))
            return
        fut = self._requests.pop(msg.parent.get("msg_id"), None)
        if fut is not None and not fut.done():
            fut.set_result(msg.content)

    def _on_notification(self, frames: list) -> None:
        try:
            msg = self.session.unpack(frames)
        except ProtocolError as e:
            self._bad("notification", str(e))
            return
        self._last_beat = time.monotonic()
        self._probe = None
        kind = msg.header["msg_type"]
        c = msg.content
        if kind == "registration":
            self._add_engine(c)
        elif kind == "unregistration":
            self._engine_gone(c)
        elif kind == "hub_beat":
            self._sync_engines(c.get("engines", {}), c.get("pending", ()), c.get("next_id"))
        elif kind == "launcher_gone":
            log.warning("engine set pid %s on %s is gone (%s); %s engine sets left", c.get("pid"),
                        c.get("hostname"), c.get("reason"), c.get("left", -1))
        elif kind == "lost_message":
            self._recover_lost(str(c.get("msg_id")), str(c.get("device")))

    def _recover_lost(self, msg_id: str, device: str) -> None:
        """The MUX device dropped our request or its reply (merged with another peer's
        malformed message): send the request again, or ask the engine for its reply."""
        task_id = self._resend_for.pop(msg_id, None)
        if task_id is not None:
            # our request for a lost reply was lost itself (or the engine's answer to
            # it): ask again, within the same budget of tries
            msg_id, device = task_id, "mux_out"
        entry = self._futures.get(msg_id)
        frames = self._direct_frames.get(msg_id)
        if entry is None or entry[1] not in self._engines:
            return
        tries = self._lost_tries.get(msg_id, 0) + 1
        self._lost_tries[msg_id] = tries
        if tries <= 3 and device == "mux_in" and frames is not None:
            log.warning("request %s lost in the MUX device: sending it again", msg_id)
            wire.send_frames(self.mux, frames)  # never reached the engine: safe to resend
        elif tries <= 3 and device == "mux_out":
            log.warning("reply to %s lost in the MUX device: asking engine %s again", msg_id, entry[1])
            uuid = self._engines[entry[1]]["uuid"].encode()
            header = self.session.header("resend_request", reply_to=self.reply_to)
            self._resend_for[header["msg_id"]] = msg_id
            wire.send_frames(self.mux, self.session.pack(
                "resend_request", {"msg_ids": [msg_id]}, header=header, idents=[uuid]))
        else:
            self._forget(msg_id, ZexecError(f"the request or reply of this task was lost in the "
                                            f"{device} device and could not be recovered"))

    def _forget(self, msg_id: str, exc: BaseException) -> None:
        entry = self._futures.pop(msg_id, None)
        self._direct_frames.pop(msg_id, None)
        self._lost_tries.pop(msg_id, None)
        if entry is not None:
            _fail(entry[0], exc)

    def _sync_engines(self, live: dict, pending=(), next_id=None) -> None:
        """Converge on a hub_beat's snapshot.  It may be older than the connection reply
        this client started from (another socket), so an engine it does not list is
        gone only if the hub knew it then (id below ``next_id``) and not as starting."""
        for info in live.values():
            self._add_engine(info)
        ids = {info["id"] for info in live.values()} | set(pending)
        known = next_id if isinstance(next_id, int) else float("inf")
        for eid in [e for e in self._engines if e not in ids and e < known]:
            self._engine_gone(dict(self._engines[eid], reason="unregistered"))

    def _add_engine(self, info: dict) -> None:
        eid = info["id"]
        if eid in self._engines or eid in self._dead:
            return
        with self._cond:
            self._last_id = max(self._last_id, eid)
            self._engines[eid] = info
            self._cond.notify_all()

    def _engine_gone(self, info: dict) -> None:
        eid = info["id"]
        with self._cond:
            self._engines.pop(eid, None)
            self._dead[eid] = info
            # the oldest go first; a snapshot old enough to list one of them as live
            # cannot still arrive (hub_beats come in order with the deaths)
            while len(self._dead) > DEAD_KEPT:
                self._dead.popitem(last=False)
            self._last_id = max(self._last_id, eid)
            self._cond.notify_all()
        if info.get("exitcode") == 0 and not info.get("fatal"):
            # a clean exit (recycled): its last replies may still be on the way
            self._draining[eid] = (time.monotonic() + 5.0, info)
            return
        self._fail_engine_tasks(eid, info)

    def _fail_engine_tasks(self, eid: int, info: dict) -> None:
        exc = EngineDiedError.from_info(info)
        for msg_id, (fut, target) in list(self._futures.items()):
            if target == eid:
                del self._futures[msg_id]
                self._direct_frames.pop(msg_id, None)
                w = self._abort_waits.pop(msg_id, None)
                if w is not None:
                    w.decide(msg_id, False)
                _fail(fut, exc)
        if info.get("fatal"):
            # like a pool whose worker cannot start: nothing submitted can be trusted to run
            from concurrent.futures.process import BrokenProcessPool

            reason = str(info.get("reason", ""))
            tb = info.get("traceback")
            if reason.startswith("initializer failed"):
                err: BaseException = InitializerError(f"engine {eid} could not start: {reason}")
            else:
                err = BrokenProcessPool(f"engine {eid} could not start: {reason}")
            if isinstance(tb, str) and tb:
                if self._broken is None:
                    # what ProcessPoolExecutor's worker prints, here in the user's process
                    # (the engine's own stderr is its log file); once, not per engine
                    print(f"Exception in initializer:\n{tb.rstrip()}", file=sys.stderr,
                          flush=True)
                err.__cause__ = RemoteTraceback(tb)
            self._break(err)

    def _break(self, exc: BaseException, mark: bool = True) -> None:
        """Fail every pending future with ``exc``; with ``mark``, refuse new work too."""
        if mark and self._broken is None:
            self._broken = exc
            log.error("%s", exc)
        with self._cond:
            self._cond.notify_all()
        futures, self._futures = self._futures, {}
        # a user thread that read the old dict may still add to it: it then sees
        # _broken/_closing under the send lock and fails its own future
        for fut, _ in list(futures.values()):
            _fail(fut, exc)
        self._direct_frames = {}
        self._held = collections.OrderedDict()  # their futures failed above
        self._inflight = set()
        self._batched = {}
        self._batched_n = 0
        self._make_room()
        waits, self._abort_waits = self._abort_waits, {}
        for msg_id, w in waits.items():
            w.decide(msg_id, False)
        while self._outbox:
            item = self._outbox.popleft()
            if item[0] == "request":
                _fail(item[3], exc)
        requests, self._requests = self._requests, {}
        for fut in requests.values():
            _fail(fut, exc)


class _Expiry:
    """An abort sent because a task's time limit passed (see Client._expire).

    Dropped where it waited: the abort_reply handler fails it with ``exc``.  Not found
    there: it started (or finished) meanwhile, so it fails now and is interrupted if it
    still runs.  Shaped like Verdicts (``decide``), as it waits in the same table.
    """

    __slots__ = ("client", "fut", "exc", "grace")

    def __init__(self, client: Client, fut: ZFuture, exc: BaseException, grace: float) -> None:
        self.client, self.fut, self.exc, self.grace = client, fut, exc, grace

    def decide(self, msg_id: str, dropped: bool) -> None:
        if dropped:
            return
        _fail(self.fut, self.exc)
        self.client._interrupt_io(msg_id, "timeout", self.grace)
