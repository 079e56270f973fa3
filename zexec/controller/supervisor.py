"""Starts the controller's processes and stops them together.

``zexec controller`` imports once, then forks one process per part (hub, heartbeat,
mux, control, iopub, task): each its own process with its own zmq context, made after
the fork.  The supervisor only waits: if any part dies, or stays stopped (SIGSTOP)
longer than ``STOPPED_LIMIT``, the controller cannot serve, so it stops the rest and
exits non-zero; SIGTERM/SIGINT stop them all cleanly.  Every part also exits when the
supervisor is gone (``watch_parent``).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import threading
import time

from .._proc import child_signals, setup_logging, watch_parent
from ..connection import ConnectionInfo

log = logging.getLogger("zexec.controller")

PARTS = ("hub", "heartbeat", "mux", "control", "iopub", "task")
#: a part stopped (SIGSTOP, SIGTSTP) this long is taken for dead: a stopped task
#: scheduler or device would hold its tasks forever, while the hub, still beating,
#: tells clients all is well
STOPPED_LIMIT = 2.0


def _run_part(name: str, info: ConnectionInfo, hwm: int | None, no_engine_timeout: float) -> None:
    from . import devices, heartbeat, hub, taskscheduler

    if name == "hub":
        hub.main(info)
    elif name == "heartbeat":
        heartbeat.main(info)
    elif name == "task":
        taskscheduler.main(info, hwm, no_engine_timeout)
    else:
        devices.main(info, name)


def _fork_part(name: str, info: ConnectionInfo, hwm: int | None, no_engine_timeout: float) -> int:
    parent = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    code = 0
    try:
        child_signals()
        watch_parent(parent)
        _run_part(name, info, hwm, no_engine_timeout)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0
    except BaseException:  # noqa: BLE001 - logged, then the part exits non-zero
        logging.getLogger(f"zexec.{name}").exception("%s failed", name)
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return 0  # unreachable


def run(info: ConnectionInfo, hwm: int | None = None, parent_pid: int = 0,
        ready_message: str | None = None, no_engine_timeout: float = 30.0,
        cleanup: tuple = ()) -> int:
    """Run the controller until a signal or a part's death; returns the exit code.

    ``cleanup`` names directories (a LocalCluster's key and buffers) to remove when
    the parent dies without stopping us: nobody else is left to do it.
    """
    setup_logging()
    children: dict = {}

    cleaning = threading.RLock()  # the USR2 handler may run in the main thread inside it

    def orphaned() -> None:
        # the parent-death signal (main thread) and the parent watch (its own thread)
        # can both get here: one at a time, or the watch's os._exit could cut the other's
        # rmtree short and leave the key's directory behind
        with cleaning:
            _stop_children(dict(children), timeout=1.0)
            for d in cleanup:
                shutil.rmtree(d, ignore_errors=True)

    if parent_pid:
        watch_parent(parent_pid, on_death=orphaned, checked=True)
    class _Stop(Exception):
        pass

    def on_signal(signum, frame):
        raise _Stop(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # imported once, here: six parts each importing its own after the fork would
    # compete for the cores the engines start on, and the hub (the last ready) sets
    # when the first engine can register
    from . import devices, heartbeat, hub, taskscheduler  # noqa: F401
    for name in PARTS:
        children[_fork_part(name, info, hwm, no_engine_timeout)] = name
    log.info("controller up: %s", ", ".join(f"{n}={p}" for p, n in children.items()))
    if ready_message:
        print(ready_message, flush=True)
    code = 0
    stopped: dict[int, float] = {}  # pid -> when it was seen stopped
    while children:
        try:
            pid, status = _wait_part(stopped)
        except _Stop:
            log.info("stopping on signal")
            break
        except ChildProcessError:
            break
        if not pid:  # a part stopped for STOPPED_LIMIT
            for pid in list(stopped):
                log.error("%s (pid %d) stopped for %.0fs; stopping the controller",
                          children.get(pid), pid, STOPPED_LIMIT)
                _kill(pid)
                children.pop(pid, None)
            code = 1
            break
        if os.WIFSTOPPED(status):
            if pid in children:
                log.warning("%s (pid %d) was stopped by signal %d", children[pid], pid,
                            os.WSTOPSIG(status))
                stopped[pid] = time.monotonic()
            continue
        if os.WIFCONTINUED(status):
            stopped.pop(pid, None)
            continue
        name = children.pop(pid, None)
        if name is None:
            continue
        rc = os.waitstatus_to_exitcode(status)
        if name == "hub" and rc == 0:
            log.info("hub stopped on request; stopping the controller")
        else:
            log.error("%s (pid %d) exited with %s; stopping the controller", name, pid, rc)
            code = 1
        break
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _stop_children(children)
    if parent_pid and os.getppid() != parent_pid:
        orphaned()  # stopped by the kernel's parent-death signal: clean up for the parent
    return code


def _wait_part(stopped: dict) -> tuple[int, int]:
    """The next change of a part: exited, stopped or continued; (0, 0) once a part has
    stayed stopped for STOPPED_LIMIT."""
    flags = os.WUNTRACED | os.WCONTINUED
    if not stopped:
        return os.waitpid(-1, flags)
    while True:
        # a stopped part reports nothing more until it is continued or killed, so
        # the limit is kept by looking again at short intervals
        pid, status = os.waitpid(-1, flags | os.WNOHANG)
        if pid:
            return pid, status
        if time.monotonic() - min(stopped.values()) > STOPPED_LIMIT:
            return 0, 0
        time.sleep(0.05)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def _stop_children(children: dict, timeout: float = 3.0) -> None:
    for pid in children:
        try:
            os.kill(pid, signal.SIGTERM)
            os.kill(pid, signal.SIGCONT)  # a stopped part would only act on it when continued
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while children and time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid:
            children.pop(pid, None)
        else:
            time.sleep(0.01)  # polling a reap with a deadline, not synchronising on state
    for pid in children:
        _kill(pid)
