"""The engine: registers with the hub, then runs tasks in its main thread.

::

    registrar DEALER  <-> hub       registration, goodbye; hears "unregistered"
    task DEALER       <-> task scheduler   apply/abort requests in, replies out
    mux DEALER        <-> MUX device       engine-targeted apply/abort requests in, replies out
    control DEALER    <-> control device   shutdown
    iopub PUB         --> IOPub device     "log" records of a task that logs much (a task's
                                           output, and other tasks' records, go in its reply)
    (a task's start, past 10 ms, is reported as "status" on the socket the task came by)
    heart thread: C proxy, SUB (ping) -> DEALER (pong), answering while a task holds the GIL;
                  its capture feeds a watchdog that exits the engine if the pings stop.

Every socket is read between tasks, and by a watcher thread while a task runs past 10 ms
(the sockets change hands under a lock): incoming requests go to a local FIFO, aborts
remove their task from it (the task never runs), and each task's reply goes back on the
socket its request came from, to the client's receiving socket ("reply_to").  Recent
direct replies are kept a while, to be sent again if the MUX device loses one.  Every
message is verified before anything in it is unpickled; big buffers may arrive through
shared memory (zexec.shm), checked against their signed digest.
"""

from __future__ import annotations

import _thread
import collections
import io
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid as uuid_mod

import zmq

from . import serialize, wire
from ._proc import exit_now, exit_status
from .connection import ConnectionInfo, context, secure
from .errors import ProtocolError
from .logforward import TaskLogs
from .protocol import RateLimitedLog, Session, check_content, check_header, loads, split_idents

log = logging.getLogger("zexec.engine")

FN_CACHE_SIZE = 256
#: the exit code of an engine whose initializer raised (the engine set stops replacing)
INITIALIZER_FAILED = 5
#: the end of a failed initializer's traceback sent to the client
TRACEBACK_MAX = 16 * 1024
#: direct replies kept for resending, and the largest kept
RECENT_REPLIES = 256
RECENT_MAX_BYTES = 1 << 20
#: a task running longer than this has its sockets read by the watcher thread
WATCH_AFTER = 0.01
#: the watcher sleeps until the next task once no task has run for this long
IDLE_AFTER = 0.1
#: the exit code of an engine whose task did not stop within the grace after its interrupt
STUCK_TASK = 7
#: an interrupted task that has not stopped gets SIGINT again this often
SIGINT_REPEAT = 0.2


class _Capture(io.StringIO):
    """sys.stdout/sys.stderr during a task: text kept for the task's stream message."""

    def __init__(self, name: str, original) -> None:
        super().__init__()
        self.name = name
        self.original = original

    def fileno(self) -> int:
        return self.original.fileno()

    def isatty(self) -> bool:
        return False


def _leave_forked_child(exc: BaseException | None) -> None:
    """End a process that a task (or the initializer) forked, where it comes back into
    engine code: by returning, raising or ``sys.exit()``.  It must never go on as the
    engine (its copies of the sockets would send replies and spin on a context whose
    threads did not survive the fork; a lock held at the fork would never be freed).
    It exits at once, as ``multiprocessing``'s forked children do: the exit status of
    ``sys.exit()``, 1 after an exception, else 0; no atexit handler of the engine runs."""
    exit_now(exit_status(exc), (sys.__stdout__, sys.__stderr__))


