"""Process plumbing shared by every zexec process: logging, dying with the parent, and
giving memory back."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading

_FORMAT = "%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s"


def setup_logging(level: int | str = None) -> None:
    """Log to stderr (a cluster process's log file), zexec's loggers at ``level``.

    The level is set on the ``zexec`` logger, not the root: the root keeps the level this
    process has (a forked one inherits the user's program's, else Python's WARNING), so
    the records of a task's own loggers pass or not as in a process pool's worker, and
    the client they are forwarded to applies its own levels (see zexec.logforward).
    """
    level = level or os.environ.get("ZEXEC_LOG_LEVEL", "INFO")
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT))
    root.addHandler(handler)
    logging.getLogger("zexec").setLevel(level)


_malloc_trim = None


def malloc_trim() -> None:
    """glibc's malloc_trim(0): free heap pages go back to the system (elsewhere, nothing).

    Message frames are malloc'ed: after a flood, the heap keeps the pages they used
    until this is called."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


def tail(path: str, lines: int = 20) -> str:
    """The last ``lines`` lines of a log file ("" if it cannot be read), for error messages."""
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def child_signals() -> None:
    """In a forked part: default TERM, CHLD and USR2, and no SIGINT (the parent stops us)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGUSR2, signal.SIG_DFL)  # see watch_parent(checked=True)


def _set_pdeathsig(sig: int) -> None:
    """Linux: have the kernel send ``sig`` when the parent thread exits."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(sig), 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - the polling watchdog below still works
        pass


def watch_parent(parent_pid: int, on_death=None, interval: float = 0.25,
                 checked: bool = False) -> None:
    """Exit when ``parent_pid`` is gone (it exited, or was killed with SIGKILL).

    PR_SET_PDEATHSIG covers the common case at once; a daemon thread polling
    ``getppid`` covers the rest.  The kernel's signal is tied to the parent *thread*
    that started us, so for a process started by the user's program (``checked``),
    which may have done so from a thread that ends long before the program, it is
    SIGUSR2 and only makes us look: we go only if the parent process is gone.  The
    caller must then be the main thread (it installs the handler).
    """
    if parent_pid <= 1:
        return
    if checked:
        def look(signum, frame) -> None:
            if os.getppid() != parent_pid:
                _die(on_death)

        signal.signal(signal.SIGUSR2, look)  # before the prctl: USR2 would kill us
        _set_pdeathsig(signal.SIGUSR2)
    else:
        _set_pdeathsig(signal.SIGTERM)
    if os.getppid() != parent_pid:
        _die(on_death)

    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(interval):
            if os.getppid() != parent_pid:
                _die(on_death)

    threading.Thread(target=loop, name="zexec-parent-watch", daemon=True).start()


def _die(on_death) -> None:
    if on_death is not None:
        try:
            on_death()
        except Exception:  # noqa: BLE001
            pass
    os._exit(3)


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so ``finally`` blocks and context teardown run."""

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def exit_status(exc: BaseException | None) -> int:
    """The status a process ends with after ``exc``, as the interpreter would give it:
    ``sys.exit(n)``'s int (0 for None, 1 for anything else), 1 after an exception,
    0 without one."""
    if isinstance(exc, SystemExit):
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0 if exc is None else 1


def exit_now(code: int, streams) -> None:
    """Flush ``streams`` and leave at once with ``os._exit``: for a forked child that
    must never return into the code it was forked from, nor run its atexit handlers."""
    for stream in streams:
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001 - exiting regardless
            pass
    os._exit(code)
