"""``zexec engine -n K``: starts K engines and keeps them (a small fork server).

The parent imports zexec once, then forks each engine, so a new engine is ready in
milliseconds (replacements and recycled engines included).  It reaps its children at
once (SIGCHLD), tells the hub how each one exited (exit code or signal, for the error
its tasks fail with), replaces it when asked to keep K alive, and kills an engine the
hub declared dead that still runs (e.g. hung or stopped).  When it stops, or its own
parent dies, it stops every engine.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import socket
import sys
import time
from typing import Sequence
import uuid

import zmq

from ._proc import child_signals, setup_logging, watch_parent
from .connection import AUTHKEY_ENV, ConnectionInfo, context, secure
from .engine import INITIALIZER_FAILED, Engine  # imported before forking: every engine starts with it loaded
from .errors import ProtocolError
from .forked import multiprocessing_after_fork
from .protocol import Session

log = logging.getLogger("zexec.engineset")

#: how often the engine set tells the hub it lives (see zexec.controller.hub.LAUNCHER_LOST)
LAUNCHER_BEAT = 1.0
#: engines that die before they are ready this many times in a row stop the replacing
CRASH_LOOP_COUNT = 5
#: with no hub_beat for this long (before the first / after one), the engines stop
HUB_FIRST = 30.0
HUB_LOST = 10.0
#: a live hub answers a new subscriber at once: silent this long, say so (stale file?)
HUB_QUIET = 1.5


class EngineSet:
    def __init__(self, info: ConnectionInfo, n: int, *, replace: bool = False,
                 log_dir: str | None = None, max_tasks: int | None = None,
                 init_file: str | None = None, init: tuple | None = None,
                 preload: Sequence[str] = ()) -> None:
        self.info = info
        self.preload = tuple(preload)
        self.n = n
        self.replace = replace
        self.log_dir = log_dir
        self.max_tasks = max_tasks
        self.init_file = init_file
        self.id = uuid.uuid4().hex
        self.session = Session(info.key_bytes)
        self.children: dict[int, float] = {}
        self.start_failures = 0
        #: pid -> the read end of a pipe on which the engine writes once it is ready
        self.ready_pipes: dict[int, int] = {}
        self.shm = info.shm_store()  # where a killed engine may leave a partial file
        self.next_beat = 0.0
        self.hub_stopped = False
        self.initializer = None
        self.initargs: tuple = ()
        if init is not None:
            # forked from the user's process: inherited as they are, never pickled
            self.initializer, self.initargs = init

    def _load_initializer(self) -> None:
        """Unpickle the initializer and initargs a spawned engine set was given in a
        signed file (see LocalCluster._write_init)."""
        if not self.init_file:
            return
        from . import serialize

        with open(self.init_file, "rb") as f:
            sig, _, payload = f.read().partition(b"\n")
        if not self.session.signer.sign([payload]) == sig:
            raise ProtocolError(f"{self.init_file}: bad signature; refusing to unpickle it")
        self.initializer, self.initargs = serialize.loads([payload])

    def spawn(self) -> int:
        parent = os.getpid()
        log_path = None
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid:
            os.close(ready_w)
            os.set_blocking(ready_r, False)
            self.children[pid] = time.monotonic()
            self.ready_pipes[pid] = ready_r
            return pid
        code = 1
        try:
            os.close(ready_r)
            for fd in self.ready_pipes.values():
                os.close(fd)  # the other engines' pipes: the parent's, not ours
            child_signals()
            signal.set_wakeup_fd(-1)
            # the engine set's multiprocessing finalizers are not this engine's to run
            # when it exits (see _flush_multiprocessing)
            multiprocessing_after_fork()
            if self.log_dir:
                log_path = os.path.join(self.log_dir, f"engine-{os.getpid()}.log")
                fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                os.close(fd)
            setup_logging()
            watch_parent(parent)
            code = Engine(self.info, launcher=self.id, log_path=log_path, max_tasks=self.max_tasks,
                          initializer=self.initializer, initargs=self.initargs,
                          on_ready=lambda: os.write(ready_w, b"r")).run()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:  # noqa: BLE001
            logging.getLogger("zexec.engine").exception("engine failed")
            code = 1
        finally:
            try:
                _flush_multiprocessing()
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
        return 0  # unreachable

    def run(self, parent_pid: int = 0) -> int:
        setup_logging()
        _adopt_authkey()
        if parent_pid:
            watch_parent(parent_pid, on_death=self._kill_all, checked=True)
        preload(self.preload)
        self._load_initializer()
        rfd, wfd = os.pipe()
        os.set_blocking(wfd, False)
        os.set_blocking(rfd, False)
        signal.set_wakeup_fd(wfd)
        stop = {"flag": False}

        def on_stop(signum, frame):
            stop["flag"] = True

        signal.signal(signal.SIGCHLD, lambda *a: None)
        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        for _ in range(self.n):
            self.spawn()
        ctx = context()
        hub = ctx.socket(zmq.DEALER)
        hub.linger = 500
        secure(hub, self.info, server=False)
        hub.connect(self.info.url("registration"))
        notif = ctx.socket(zmq.SUB)
        notif.linger = 0
        notif.subscribe(b"unregistration")
        notif.subscribe(b"hub_beat")
        notif.subscribe(b"shutdown")
        secure(notif, self.info, server=False)
        notif.connect(self.info.url("notification"))
        poller = zmq.Poller()
        poller.register(rfd, zmq.POLLIN)
        poller.register(notif, zmq.POLLIN)
        log.info("engine set %s: %d engines%s", self.id, self.n, " (replacing)" if self.replace else "")
        self.last_beat = time.monotonic()
        self.heard_hub = False
        warned = False
        code = 0
        try:
            while not stop["flag"] and not self.hub_stopped:
                silent = time.monotonic() - self.last_beat
                if silent > (HUB_LOST if self.heard_hub else HUB_FIRST):
                    if self.heard_hub:
                        log.error("no word from the hub for %.0fs: stopping the engines", silent)
                    else:
                        log.error("no controller answered at %s for %.0fs: stopping the engines "
                                  "(is the connection file stale?)", self.info.url("registration"), silent)
                    code = 1  # a launcher (srun, a job script) should see a failure
                    break
                if not self.heard_hub and not warned and silent > HUB_QUIET:
                    warned = True
                    log.warning("no controller answers at %s (is it running, or is the connection "
                                "file stale?); waiting up to %.0fs", self.info.url("registration"), HUB_FIRST)
                ready = dict(poller.poll(1000 if self.heard_hub else 250))
                if rfd in ready:
                    try:
                        while os.read(rfd, 512):
                            pass
                    except BlockingIOError:
                        pass
                self._reap(hub, stop)
                self._beat(hub)
                if notif in ready:
                    while notif.get(zmq.EVENTS) & zmq.POLLIN:
                        self._on_notification(notif.recv_multipart())
                if not self.children and not self.replace:
                    break
        finally:
            self._kill_all()
            self._reap(hub, {"flag": True})
            hub.send_multipart(self.session.pack(
                "launcher_exit", {"launcher": self.id, "reason": f"it exited (status {code})"}))
            ctx.destroy(linger=0)  # stopping: exit reports to a hub going away can wait no more
        return code

    def _reap(self, hub: zmq.Socket, stop: dict) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if not pid:
                return
            born = self.children.pop(pid, None)
            if born is None:
                continue
            started = self._was_ready(pid)
            rc = os.waitstatus_to_exitcode(status)
            if rc != 0 and self.shm is not None and self.shm.remove_partial(pid):
                log.info("removed the shared-memory file engine pid %d was writing", pid)
            log.info("engine pid %d exited with %s", pid, rc)
            hub.send_multipart(self.session.pack(
                "engine_exit", {"launcher": self.id, "pid": pid, "exitcode": rc}))
            if stop["flag"] or self.hub_stopped or not self.replace:
                continue
            if rc == INITIALIZER_FAILED:
                # a failing initializer fails in every engine: the pool is broken
                log.error("an engine's initializer failed: not replacing engines")
                self.replace = False
                continue
            # a crash loop is engines that cannot start (a broken environment, a module
            # that segfaults on import); an engine killed by its task (os._exit, a
            # segfault, the OOM killer: retries of one poison task kill engine after
            # engine) had started, and is replaced however young it was
            self.start_failures = self.start_failures + 1 if not started and rc != 0 else 0
            if self.start_failures >= CRASH_LOOP_COUNT:
                log.error("engines keep dying at start (last exit %s): not replacing them", rc)
                self.replace = False
                continue
            self.spawn()

    def _beat(self, hub: zmq.Socket) -> None:
        """Tell the hub, every LAUNCHER_BEAT, that this engine set lives: when it stops
        hearing it (killed, its host gone), clients learn why no engine comes back."""
        now = time.monotonic()
        if now < self.next_beat:
            return
        self.next_beat = now + LAUNCHER_BEAT
        hub.send_multipart(self.session.pack("launcher_beat", {
            "launcher": self.id, "pid": os.getpid(), "hostname": socket.gethostname()}))

    def _was_ready(self, pid: int) -> bool:
        """Whether the exited engine ``pid`` had said it was ready (registered, initialized)."""
        fd = self.ready_pipes.pop(pid, None)
        if fd is None:
            return False
        try:
            return bool(os.read(fd, 1))
        except BlockingIOError:
            return False  # still open elsewhere (a process the task forked) and empty
        finally:
            os.close(fd)

    def _on_notification(self, frames: list) -> None:
        try:
            msg = self.session.unpack(frames)
        except ProtocolError:
            return
        self.last_beat = time.monotonic()
        self.heard_hub = True
        c = msg.content
        if msg.header["msg_type"] == "shutdown":
            log.info("the controller is shutting down: stopping the engines")
            self.hub_stopped = True
            return
        pid = c.get("pid")
        if (msg.header["msg_type"] == "unregistration" and c.get("launcher") == self.id
                and pid in self.children and c.get("exitcode") != 0):
            # declared dead but still here (hung, stopped): make it so
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _kill_all(self, timeout: float = 3.0) -> None:
        for pid in list(self.children):
            try:
                os.kill(pid, signal.SIGTERM)
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while self.children and time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid:
                self.children.pop(pid, None)
            else:
                time.sleep(0.01)  # polling a reap with a deadline
        for pid in list(self.children):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def preload(names: Sequence[str]) -> list[str]:
    """Import these modules here, before any engine is forked, so every engine (the
    replacements and recycled ones too) starts with them loaded, as a forking pool's
    workers inherit their parent's imports.  A module that fails to import is skipped
    with a log line: the engines import it themselves if a task needs it."""
    loaded = []
    t0 = time.monotonic()
    for name in names:
        try:
            importlib.import_module(name)
            loaded.append(name)
        except (Exception, SystemExit) as e:  # noqa: BLE001 - never fatal
            log.warning("preload: %s failed to import (%s: %s); skipped", name, type(e).__name__, e)
    if names:
        log.info("preloaded %d of %d modules in %.2fs", len(loaded), len(names), time.monotonic() - t0)
    return loaded


def _flush_multiprocessing() -> None:
    """Run multiprocessing's exit finalizers in an engine that leaves, as a pool's
    worker does when it exits (not its joining of live children): a
    ``multiprocessing.Queue`` this engine put on (an inherited one in initargs, say a
    QueueHandler's, which a failing initializer reports through just before the engine
    exits) has its feeder thread write what it still holds, which ``os._exit`` would lose."""
    if "multiprocessing" not in sys.modules:
        return
    try:
        from multiprocessing import util

        util._run_finalizers(0)
        util._run_finalizers()
    except Exception:  # noqa: BLE001 - exiting regardless
        logging.getLogger("zexec.engine").exception("multiprocessing's finalizers failed")


def _adopt_authkey() -> None:
    """Take the client's multiprocessing authkey, as ProcessPoolExecutor's workers have
    it: a Manager proxy (or a Listener) made in the client then works in a task.

    Read once here and taken out of the environment, so the engines inherit it in
    memory only (by fork) and what a task starts does not see it.
    """
    key = os.environ.pop(AUTHKEY_ENV, None)
    if not key:
        return
    try:
        import multiprocessing

        multiprocessing.current_process().authkey = bytes.fromhex(key)
    except ValueError:
        log.warning("ignoring a malformed %s", AUTHKEY_ENV)


def main(info: ConnectionInfo, n: int, parent_pid: int = 0, **kwargs) -> int:
    return EngineSet(info, n, **kwargs).run(parent_pid)
