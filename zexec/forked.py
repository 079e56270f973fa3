"""A cluster process forked from the user's process, as multiprocessing's fork method does.

``LocalCluster(start_method="fork")`` starts its engine set (and controller) this way
instead of as a fresh ``python -m zexec ...``: the child starts at once with everything
the program has imported, ``__main__`` as it is, and runs the same command
(``zexec.commands.main(argv)``) the spawned process would.

What the child does before it runs, because it is a copy of a process it must not disturb:

- ``setsid``: its own session and process group, as ``start_new_session=True`` gives;
- stdin from /dev/null, stdout and stderr to its log file, with new ``sys`` streams on
  them (the parent's stream objects may be pytest's or a notebook's);
- the parent's Python signal handlers and wakeup fd dropped, its signal mask cleared,
  SIGCHLD back to its default (an ignored one would reap the engines unseen);
- the garbage collector on (a program may run with it off; the controller must not
  grow), and ``gc.freeze()`` first: the objects it inherited are never collected here,
  so no finalizer of the parent's (a zmq socket's, a pool's) runs in the child, and
  the collector does not touch, and so copy, the pages it shares with the parent;
- multiprocessing's own after-fork resets (its children, finalizers and fork-aware
  locks), as a forked ``multiprocessing.Process`` gets them;
- a module another thread was importing right then is forgotten, with its import lock
  (held by a thread the child does not have): the child imports it afresh if it needs it;
- it leaves with ``os._exit``: never back into the parent's code, no atexit handler.

The threads of the parent are gone in the child: the child only uses what it creates
(its own zmq context and sockets; pyzmq ignores the inherited ones outside the process
that made them).  :class:`ForkedProcess` gives the parent the part of
``subprocess.Popen`` that LocalCluster uses: ``pid``, ``returncode``, ``poll``,
``wait``, ``send_signal``, ``terminate``, ``kill``.
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import time
import traceback
import warnings
from typing import Callable

from ._proc import exit_now, exit_status


class ForkedProcess:
    """A child of this process made by :func:`start`, with Popen's interface."""

    def __init__(self, pid: int, args: object = None) -> None:
        self.pid = pid
        self.args = args
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self._wait(os.WNOHANG)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if timeout is None:
            while self.returncode is None:
                self._wait(0)
            return self.returncode
        deadline = time.monotonic() + timeout
        delay = 0.0005
        # polled with a growing delay, as subprocess.Popen.wait(timeout) does
        while self.poll() is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise subprocess.TimeoutExpired(self.args, timeout)
            delay = min(delay * 2, remaining, 0.05)
            time.sleep(delay)
        return self.returncode

    def _wait(self, flags: int) -> None:
        try:
            pid, status = os.waitpid(self.pid, flags)
        except ChildProcessError:
            # reaped by someone else (SIGCHLD ignored, a waitpid(-1) elsewhere): it is
            # gone, its status unknown; subprocess.Popen says 0 then too
            self.returncode = 0
            return
        if pid == self.pid:
            self.returncode = os.waitstatus_to_exitcode(status)

    def send_signal(self, sig: int) -> None:
        # once reaped, its pid may be another process's: signal only a live child
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def __repr__(self) -> str:
        return f"<ForkedProcess pid={self.pid} returncode={self.returncode}>"


def start(run: Callable[[], int | None], log_path: str, args: object = None) -> ForkedProcess:
    """Fork a child that runs ``run()`` detached (see the module's docstring), its output
    appended to ``log_path``, and exits with its return value (1 if it raised)."""
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()  # or the child would write the parent's pending output again
            except Exception:  # noqa: BLE001 - None, closed, or a stream that cannot
                pass
        with warnings.catch_warnings():
            # 3.12+ warns of fork in a process with threads: the child uses none of
            # theirs, nor anything they may hold locked (see the module's docstring)
            warnings.filterwarnings("ignore", category=DeprecationWarning,
                                    message=".*fork.*")
            pid = os.fork()
        if pid == 0:
            _child(run, log_fd)  # never returns
    finally:
        os.close(log_fd)
    return ForkedProcess(pid, args)


def _child(run: Callable[[], int | None], log_fd: int) -> None:
    code = 1
    try:
        os.setsid()
        gc.freeze()
        gc.enable()
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        sys.stdin = sys.__stdin__ = open(0, closefd=False)
        sys.stdout = sys.__stdout__ = open(1, "w", buffering=1, errors="backslashreplace",
                                           closefd=False)
        sys.stderr = sys.__stderr__ = open(2, "w", buffering=1, errors="backslashreplace",
                                           closefd=False)
        _reset_signals()
        _forget_other_threads_imports()
        multiprocessing_after_fork()
        rc = run()
        code = rc if isinstance(rc, int) else 0
    except SystemExit as e:
        code = exit_status(e)
    except BaseException:  # noqa: BLE001 - reported in the log; the parent sees status 1
        try:
            traceback.print_exc()
        except BaseException:  # noqa: BLE001
            pass
    finally:
        exit_now(code, (sys.stdout, sys.stderr))


def _reset_signals() -> None:
    """The signal state of a fresh interpreter: the parent's Python handlers (pytest's
    timeout alarm, an event loop's) would run the parent's code here."""
    signal.set_wakeup_fd(-1)
    for sig in signal.valid_signals():
        try:
            handler = signal.getsignal(sig)
        except (ValueError, OSError):
            continue
        if callable(handler) and handler is not signal.default_int_handler:
            signal.signal(sig, signal.SIG_DFL)
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    # ignored, children would be reaped unseen: the engine set and the controller
    # wait for theirs to learn how each ended
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, ())


def _forget_other_threads_imports() -> None:
    """A module another thread was importing when the parent forked is half-made here,
    and its per-module import lock (CPython re-makes only the global one after a fork)
    is held by a thread the child does not have: importing it again, as a task's
    function may, would wait forever.  The child drops the lock and the half-made
    module, and so imports it afresh.  Locks this thread holds (the cluster started
    from a module's body) are kept: that module stays as it is."""
    try:
        from importlib import _bootstrap
        module_locks, blocking_on = _bootstrap._module_locks, _bootstrap._blocking_on
    except (ImportError, AttributeError):  # another interpreter's importlib
        return
    import _thread

    me = _thread.get_ident()
    for name, ref in list(module_locks.items()):
        lock = ref()
        owner = getattr(lock, "owner", None)
        if owner is None or owner == me:
            continue
        module_locks.pop(name, None)
        spec = getattr(sys.modules.get(name), "__spec__", None)
        if getattr(spec, "_initializing", False):
            del sys.modules[name]
    for tid in list(blocking_on):
        if tid != me:
            blocking_on.pop(tid, None)


def multiprocessing_after_fork() -> None:
    """What multiprocessing's BaseProcess._bootstrap does in a forked child: the
    parent's children are not ours, its finalizers not to run here, and the objects
    registered for it (fork-aware locks, queues' feeder state) are reset.  The engine
    set does it in each engine too (see zexec.engineset)."""
    if "multiprocessing" not in sys.modules:
        return
    from multiprocessing import process, util

    process._children = set()
    util._finalizer_registry.clear()
    util._run_after_forkers()
