"""Futures whose cancel() asks the cluster, and the bookkeeping of those questions.

A PENDING task may already sit in an engine's queue or be about to start, so
``cancel()`` cannot decide locally: it asks where the task waits (the task scheduler,
or the engine behind the task on the same pipe) and returns True only if the task was
dropped.  ``cancel_all`` asks for many futures with one message per destination.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, InvalidStateError
from concurrent.futures._base import CANCELLED, CANCELLED_AND_NOTIFIED, PENDING


class ZFuture(Future):
    """A Future whose ``cancel()`` drops the task wherever it waits, or fails.

    A PENDING task may already have reached an engine that is about to start it, so
    ``cancel()`` asks (the scheduler, or the engine, behind the task on the same pipe)
    and returns True only if the task was dropped: a cancelled task never runs.
    """

    def cancel(self) -> bool:
        return bool(cancel_all([self]))


def cancel_all(futures: list) -> list:
    """Cancel many futures with one round trip per destination; returns those cancelled."""
    by_client: dict = {}
    done = []
    for f in futures:
        if isinstance(f, DeferredFuture):
            if f.cancel():  # not sent yet: here; sent: its task's own cancel
                done.append(f)
            continue
        with f._condition:
            pending = f._state == PENDING
        client = getattr(f, "_zclient", None)
        if pending and client is not None and not client._closing and client._broken is None:
            by_client.setdefault(client, []).append(f)
        elif cancel_dropped(f):
            done.append(f)
    for client, fs in by_client.items():
        verdict = client._abort_sync(fs)
        for f in fs:
            if verdict.get(f.msg_id) and cancel_dropped(f):
                done.append(f)
    return done


class DeferredFuture(ZFuture):
    """The future of a task sent only once the futures among its arguments are done.

    A real Future from the start.  Until its task is sent, ``cancel()`` is local (there
    is nothing anywhere to drop); once sent, it is the task's own future's ``cancel()``,
    and this one follows that future's outcome.  ``msg_id`` is its task's, once sent.
    """

    def __init__(self) -> None:
        super().__init__()
        self.msg_id = None
        self._inner: ZFuture | None = None
        self._send_lock = threading.Lock()

    def cancel(self) -> bool:
        with self._send_lock:
            inner = self._inner
            if inner is None:
                return cancel_dropped(self)
        return inner.cancel()

    def running(self) -> bool:
        inner = self._inner
        return inner is not None and inner.running() and not self.done()

    def follow(self, inner: Future) -> None:
        """Take ``inner``'s outcome when it has one (``inner`` is this task's future)."""
        def copy(f: Future) -> None:
            if f.cancelled():
                cancel_dropped(self)
            elif f.exception() is not None:
                fail(self, f.exception())
            else:
                resolve(self, f.result())

        inner.add_done_callback(copy)


def cancel_dropped(fut: Future) -> bool:
    """Cancel a future whose task will never run, and tell ``wait``/``as_completed``.

    ``Future.cancel`` wakes ``result()`` callers and runs callbacks, but the waiters that
    ``wait`` and ``as_completed`` install hear of a cancellation only from
    ``set_running_or_notify_cancel``, which an executor calls when it would have run the
    task (CANCELLED -> CANCELLED_AND_NOTIFIED).  A dropped task never gets there, so
    that step is taken here, at once.
    """
    if not Future.cancel(fut):
        return False
    with fut._condition:
        # only the first canceller notifies: cancel() is True again for a cancelled future
        if fut._state == CANCELLED:
            fut._state = CANCELLED_AND_NOTIFIED
            for waiter in fut._waiters:
                waiter.add_cancelled(fut)
    return True


class Verdicts:
    """Collects abort outcomes (msg_id -> dropped?) until every id is decided."""

    def __init__(self, ids) -> None:
        self.remaining = set(ids)
        self.result: dict[str, bool] = {}
        self.event = threading.Event()
        if not self.remaining:
            self.event.set()

    def decide(self, msg_id: str, ok: bool) -> None:
        if msg_id in self.remaining:
            self.remaining.discard(msg_id)
            self.result[msg_id] = ok
            if not self.remaining:
                self.event.set()


def _settle(fut: Future, set_value, value) -> None:
    # the IO thread races user threads' cancel(): a future cancelled or resolved
    # meanwhile keeps its first outcome
    if fut.done():
        return
    try:
        set_value(value)
    except InvalidStateError:
        pass


def resolve(fut: Future, result) -> None:
    """Set a result unless the future was cancelled or resolved meanwhile."""
    _settle(fut, fut.set_result, result)


def fail(fut: Future, exc: BaseException) -> None:
    """Set an exception unless the future was cancelled or resolved meanwhile."""
    _settle(fut, fut.set_exception, exc)