class Engine:
    def __init__(self, info: ConnectionInfo, *, launcher: str | None = None,
                 log_path: str | None = None, max_tasks: int | None = None,
                 initializer=None, initargs: tuple = (), startup_timeout: float = 60.0,
                 on_ready=None) -> None:
        self.info = info
        #: called once registered and initialized, before the first task: its engine set
        #: then knows a later death is not a failure to start (see EngineSet._reap)
        self.on_ready = on_ready
        self.session = Session(info.key_bytes)
        self.uuid = uuid_mod.uuid4().hex
        self.ident = self.uuid.encode()
        self.launcher = launcher
        self.log_path = log_path
        self.max_tasks = max_tasks
        self.initializer = initializer
        self.initargs = initargs
        self.startup_timeout = startup_timeout
        self.id: int | None = None
        self.queue: collections.deque = collections.deque()
        self.fn_cache: collections.OrderedDict = collections.OrderedDict()
        self.tasks_done = 0
        self.stopping = False
        self.running_since: float | None = None
        self.current: tuple | None = None
        self.watching = False
        self.shm = info.shm_store()
        self.recent: collections.OrderedDict = collections.OrderedDict()
        self._captures = (_Capture("stdout", sys.stdout), _Capture("stderr", sys.stderr))
        self.sock_lock = threading.Lock()
        self._busy = threading.Event()
        # interrupts (see _interrupt_request): the task being interrupted, its reason
        # and when its engine gives up on it; the task now inside user code
        self._interrupt: tuple | None = None
        self._in_task: str | None = None
        self._request: tuple | None = None
        self._next_sigint = 0.0
        self._last_sigint = 0.0
        self._prev_sigint = None
        self.bad = RateLimitedLog(log)
        #: the log records of the running task, for its client (see zexec.logforward)
        self.logs = TaskLogs(self._send_logs)

    # -- start-up ------------------------------------------------------------------------
    def _register(self) -> dict:
        reg = self.ctx.socket(zmq.DEALER)
        secure(reg, self.info, server=False)
        reg.identity = self.ident
        reg.linger = 1000
        reg.connect(self.info.url("registration"))
        self.registrar = reg
        content = {"uuid": self.uuid, "hostname": socket.gethostname(), "pid": os.getpid(),
                   "log": self.log_path, "launcher": self.launcher, "max_tasks": self.max_tasks}
        reg.send_multipart(self.session.pack("registration_request", content))
        if not reg.poll(int(self.startup_timeout * 1000)):
            raise TimeoutError(f"no registration reply from {self.info.url('registration')} "
                               f"within {self.startup_timeout:.0f}s")
        msg = self.session.unpack(reg.recv_multipart())
        if msg.content.get("status") != "ok":
            raise RuntimeError(f"registration refused: {msg.content.get('reason')}")
        return msg.content

    def _connect(self, reply: dict) -> None:
        info = self.info.with_(addresses=reply["addresses"])
        host = None if info.transport == "ipc" else self.info.url("registration").rsplit(":", 1)[0].split("//")[1].strip("[]")
        url = lambda chan: info.url(chan, host)  # noqa: E731
        ctx = self.ctx
        waits = []
        self.task_sock = ctx.socket(zmq.DEALER)
        self.mux = ctx.socket(zmq.DEALER)
        self.control = ctx.socket(zmq.DEALER)
        for s, chan in ((self.task_sock, "task_engine"), (self.mux, "mux_engine"),
                        (self.control, "control_engine")):
            s.identity = self.ident
            secure(s, info, server=False)
            s.linger = 2000
            s.sndhwm = s.rcvhwm = 0
            waits.append(s.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED))
            s.connect(url(chan))
        self.iopub = ctx.socket(zmq.PUB)
        secure(self.iopub, info, server=False)
        self.iopub.linger = 2000
        self.iopub.sndhwm = 100_000
        waits.append(self.iopub.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED))
        self.iopub.connect(url("iopub_engine"))
        heart_ready = threading.Event()
        self._start_heart(url("hb_ping"), url("hb_pong"), heart_ready,
                          float(reply.get("heartbeat_period", 0.5)), int(reply.get("heartbeat_misses", 6)))
        # the devices' ROUTERs drop messages for identities they do not know yet: tell
        # the hub we are reachable only once every connection has completed its handshake
        deadline = time.monotonic() + self.startup_timeout
        for w in waits:
            if not w.poll(max(0, int((deadline - time.monotonic()) * 1000))):
                raise TimeoutError("could not connect to the controller's sockets")
            wire.recv_monitor_event(w)
            w.close(linger=0)
        for s in (self.task_sock, self.mux, self.control, self.iopub):
            s.disable_monitor()
        heart_ready.wait(max(0.0, deadline - time.monotonic()))

    def _start_heart(self, ping_url: str, pong_url: str, ready: threading.Event,
                     period: float, misses: int) -> None:
        ctx = self.ctx
        capture_url = f"inproc://heart-capture-{self.uuid}"
        watch = ctx.socket(zmq.SUB)
        watch.subscribe(b"")
        watch.linger = 0
        watch.bind(capture_url)

        def heart() -> None:
            sub = ctx.socket(zmq.SUB)
            sub.subscribe(b"")
            dealer = ctx.socket(zmq.DEALER)
            dealer.identity = self.ident
            cap = ctx.socket(zmq.PUB)
            for s in (sub, dealer, cap):
                s.linger = 0
            secure(sub, self.info, server=False)
            secure(dealer, self.info, server=False)
            cap.connect(capture_url)
            mon = dealer.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
            sub.connect(ping_url)
            dealer.connect(pong_url)
            if mon.poll(int(self.startup_timeout * 1000)):
                wire.recv_monitor_event(mon)
            mon.close(linger=0)
            dealer.disable_monitor()
            ready.set()
            try:
                zmq.proxy(sub, dealer, cap)  # C loop: no GIL needed to answer a ping
            except zmq.ContextTerminated:
                pass
            finally:
                for s in (sub, dealer, cap):
                    s.close(linger=0)

        def watchdog() -> None:
            # the hub is gone when no ping has come for a while: then exit by ourselves
            limit = max(5.0, 2 * period * misses)
            try:
                while True:
                    if watch.poll(int(limit * 1000)):
                        watch.recv_multipart()
                    else:
                        log.error("no heartbeat from the controller for %.0fs: exiting", limit)
                        os._exit(4)
            except zmq.ContextTerminated:
                watch.close(linger=0)

        threading.Thread(target=heart, name="zexec-heart", daemon=True).start()
        threading.Thread(target=watchdog, name="zexec-heart-watch", daemon=True).start()

    # -- main loop -----------------------------------------------------------------------
    def run(self) -> int:
        self.pid = os.getpid()  # a process a task forks is not this engine (see _leave_forked_child)
        self.ctx = context()
        try:
            reply = self._register()
            self.id = reply["id"]
            self._connect(reply)
            self.registrar.send_multipart(self.session.pack("registration_complete", {"uuid": self.uuid}))
            log.info("engine %d up (uuid %s)", self.id, self.uuid)
            if self.initializer is not None:
                try:
                    self.initializer(*self.initargs)
                    if os.getpid() != self.pid:
                        _leave_forked_child(None)
                except BaseException as e:  # noqa: BLE001 - reported, then the engine exits
                    if os.getpid() != self.pid:
                        _leave_forked_child(e)
                    # the traceback into the user's code travels with the goodbye: the
                    # client prints it, as ProcessPoolExecutor's worker does
                    text = serialize.format_exception(serialize.drop_internal_frames(e))
                    # on the logger and at the level of ProcessPoolExecutor's worker: a
                    # handler the initializer put there (a QueueHandler to the parent)
                    # hears of it; the engine's log has it through the root
                    logging.getLogger("concurrent.futures").critical(
                        "Exception in initializer:\n%s", text.rstrip())
                    self._goodbye(f"initializer failed: {type(e).__name__}: {e}",
                                  INITIALIZER_FAILED, fatal=True,
                                  traceback=text[-TRACEBACK_MAX:])
                    return INITIALIZER_FAILED
            if self.on_ready is not None:
                self.on_ready()
            return self._loop()
        finally:
            for name in ("task_sock", "mux", "control", "iopub", "registrar", "_wake_tx", "_wake_rx"):
                sock = getattr(self, name, None)
                if sock is not None:
                    sock.close(linger=2000)
            self.ctx.term()  # the heart and watchdog threads see ETERM and close theirs

    def _goodbye(self, reason: str, exitcode: int, fatal: bool = False, **extra) -> None:
        self.registrar.send_multipart(self.session.pack(
            "unregistration_notification",
            {"uuid": self.uuid, "reason": reason, "exitcode": exitcode, "fatal": fatal, **extra}))

    def _poll_once(self, poller: zmq.Poller, timeout: int) -> None:
        for s, _ in poller.poll(timeout):
            wire.drain(s, lambda frames, s=s: self._on_message(s, frames), 10_000)

    def _watch_long_tasks(self, poller: zmq.Poller, wake: zmq.Socket) -> None:
        """The watcher thread: ``_watch`` for the engine's life, restarted should it fail.

        Without it, an engine whose heart still beats would read its sockets only
        between tasks: it would look alive and hang its clients behind a long task.
        """
        while not self.stopping:
            try:
                self._watch(poller, wake)
            except zmq.ContextTerminated:
                return
            except Exception:  # noqa: BLE001 - logged; the watcher goes on
                log.exception("engine %s: the watcher thread failed; it goes on", self.id)
                self.watching = False
                time.sleep(WATCH_AFTER)  # never a busy loop, should it fail again at once

    def _watch(self, poller: zmq.Poller, wake: zmq.Socket) -> None:
        """While a task runs longer than WATCH_AFTER, read the sockets on its behalf.

        The main thread is busy in the task, so without this an abort for a task queued
        behind it would wait for it to end.  The sockets change hands under
        ``sock_lock``: the main thread holds it whenever no long task runs, so short
        tasks pay nothing but an uncontended lock.
        """
        busy = self._busy
        last_seen = time.monotonic()
        while not self.stopping:
            t = self.running_since
            now = time.monotonic()
            if t is not None:
                last_seen = now
            elif now - last_seen > IDLE_AFTER:
                # an idle engine costs no wake-ups: block until a task starts.  Cleared
                # before the look at running_since, which the main thread sets before
                # it looks at the event: one of us always sees the other
                busy.clear()
                if self.running_since is None and not self.stopping:
                    busy.wait()
                last_seen = time.monotonic()
                continue
            if t is None or now - t < WATCH_AFTER:
                time.sleep(WATCH_AFTER / 2)  # a cheap periodic look at the main thread
                continue
            with self.sock_lock:
                # set before the check below: the main thread clears running_since and
                # then reads this flag, so one of us always sees the other
                self.watching = True
                if self.running_since == t and self.current is not None:
                    # the task's start is reported only now: a task that ends sooner
                    # goes from PENDING to FINISHED, saving a message per short task
                    # on the task's own path (scheduler or MUX), not IOPub: a PUB drops
                    # what a subscriber that just connected has not yet asked for
                    sock, idents, msg_id = self.current
                    wire.send_frames(sock, self.session.pack(
                        "status", {"state": "started", "msg_id": msg_id, "engine": self.id},
                        idents=idents, parent_id=msg_id))
                while self.running_since == t and not self.stopping:
                    for s, _ in poller.poll(50):
                        if s is wake:
                            wake.recv()  # the task ended: hand the sockets back now
                        else:
                            wire.drain(s, lambda frames, s=s: self._on_message(s, frames), 10_000)
                    if self._interrupt is not None:
                        self._press_interrupt()
                self.watching = False

    def _loop(self) -> int:
        poller = zmq.Poller()
        socks = (self.task_sock, self.mux, self.control, self.registrar)
        for s in socks:
            poller.register(s, zmq.POLLIN)
        queue = self.queue
        self._wake_tx = self.ctx.socket(zmq.PAIR)
        self._wake_tx.linger = 0
        self._wake_tx.bind(f"inproc://engine-wake-{self.uuid}")
        wake_rx = self._wake_rx = self.ctx.socket(zmq.PAIR)
        wake_rx.linger = 0
        wake_rx.connect(f"inproc://engine-wake-{self.uuid}")
        watch_poller = zmq.Poller()
        for s in (*socks, wake_rx):
            watch_poller.register(s, zmq.POLLIN)
        threading.Thread(target=self._watch_long_tasks, args=(watch_poller, wake_rx),
                         name="zexec-engine-watch", daemon=True).start()
        if threading.current_thread() is threading.main_thread():
            self._prev_sigint = signal.signal(signal.SIGINT, self._on_sigint)
        self.logs.install()
        lock = self.sock_lock
        lock.acquire()
        try:
            while not self.stopping:
                self._poll_once(poller, 0 if queue else 1000)
                if not queue or self.stopping:
                    continue
                sock, idents, rest, header = queue.popleft()
                self._run_task(sock, idents, rest, header)
                if sock is not self.task_sock:
                    continue  # max_tasks_per_child counts load-balanced tasks, as the scheduler does
                self.tasks_done += 1
                if self.max_tasks and self.tasks_done >= self.max_tasks:
                    log.info("engine %d recycled after %d tasks", self.id, self.tasks_done)
                    self._goodbye("recycled (max_tasks_per_child)", 0)
                    return 0
            self._goodbye("shut down", 0)
            return 0
        finally:
            self.stopping = True
            self.logs.uninstall()
            self._busy.set()
            lock.release()

    def _on_message(self, sock: zmq.Socket, frames: list) -> None:
        """Handle one message read by the main loop or the watcher thread.

        Whatever a message holds, nothing raises out of here: the watcher thread dies
        on an exception, and then an engine whose heart still beats reads its sockets
        only between tasks (a long task holds up aborts; queues fill up unseen).
        """
        try:
            self._dispatch(sock, frames)
        except Exception as e:  # noqa: BLE001 - a bug or a message we did not foresee
            log.debug("engine %s: failed to handle a message", self.id, exc_info=True)
            self.bad("unhandled message", repr(e))

    def _dispatch(self, sock: zmq.Socket, frames: list) -> None:
        rest, verified = None, False
        try:
            idents, rest = split_idents(frames)
            self.session.verify(rest)
            verified = True
            header = check_header(loads(rest[1]))  # types checked here, once (see protocol)
            kind = header["msg_type"]
            # every content is checked here but a task's (read by _run_task, which fails
            # a malformed one back to its sender) and an interrupt's (read by
            # _interrupt_request): a shutdown_request with a JSON string for content is
            # malformed, and must be dropped, not obeyed
            content = (check_content(kind, loads(rest[3]))
                       if kind not in ("apply_request", "interrupt_request") else None)
        except (ProtocolError, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            self.bad("engine socket", str(e))
            if rest is not None and not verified and sock in (self.task_sock, self.mux):
                self._refuse_corrupt(sock, idents, rest)
            return
        if kind == "apply_request" and sock in (self.task_sock, self.mux):
            self.queue.append((sock, idents, rest, header))
        elif kind == "abort_request":
            self._abort(sock, idents, rest[1], header, set(content["msg_ids"]),
                        give_back=sock is self.task_sock and content.get("give_back") is True)
        elif kind == "resend_request" and sock is self.mux:
            self._resend(idents, rest[1], header, content["msg_ids"])
        elif kind == "interrupt_request" and sock is self.control:
            self._interrupt_request(rest)
        elif kind == "shutdown_request" and sock is self.control:
            log.info("engine %d: shutdown requested", self.id)
            self.stopping = True
        elif kind == "unregistered" and sock is self.registrar:
            log.error("engine %d: the hub declared this engine dead; exiting", self.id)
            os._exit(6)
        else:
            self.bad("unexpected message", str(kind))

    def _refuse_corrupt(self, sock, idents, rest) -> None:
        """Fail a task whose header is authentic but whose payload is not: its sender and
        the task scheduler (which counts it as ours until a reply) must not wait forever."""
        header = self.session.header_only(rest)
        try:
            if header is None or check_header(header).get("msg_type") != "apply_request":
                return  # nothing authentic to answer to
        except ProtocolError:
            return
        err = ProtocolError("the task's payload does not match its signature: it changed on "
                            "the way (or was tampered with); the task did not run")
        content, frames = serialize.exception_frames(err)
        self._reply(sock, idents, rest[1], header, content, frames, None, None)

    def _abort(self, sock, idents, parent, header, ids: set, give_back: bool = False) -> None:
        """Drop queued tasks named in ``ids``; answer which were dropped and which not.

        An abort travels behind its task on the same socket, so a task that is not in
        the queue now has already started (or finished): it is reported not found.
        With ``give_back`` (the task scheduler takes them back to run elsewhere), the
        scheduler may well send one of them here again, the same signed request: the
        replay guard must then let it in once more, or it is dropped as a replay and
        its future waits for ever (the scheduler counts it as ours).
        """
        queue = self.queue
        aborted = []
        for _ in range(len(queue)):  # in place: the main loop holds this deque
            item = queue.popleft()
            if item[3].get("msg_id") in ids:
                aborted.append(item[3]["msg_id"])
                if give_back:
                    self.session.forget(item[2])
            else:
                queue.append(item)
        not_found = sorted(ids.difference(aborted))
        reply_to = header.get("reply_to")
        if isinstance(reply_to, str):
            idents = [reply_to.encode()]
        sock.send_multipart(self.session.pack(
            "abort_reply", {"aborted": aborted, "not_found": not_found, "engine": self.id},
            parent=parent, idents=idents))

    # -- tasks ---------------------------------------------------------------------------
    def _fn(self, key: str, frames: list, refs: dict | None = None):
        if not key:
            return serialize.loads(frames, refs)  # a callable object: fresh for every task
        fn = self.fn_cache.get(key)
        if fn is None:
            fn = serialize.loads(frames)
            self.fn_cache[key] = fn
            if len(self.fn_cache) > FN_CACHE_SIZE:
                self.fn_cache.popitem(last=False)
        return fn

    def _run_task(self, sock, idents, rest, header) -> None:
        msg_id = header["msg_id"]
        reply_to = header.get("reply_to")
        self.current = (sock, [reply_to.encode()] if isinstance(reply_to, str) else idents, msg_id)
        self._request = (sock, idents, rest[1], header)
        out, err = sys.stdout, sys.stderr
        cap_out, cap_err = self._captures
        if cap_out.original is not out or cap_err.original is not err:
            cap_out, cap_err = self._captures = (_Capture("stdout", out), _Capture("stderr", err))
        sys.stdout, sys.stderr = cap_out, cap_err
        logs = self.logs
        started = time.time()
        # hand the sockets to the watcher should this task run long (see _watch_long_tasks)
        self.running_since = time.monotonic()
        if not self._busy.is_set():
            self._busy.set()  # wake the watcher (see _watch_long_tasks)
        self.sock_lock.release()
        try:
            # from here to the handlers below, an interrupt for this task may raise
            # KeyboardInterrupt (see _on_sigint): never in the engine's own code around
            self._in_task = msg_id
            # the client's forward_output=False keeps the records in this engine's log
            logs.active = header.get("forward") is not False
            content = loads(rest[3])
            buffers = rest[4:]
            inputs = None
            if content.get("shm"):
                if self.shm is None:
                    raise ProtocolError("a shared-memory buffer reached an engine without one")
                buffers = self.shm.open(buffers, content["shm"])
                inputs = {r[3]: (r[1], r[2]) for r in content["shm"]}
            refs = None
            if content.get("refs"):
                # the by-value functions the payload refers to (see Client._pack_fn)
                refs = {}
                for key, n in content["refs"]:
                    refs[key] = self._fn(key, buffers[:n])
                    buffers = buffers[n:]
            nfn = content["nfn"]
            fn = self._fn(content["fn"], buffers[:nfn], refs)
            if content.get("batch"):
                # items of one map call, each with its own outcome (see Client.submit)
                packed = content.get("packed") or 0
                if type(packed) is not int or not 0 <= packed <= len(buffers) - nfn:
                    raise ProtocolError("a batch's packed arguments do not match its frames")
                outcomes, frames, packed = serialize.run_batch(
                    fn, content["batch"], buffers[nfn:], refs, self._check_fork, packed)
                reply = {"status": "ok", "batch": outcomes}
                if packed:
                    reply["packed"] = packed  # the results of the "ok" items, as one payload
                if self.shm is not None and len(frames) > 1:
                    refs = self.shm.export(frames, 0, reuse=inputs)
                    if refs:
                        reply["shm"] = refs
            else:
                args = serialize.loads(buffers[nfn:], refs)
                if content.get("chunk"):
                    result = serialize.run_chunk(fn, args)
                else:
                    result = fn(*args[0], **args[1])
                if os.getpid() != self.pid:
                    _leave_forked_child(None)
                del args
                try:
                    frames = serialize.dumps(result)
                    reply = {"status": "ok"}
                    if self.shm is not None and len(frames) > 1:
                        refs = self.shm.export(frames, 0, reuse=inputs)
                        if refs:
                            reply["shm"] = refs
                except BaseException as e:  # noqa: BLE001 - an unpicklable result fails its task only
                    note = f"zexec: the result of type {type(result).__name__} could not be pickled"
                    if hasattr(e, "add_note"):
                        e.add_note(note)
                    reply, frames = serialize.exception_frames(e)
                del result
        except BaseException as e:  # noqa: BLE001 - the task's own exception goes back to its caller
            if os.getpid() != self.pid:
                _leave_forked_child(e)
            self._in_task = None
            reply, frames = serialize.exception_frames(serialize.drop_internal_frames(e))
            del e
        finally:
            self._in_task = None
            logs.active = False
            sys.stdout, sys.stderr = out, err
            self.running_since = None
            if self.watching:
                self._wake_tx.send(b"")
            self.sock_lock.acquire()
        completed = time.time()
        intr = self._interrupt
        if intr is not None and intr[0] == msg_id:
            self._interrupt = None
            if reply.get("status") == "error":
                reply["interrupted"] = intr[1]  # the client says why (TimeoutError, ...)
        if logs.records or logs.flushed:
            if logs.flushed:
                logs.flushed = False
                logs.flush()  # behind the task's earlier records, on IOPub
            else:
                reply["log"] = logs.take()  # handled before the future resolves
        for cap in (cap_out, cap_err):
            if not cap.tell():
                continue
            text = cap.getvalue()
            cap.seek(0)
            cap.truncate()  # the two capture streams are reused task after task
            if text:
                # in the reply: written out before the future resolves (on IOPub it
                # could come after the result, and a program ending on it lost it)
                reply[cap.name] = text
        self._reply(sock, idents, rest[1], header, reply, frames, started, completed)

    def _send_logs(self, records: list) -> None:
        """Publish a task's log records to its client (main thread: it owns IOPub)."""
        header = self._request[3]
        self.iopub.send_multipart(self.session.pack(
            "log", {"records": records, "msg_id": header["msg_id"], "engine": self.id},
            idents=[str(header.get("session", "")).encode()]))

    # -- interrupts (time limits, Client.interrupt) ---------------------------------------
    def _interrupt_request(self, rest) -> None:
        """Interrupt a task: KeyboardInterrupt in it if it runs, dropped if it waits here.

        Read by the watcher while a task runs (the main thread is in the task), so the
        running task is interrupted from this thread: SIGINT to the main thread, where
        ``_on_sigint`` raises only inside that task.  It is sent again every
        SIGINT_REPEAT until the task ends; if it has not ended after ``grace`` seconds,
        the engine gives up on it (``_abandon_stuck_task``).
        """
        try:
            c = loads(rest[3])
            msg_id, reason = str(c["msg_id"]), str(c.get("reason", "interrupt"))
            grace = float(c.get("grace", 5.0))
        except (ValueError, KeyError, TypeError, AttributeError):
            self.bad("malformed interrupt_request")
            return
        if self.current is not None and self.running_since is not None and self.current[2] == msg_id:
            self._interrupt = (msg_id, reason, time.monotonic() + grace)
            self._next_sigint = 0.0  # at the watcher's next look
            return
        queue = self.queue
        for _ in range(len(queue)):  # in place: the main loop holds this deque
            item = queue.popleft()
            if item[3].get("msg_id") != msg_id:
                queue.append(item)
                continue
            sock, idents, req, header = item
            reply, frames = serialize.exception_frames(KeyboardInterrupt("interrupted before it started"))
            reply["interrupted"] = reason
            self._reply(sock, idents, req[1], header, reply, frames, None, None)
        # not here (finished, or never came): nothing to do, its reply went or will go

    def _on_sigint(self, signum, frame) -> None:
        """SIGINT in the main thread: KeyboardInterrupt for the task being interrupted.

        Raised only while that task is inside its own code (``_in_task``) and not in
        ``_run_task`` itself, whose handlers must run: a late signal (the task just
        ended) is ignored.  A SIGINT from elsewhere goes to the handler there was before.
        """
        intr = self._interrupt
        if intr is not None and self._in_task == intr[0] and frame is not None \
                and frame.f_code is not _RUN_TASK_CODE:
            raise KeyboardInterrupt
        if intr is not None or time.monotonic() - self._last_sigint < 2.0:
            return  # ours, too late or too early: never in the engine's own code
        prev = self._prev_sigint
        if callable(prev):
            prev(signum, frame)

    def _press_interrupt(self) -> None:
        """The watcher, while the interrupted task runs: signal it again, or give up."""
        intr = self._interrupt
        if intr is None or self.current is None or intr[0] != self.current[2]:
            return
        now = time.monotonic()
        if now >= intr[2]:
            self._abandon_stuck_task(intr)
        elif now >= self._next_sigint:
            self._next_sigint = now + SIGINT_REPEAT
            self._last_sigint = now
            if hasattr(signal, "pthread_kill"):
                # to the main thread itself: a blocking call there (sleep, a read) ends
                signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
            else:  # pragma: no cover - Windows: the handler runs at the next bytecode
                _thread.interrupt_main(signal.SIGINT)

    def _abandon_stuck_task(self, intr: tuple) -> None:
        """The interrupted task did not stop within its grace: fail it and exit.

        Only that task fails: its reply says so, the load-balanced tasks queued here go
        back to the task scheduler (``_give_back``), and the engine exits (a
        LocalCluster or ``zexec engine --replace`` starts a replacement).  Direct tasks
        queued here cannot move: they fail with EngineDiedError, as on any engine death.
        """
        msg_id, reason, _ = intr
        log.error("engine %d: task %s did not stop after its interrupt: exiting", self.id, msg_id)
        sock, idents, parent, header = self._request
        exc = RuntimeError(f"the task did not stop after its interrupt ({reason}): "
                           f"engine {self.id} gave up on it and exited")
        reply, frames = serialize.exception_frames(exc)
        reply["interrupted"] = reason
        self._reply(sock, idents, parent, header, reply, frames, None, None)
        self._give_back()
        self._goodbye(f"task {msg_id} did not stop after its interrupt ({reason})", STUCK_TASK)
        # os._exit drops what zmq has not sent yet: close with linger first, bounded
        # (the main thread is still in the task and will never touch a socket again)
        threading.Timer(3.0, os._exit, (STUCK_TASK,)).start()
        for name in ("task_sock", "mux", "control", "iopub", "registrar", "_wake_tx", "_wake_rx"):
            s = getattr(self, name, None)
            if s is not None:
                s.close(linger=2000)
        self.ctx.term()
        os._exit(STUCK_TASK)

    def _give_back(self) -> None:
        """Hand the load-balanced tasks queued here (not started) back to the task scheduler.

        Each goes back whole (the request as it came, inside a signed ``give_back``), for
        the scheduler to queue first again: sent last to first, as it puts each back at
        the head of its queue, so their order is kept.  The scheduler then sends this
        engine nothing more, and acknowledges each: we wait for that (bounded), so the
        news of our exit cannot reach it before the tasks do.
        """
        waiting = set()
        for sock, idents, rest, header in reversed(self.queue):
            if sock is self.task_sock:
                self._send_back(idents, rest, header)
                waiting.add(header.get("msg_id"))
        self.queue.clear()
        deadline = time.monotonic() + 2.0
        while waiting and time.monotonic() < deadline:
            if not self.task_sock.poll(50):
                continue
            try:
                idents, rest = split_idents(self.task_sock.recv_multipart())
                self.session.verify(rest)
                header = loads(rest[1])
                if header.get("msg_type") == "give_back_reply":
                    waiting.discard(loads(rest[3]).get("msg_id"))
                elif header.get("msg_type") == "apply_request":
                    self._send_back(idents, rest, header)  # sent before it heard from us
                    waiting.add(header.get("msg_id"))
            except (ProtocolError, ValueError, KeyError, TypeError, AttributeError) as e:
                self.bad("engine socket", str(e))

    def _send_back(self, idents, rest, header) -> None:
        wire.send_frames(self.task_sock, self.session.pack(
            "give_back", {"msg_id": header.get("msg_id"), "nidents": len(idents)},
            buffers=[*idents, *rest]))

    def _check_fork(self, exc: BaseException | None) -> None:
        """After each item of a batch: a process the item forked leaves here."""
        if os.getpid() != self.pid:
            _leave_forked_child(exc)

    def _resend(self, idents, parent, header, ids) -> None:
        """Send again replies the MUX device lost (see Client._recover_lost)."""
        missing = []
        coming = {item[3].get("msg_id") for item in self.queue}
        if self.current is not None and self.running_since is not None:
            coming.add(self.current[2])
        for msg_id in ids:
            frames = self.recent.get(msg_id)
            if frames is None:
                if msg_id not in coming:  # queued or running: its reply is still to come
                    missing.append(msg_id)
            else:
                wire.send_frames(self.mux, frames)
        if missing:
            reply_to = header.get("reply_to")
            if isinstance(reply_to, str):
                idents = [reply_to.encode()]
            wire.send_frames(self.mux, self.session.pack(
                "resend_reply", {"missing": missing}, parent=parent, idents=idents))

    def _reply(self, sock, idents, parent, header, content, frames, started, completed) -> None:
        reply_to = header.get("reply_to")
        if isinstance(reply_to, str):
            idents = [reply_to.encode()]  # the client's receiving socket
        extra = {"parent_id": header.get("msg_id"), "status": content["status"], "engine": self.id}
        if len(content) > 1:
            # the client must read this reply's content (shared memory, a batch's
            # outcomes, log records, output): an "ok" reply without any goes unparsed
            extra["shm"] = True
        if started is not None:
            extra.update(started=started, completed=completed, elapsed=completed - started)
        msg = self.session.pack("apply_reply", content, parent=parent, idents=idents,
                                buffers=frames, **extra)
        wire.send_frames(sock, msg)
        if sock is self.mux and sum(len(f) if isinstance(f, bytes) else memoryview(f).nbytes
                                    for f in frames) < RECENT_MAX_BYTES:
            # kept a while: the MUX device may lose it (see Client._recover_lost)
            self.recent[header.get("msg_id")] = msg
            if len(self.recent) > RECENT_REPLIES:
                self.recent.popitem(last=False)


_RUN_TASK_CODE = Engine._run_task.__code__


def main(info: ConnectionInfo, **kwargs) -> int:
    return Engine(info, **kwargs).run()
