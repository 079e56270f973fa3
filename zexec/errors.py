"""The exception hierarchy: every error zexec raises to a user, rooted in the stdlib.

A cluster that can no longer serve is a ``concurrent.futures.BrokenExecutor``; a lost
engine is a ``BrokenProcessPool`` as well, so code written for ``ProcessPoolExecutor``
that catches worker deaths keeps catching them.
"""

from __future__ import annotations

from concurrent.futures import BrokenExecutor, CancelledError
from concurrent.futures.process import BrokenProcessPool


class ZexecError(Exception):
    """Base class of zexec's own errors."""


class ProtocolError(ZexecError):
    """A message that is malformed, unsigned, wrongly signed or replayed."""


class RemoteError(ZexecError):
    """A task's exception that could not be rebuilt locally.

    Carries what is always known: the remote type name, message and traceback text.
    """

    def __init__(self, ename: str, evalue: str, traceback: str = "") -> None:
        super().__init__(ename, evalue, traceback)
        self.ename = ename
        self.evalue = evalue
        self.traceback = traceback

    def __str__(self) -> str:
        text = f"{self.ename}: {self.evalue}"
        if self.traceback:
            text += "\n\nRemote traceback:\n" + self.traceback.rstrip()
        return text


try:
    # the very class ProcessPoolExecutor sets as ``__cause__``: code that looks for it
    # (CPython's own tests check its exact type) finds it after a swap
    from concurrent.futures.process import _RemoteTraceback as RemoteTraceback
except ImportError:  # pragma: no cover - a Python without it
    class RemoteTraceback(Exception):  # type: ignore[no-redef]
        """The remote traceback text, set as ``__cause__`` of a re-raised task exception."""

        def __init__(self, tb: str) -> None:
            super().__init__(tb)
            self.tb = tb

        def __str__(self) -> str:
            return self.tb


class EngineDiedError(ZexecError, BrokenProcessPool):
    """The engine that held a task died (crash, kill, hang past the heartbeat limit)."""

    def __init__(self, engine_id: int | None, reason: str = "", exitcode: int | None = None,
                 log: str | None = None) -> None:
        self.engine_id = engine_id
        self.reason = reason
        self.exitcode = exitcode
        self.log = log
        parts = [f"engine {engine_id} died"]
        if reason:
            parts.append(f"({reason})")
        if exitcode is not None:
            if exitcode < 0:
                import signal

                try:
                    name = signal.Signals(-exitcode).name
                except ValueError:
                    name = str(-exitcode)
                parts.append(f"killed by signal {name}")
            else:
                parts.append(f"exit code {exitcode}")
        msg = " ".join(parts)
        if log:
            msg += f"; its log: {log}"
        super().__init__(msg)

    def __reduce__(self):
        return (type(self), (self.engine_id, self.reason, self.exitcode, self.log))

    @classmethod
    def from_info(cls, info: dict) -> "EngineDiedError":
        return cls(info.get("id"), info.get("reason", ""), info.get("exitcode"), info.get("log"))


class EngineSetDiedError(ZexecError, BrokenProcessPool):
    """The process that starts and replaces a cluster's engines died: its engines are
    gone and no new ones can start, so the executor is broken (as a pool whose
    processes were all killed)."""


class NoEnginesError(ZexecError):
    """A load-balanced task waited longer than the cluster allows with no engine to run it."""


class ClusterLostError(ZexecError, BrokenExecutor):
    """The controller (hub) is gone or unreachable: the executor can no longer serve."""


class ClusterStartError(ZexecError):
    """A LocalCluster could not start; the message quotes the failing process's log."""


class InitializerError(ClusterStartError, BrokenProcessPool):
    """The engines' initializer failed: like ProcessPoolExecutor, the pool is broken."""


class TaskInterrupted(ZexecError, CancelledError):
    """The task was interrupted (``ZmqExecutor.interrupt``) while it ran.

    A ``concurrent.futures.CancelledError`` too, so code that treats cancelled work
    alike catches both; the future itself is failed, not cancelled (``cancelled()`` is
    False: the task did start).  ``__cause__`` is what the task raised (usually its
    KeyboardInterrupt, with the remote traceback).
    """


class DependencyError(ZexecError):
    """A future passed as an argument failed or was cancelled, so the task never ran.

    ``msg_id`` names that future's task; ``__cause__`` is its exception (or its
    CancelledError).
    """

    def __init__(self, msg_id: str | None, reason: str = "") -> None:
        self.msg_id = msg_id
        self.reason = reason
        super().__init__(f"a future this task depends on ({msg_id}) {reason}".rstrip())

    def __reduce__(self):
        return (type(self), (self.msg_id, self.reason))
