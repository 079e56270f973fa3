"""Starts the controller's processes and stops them together.

``zexec controller`` imports once, then forks one process per part (hub, heartbeat,
mux, control, iopub, task): each its own process with its own zmq context, made after
the fork.  The supervisor only waits: if any part dies, the controller cannot serve,
so it stops the rest and exits non-zero; SIGTERM/SIGINT stop them all cleanly.  Every
part also exits when the supervisor is gone (``watch_parent``).
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


def _run_part(name: str, info: ConnectionInfo, hwm: int | None, no_engine_timeout: float) -> None:
    if name == "hub":
        from .hub import main
        main(info)
    elif name == "heartbeat":
        from .heartbeat import main
        main(info)
    elif name == "task":
        from .taskscheduler import main
        main(info, hwm, no_engine_timeout)
    else:
        from .devices import main
        main(info, name)


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

    cleaning = threading.Lock()

    def orphaned() -> None:
        # the parent-death signal (main thread) and the parent watch (its own thread)
        # can both get here: one at a time, or the watch's os._exit could cut the other's
        # rmtree short and leave the key's directory behind
        with cleaning:
            _stop_children(dict(children), timeout=1.0)
            for d in cleanup:
                shutil.rmtree(d, ignore_errors=True)

    if parent_pid:
        watch_parent(parent_pid, on_death=orphaned)
    class _Stop(Exception):
        pass

    def on_signal(signum, frame):
        raise _Stop(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    for name in PARTS:
        children[_fork_part(name, info, hwm, no_engine_timeout)] = name
    log.info("controller up: %s", ", ".join(f"{n}={p}" for p, n in children.items()))
    if ready_message:
        print(ready_message, flush=True)
    code = 0
    while children:
        try:
            pid, status = os.waitpid(-1, 0)
        except _Stop:
            log.info("stopping on signal")
            break
        except ChildProcessError:
            break
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


def _stop_children(children: dict, timeout: float = 3.0) -> None:
    for pid in children:
        try:
            os.kill(pid, signal.SIGTERM)
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
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
