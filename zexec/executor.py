"""``ZmqExecutor`` (load-balanced) and ``DirectView`` (one engine): real Executors.

Both are thin: ``submit`` hands the call to the shared :class:`~zexec.client.Client`,
``map`` chunks like ``ProcessPoolExecutor`` (a chunk is one task) and yields results in
order, lazily, with a deadline; ``shutdown`` follows the stdlib contract.
"""

from __future__ import annotations

import atexit
import itertools
import os
import threading
import time
import weakref
from concurrent.futures import BrokenExecutor, CancelledError, Executor, Future
from typing import Any, Callable, Iterable, Iterator

from .client import INTERRUPT_GRACE, Client
from .errors import ClusterStartError, DependencyError
from .futures import DeferredFuture, ZFuture, cancel_all, fail

#: set by zexec.cluster at import: builds the LocalCluster a ZmqExecutor owns
_cluster_factory: Callable[..., Any] | None = None

#: a map of items not known to be short sends this many one by one, then looks again
#: whether its function's measured run time makes them worth batching
REDECIDE = 256

#: executors not shut down yet: at interpreter exit they finish their work first
_live: "weakref.WeakSet[ZmqExecutor]" = weakref.WeakSet()


@atexit.register
def _python_exit() -> None:
    # like ProcessPoolExecutor: pending work completes before the interpreter exits
    # (registered after zexec.client's hook, so it runs before the clients close)
    for ex in list(_live):
        ex.shutdown(wait=True)


def _next_result(fs: list, end_time: float | None) -> Any:
    """The result of the last future in ``fs``, which leaves ``fs`` only once it has one:
    a timeout or an error leaves it there, to be cancelled with the rest."""
    fut = fs[-1]
    result = fut.result() if end_time is None else fut.result(end_time - time.monotonic())
    fs.pop()
    return result


def _has_future(args: tuple, kwargs: dict) -> bool:
    """Any Future among the arguments (top level only: a cheap check per submit)."""
    for a in args:
        if isinstance(a, Future):
            return True
    if kwargs:
        for a in kwargs.values():
            if isinstance(a, Future):
                return True
    return False


def _dependency_failed(dep: Future) -> BaseException | None:
    """The DependencyError of a task whose argument ``dep`` failed or was cancelled."""
    if dep.cancelled():
        err = DependencyError(getattr(dep, "msg_id", None), "was cancelled")
        err.__cause__ = CancelledError()
        return err
    exc = dep.exception()
    if exc is None:
        return None
    err = DependencyError(getattr(dep, "msg_id", None), f"failed: {type(exc).__name__}: {exc}")
    err.__cause__ = exc
    return err


class _ExecutorBase(Executor):
    _target: int | None = None
    #: the time limit and interrupt grace of this executor's tasks (see ``options``)
    _timeout: float | None = None
    _grace: float = INTERRUPT_GRACE

    def _init_base(self, client: Client, retries: int = 0) -> None:
        self._client = client
        self._retries = retries
        self._shutdown = False
        self._shutdown_lock = threading.Lock()
        self._pending: set[Future] = set()

    @property
    def _broken(self):
        """The reason this executor can no longer serve, or False (as in the stdlib)."""
        return self._client._broken or False

    def _track(self, fut: Future) -> Future:
        if not fut.done():
            self._pending.add(fut)
            fut.add_done_callback(self._pending.discard)
        return fut

    def _send(self, fn: Callable, args: Any, kwargs: dict | None = None, chunk: bool = False,
              timeout: float | None = None, retries: int | None = None,
              grace: float | None = None, batch: list | None = None) -> Future:
        return self._client.submit(fn, args, kwargs, target=self._target,
                                   retries=self._retries if retries is None else retries, chunk=chunk,
                                   timeout=self._timeout if timeout is None else timeout,
                                   grace=self._grace if grace is None else grace, batch=batch)

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> Future:
        if self._target is None:
            self._client.pace()  # a flood waits here for room, holding no lock
        with self._shutdown_lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if _has_future(args, kwargs):
                return self._track(self._submit_after(fn, args, kwargs))
            return self._track(self._send(fn, args, kwargs))

    submit.__doc__ = (Executor.submit.__doc__ or "") + """
        A Future among args or kwargs (top level) stands for its result: the task is
        sent once every such future is done, with their results in their places.  If
        one fails or is cancelled, the task is not sent and its future fails with
        zexec.DependencyError (naming that future's msg_id, chained from its error).
        """

    def _submit_after(self, fn: Callable, args: tuple, kwargs: dict) -> Future:
        """A task that waits for the futures among its arguments, without a thread.

        Each dependency's done-callback counts down; the last one sends the task (from
        the client's IO thread, which resolves zexec futures, or from the thread that
        resolved a foreign future, or from this one if all are done already).  The
        first failed dependency fails it at once.
        """
        outer = DeferredFuture()
        deps = {id(a): a for a in (*args, *kwargs.values()) if isinstance(a, Future)}
        left = [len(deps)]
        lock = threading.Lock()

        def on_done(dep: Future) -> None:
            err = _dependency_failed(dep)
            if err is not None:
                fail(outer, err)
            with lock:
                left[0] -= 1
                last = left[0] == 0
            if last and not outer.done():
                self._send_deferred(outer, fn, args, kwargs)

        for dep in deps.values():
            dep.add_done_callback(on_done)
        return outer

    def _send_deferred(self, outer: DeferredFuture, fn: Callable, args: tuple, kwargs: dict) -> None:
        args = tuple(a.result() if isinstance(a, Future) else a for a in args)
        kwargs = {k: (v.result() if isinstance(v, Future) else v) for k, v in kwargs.items()}
        with outer._send_lock:  # a cancel() before the send wins; after it, it asks the task
            if outer.done():
                return
            try:
                inner = self._send(fn, args, kwargs)
            except BaseException as e:  # noqa: BLE001 - a dead engine, a closed client: this future
                fail(outer, e)
                return
            outer.msg_id = inner.msg_id
            outer._inner = inner
        outer.follow(inner)

    def options(self, *, timeout: float | None = None, retries: int | None = None,
                grace: float | None = None) -> "Executor":
        """An executor on the same connection whose tasks get these defaults.

        ``timeout``: seconds from submit (or, for a task with future arguments, from
        when it is sent) after which the task's future fails with TimeoutError: a task
        still waiting is dropped and never runs; a running one gets KeyboardInterrupt.
        ``grace``: seconds the interrupted task then has to stop before its engine gives
        up on it and exits (default 5).  ``retries``: as the executor's own.  Its
        ``shutdown()`` waits for its own futures and leaves the connection open.
        """
        if timeout is not None and not timeout > 0:
            raise ValueError("timeout must be > 0 seconds")
        if grace is not None and not grace >= 0:
            raise ValueError("grace must be >= 0 seconds")
        if retries and (self._target is not None or getattr(self, "_scheme", None) == "pure"):
            raise ValueError("retries need the task scheduler: a load-balanced executor with "
                             "scheme='leastload'")
        return _Options(self, timeout, retries, grace)

    def interrupt(self, fut: Future, grace: float | None = None) -> bool:
        """Interrupt the task of ``fut`` (a future of this connection).

        Running: KeyboardInterrupt is raised in the task, and its future fails with
        zexec.TaskInterrupted (a concurrent.futures.CancelledError) once it stops; the
        other tasks of its engine are untouched.  Not started: it is cancelled, as by
        ``fut.cancel()``.  Returns False if the future is already done, or if its task
        travels in a batch (a map's item, a flood's submit) and cannot be cancelled:
        it runs inside its batch, and cannot be interrupted alone.  A task that
        does not stop within ``grace`` seconds (default 5) fails anyway and its engine
        exits (a LocalCluster replaces it).
        """
        grace = self._grace if grace is None else grace
        if isinstance(fut, DeferredFuture):
            with fut._send_lock:
                inner = fut._inner
                if inner is None:
                    return fut.cancel()
            fut = inner
        return self._client.interrupt(fut, grace)

    def map(self, fn: Callable, *iterables: Iterable, timeout: float | None = None,
            chunksize: int = 1) -> Iterator:
        """Like ``ProcessPoolExecutor.map``: ordered, lazy results; a chunk is one task."""
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        end_time = None if timeout is None else timeout + time.monotonic()
        if chunksize == 1:
            fs = self._submit_items(fn, zip(*iterables))
        else:
            fs = []
            it = zip(*iterables)
            while chunk := tuple(itertools.islice(it, chunksize)):
                if self._target is None:
                    self._client.pace()
                with self._shutdown_lock:
                    if self._shutdown:
                        raise RuntimeError("cannot schedule new futures after shutdown")
                    fs.append(self._track(self._send(fn, chunk, chunk=True)))

        def result_iterator() -> Iterator:
            try:
                fs.reverse()  # pop from the end: no future is kept once yielded
                while fs:
                    # no local names the result while we are suspended in the yield:
                    # once the caller drops it, it is freed (as the stdlib's map does)
                    if chunksize == 1:
                        yield _next_result(fs, end_time)
                    else:
                        chunk = _next_result(fs, end_time)
                        chunk.reverse()
                        while chunk:
                            yield chunk.pop()
            finally:
                cancel_all(fs)

        return result_iterator()

    def broadcast(self, fn: Callable, /, *args: Any, **kwargs: Any) -> list[Future]:
        """Run ``fn(*args, **kwargs)`` once on every live engine: one future per engine.

        Each call goes through the MUX to its engine (as ipyparallel's
        ``DirectView.apply`` or dask's ``Client.run``): for set-up (imports, a global
        loaded once per engine) or to gather per-engine state.  Engines that join later,
        replacements included, do not run it: use the cluster's ``initializer`` for what
        every engine must have.  The futures come in engine-id order; an engine that dies
        meanwhile fails its own future with EngineDiedError.
        """
        with self._shutdown_lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            client = self._client
            client.check()
            futures = []
            for eid in client.engines:
                try:
                    fut = client.submit(fn, args, kwargs, target=eid,
                                        timeout=self._timeout, grace=self._grace)
                except (ValueError, BrokenExecutor) as e:
                    # the engine left between the listing and the send
                    client.check()
                    fut = Future()
                    fut.set_exception(e)
                futures.append(self._track(fut))
            return futures

    def _submit_items(self, fn: Callable, items: Iterable) -> list:
        """One future per item of a map with chunksize 1."""
        return [self.submit(fn, *args) for args in items]

    def _refuse_wait_in_callback(self) -> None:
        """Done-callbacks run in the client's IO thread, the one thread that resolves
        futures: waiting there would wait forever.  Refused as ProcessPoolExecutor
        refuses it (its callbacks run in the thread that shutdown would join)."""
        if threading.current_thread() is self._client._thread:
            raise RuntimeError("shutdown(wait=True) cannot wait in a done-callback: futures "
                               "are resolved in the thread that runs it (the shutdown goes "
                               "on without waiting)")

    def _shutdown_view(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Shutdown of an executor that owns no connection (a DirectView, options):
        refuse new work and wait for its own futures; the connection stays."""
        with self._shutdown_lock:
            self._shutdown = True
        pending = self._wait_pending(cancel_futures)
        if wait:
            self._refuse_wait_in_callback()
            for fut in pending:
                try:
                    fut.exception()
                except BaseException:  # noqa: BLE001 - cancelled or failed: nothing to wait for
                    pass

    _shutdown_view.__doc__ = Executor.shutdown.__doc__

    def _wait_pending(self, cancel_futures: bool) -> list[Future]:
        pending = list(self._pending)
        if cancel_futures:
            cancel_all(pending)
        return pending


class ZmqExecutor(_ExecutorBase):
    """A ``concurrent.futures.Executor`` on a zexec cluster, load-balanced over its engines.

    ``ZmqExecutor(max_workers=4)`` starts and owns a LocalCluster of 4 engines (a drop-in
    for ``ProcessPoolExecutor``, accepting its arguments); ``ZmqExecutor(connection=path)``
    joins a running cluster through its connection file.  ``retries=k`` resubmits a task
    whose engine died up to k times before failing it with EngineDiedError.

    ``scheme="leastload"`` (the default) balances through the task scheduler, which
    keeps each engine's queue short, so a task waits for the first free engine.
    ``scheme="pure"`` sends each task at once, through the C MUX device, to the engine
    with the fewest of this executor's tasks outstanding: no Python process on the
    path (more tasks per second, shorter round trips), but a task is committed to its
    engine when submitted (uneven tasks balance worse), other clients' load is not
    seen, and there are no retries: a task whose engine dies fails with EngineDiedError.
    """

    def __init__(self, max_workers: int | None = None, mp_context: Any = None,
                 initializer: Callable | None = None, initargs: tuple = (), *,
                 max_tasks_per_child: int | None = None, connection: Any = None,
                 retries: int = 0, scheme: str = "leastload", forward_output: bool = True,
                 timeout: float = 10.0, **cluster_kwargs: Any) -> None:
        if scheme not in ("leastload", "pure"):
            raise ValueError(f"scheme must be 'leastload' or 'pure', not {scheme!r}")
        if scheme == "pure" and retries:
            raise ValueError("retries need the task scheduler: scheme='leastload'")
        self._scheme = scheme
        self._load: dict[int, int] = {}
        self._load_lock = threading.Lock()
        self._cluster = None
        #: the LocalCluster that made this executor (``LocalCluster.executor()``): kept
        #: alive by it, so dropping the cluster's last name does not stop its processes
        #: under a live executor; not stopped by its shutdown (whoever started it does)
        self._made_by = None
        if connection is None:
            if max_workers is not None and max_workers <= 0:
                raise ValueError("max_workers must be greater than 0")
            if initializer is not None and not callable(initializer):
                raise TypeError("initializer must be a callable")
            if max_tasks_per_child is not None:
                if not isinstance(max_tasks_per_child, int):
                    raise TypeError("max_tasks_per_child must be an integer")
                if max_tasks_per_child <= 0:
                    raise ValueError("max_tasks_per_child must be >= 1")
            if _cluster_factory is None:
                raise ClusterStartError("zexec.cluster is not imported")
            n = max_workers or os.cpu_count() or 1
            if mp_context is not None and "start_method" not in cluster_kwargs:
                # a pool's mp_context says how its workers start: fork, or not at all
                # from this process (spawn, forkserver: a fresh interpreter that preloads)
                method = mp_context.get_start_method()
                cluster_kwargs["start_method"] = "fork" if method == "fork" else "spawn"
            self._cluster = _cluster_factory(n, initializer=initializer, initargs=initargs,
                                             max_tasks_per_child=max_tasks_per_child,
                                             **cluster_kwargs)
            self._cluster.start()
            connection = self._cluster.connection_file
            try:
                client = Client(connection, timeout=timeout, forward_output=forward_output)
            except BaseException:
                self._cluster.stop()
                raise
            self._cluster.watch(client)
            try:
                self._cluster.wait_for_engines(client)
            except BrokenExecutor as e:
                # as ProcessPoolExecutor does for a failing initializer: the executor
                # exists, but is broken: submit() raises and nothing waits forever
                client._break(e)
            except BaseException:
                client.close()
                self._cluster.stop()
                raise
        elif max_workers is not None or initializer is not None or max_tasks_per_child or cluster_kwargs:
            raise ValueError("max_workers, initializer, max_tasks_per_child and cluster options "
                             "apply to a cluster this executor starts; with connection= the "
                             "cluster is already running (set them where it is started)")
        elif isinstance(connection, Client):
            client = connection
        else:
            client = Client(connection, timeout=timeout, forward_output=forward_output)
        self._owns_client = not isinstance(connection, Client)
        self._workers_asked = max_workers
        self._stopped = threading.Event()
        _live.add(self)
        self._init_base(client, retries)
        self._views: dict[int, DirectView] = {}

    def _send(self, fn: Callable, args: Any, kwargs: dict | None = None, chunk: bool = False,
              timeout: float | None = None, retries: int | None = None,
              grace: float | None = None, batch: list | None = None) -> Future:
        if self._scheme != "pure":
            return super()._send(fn, args, kwargs, chunk, timeout, retries, grace, batch)
        client, load = self._client, self._load
        while True:
            with self._load_lock:
                live = list(client._engines)
                if not live:
                    client.check()
                    # no engine yet (or all dead): the scheduler's queue waits for one
                    return super()._send(fn, args, kwargs, chunk, timeout, retries, grace)
                target = min(live, key=lambda e: load.get(e, 0))
                load[target] = load.get(target, 0) + 1
            try:
                fut = client.submit(fn, args, kwargs, target=target, chunk=chunk,
                                    timeout=self._timeout if timeout is None else timeout,
                                    grace=self._grace if grace is None else grace)
            except (ValueError, BrokenExecutor):
                self._unload(target)
                client.check()
                continue  # the engine left between the choice and the send: choose again
            except BaseException:
                self._unload(target)
                raise
            fut.add_done_callback(lambda _f, t=target: self._unload(t))
            return fut

    def _submit_items(self, fn: Callable, items: Iterable) -> list:
        """One future per item; short items of one call travel in batches.

        A map over many short items (an optimiser's generation, a sampler's walkers)
        costs its trips more than its work: items of such a function (as measured on
        its earlier runs, see Client.batch_size) go to an engine together and come
        back together, each with its own future, result or exception.  A function
        not measured yet goes item by item, and the choice is made again every
        REDECIDE items: a long map learns from its own first replies.
        """
        if self._scheme == "pure" or self._timeout is not None:
            return super()._submit_items(fn, items)  # a time limit is per task
        items = list(items)
        if any(_has_future(args, {}) for args in items):
            return super()._submit_items(fn, items)
        fs: list = []
        i, n, k = 0, len(items), 1
        while i < n:
            if k <= 1:
                k = self._client.batch_size(fn, n - i)  # the items left shared out, once
            if k <= 1:
                fs += super()._submit_items(fn, items[i:i + REDECIDE])
                i += REDECIDE
                continue
            part = [(ZFuture(), args) for args in items[i:i + k]]
            i += k
            self._client.pace()
            with self._shutdown_lock:
                if self._shutdown:
                    raise RuntimeError("cannot schedule new futures after shutdown")
                self._track(self._send(fn, None, batch=part))
            # the batch is tracked, not its items: they are settled before it is
            # (Client._resolve_batch), and cancelling it cancels them (_batch_done)
            fs += [f for f, _ in part]
        return fs

    def _unload(self, target: int) -> None:
        with self._load_lock:
            n = self._load.get(target, 0) - 1
            if n > 0:
                self._load[target] = n
            else:
                self._load.pop(target, None)

    @property
    def _max_workers(self) -> int | None:
        """The live engine count (what ProcessPoolExecutor's attribute of this name says:
        how many tasks run at once).  dask reads it to size its work, so it follows the
        cluster as engines join and leave; None while there is no engine at all."""
        return len(self._client._engines) or self._workers_asked

    @property
    def cluster(self):
        """The LocalCluster this executor owns or was made by, if any."""
        return self._cluster or self._made_by

    @property
    def client(self) -> Client:
        return self._client

    @property
    def engines(self) -> list[int]:
        """Ids of the live engines."""
        return self._client.engines

    def engine(self, engine_id: int) -> "DirectView":
        """A DirectView: an Executor whose tasks all run on engine ``engine_id``."""
        if engine_id not in self._client.engines and self._client.engine_info(engine_id) is None:
            raise ValueError(f"no engine {engine_id} (engines: {self.engines})")
        view = self._views.get(engine_id)
        if view is None:
            view = self._views[engine_id] = DirectView(self._client, engine_id)
        return view

    def status(self, timeout: float = 10.0) -> dict:
        """The hub's view: engines (tasks done, queued), task queue, tasks by state."""
        return self._client.request("queue_request", timeout=timeout)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._shutdown_lock:
            first = not self._shutdown
            self._shutdown = True
        pending = self._wait_pending(cancel_futures)
        for view in list(self._views.values()):
            pending += view._wait_pending(cancel_futures)
            view._shutdown = True
        if first:
            _live.discard(self)

            def finish() -> None:
                try:
                    for fut in pending:
                        try:
                            fut.exception()
                        except BaseException:  # noqa: BLE001 - cancelled: nothing to wait for
                            pass
                    if self._owns_client:
                        self._client.close()
                    if self._cluster is not None:
                        self._cluster.stop()
                finally:
                    self._stopped.set()

            in_callback = threading.current_thread() is self._client._thread
            if wait and not in_callback:
                finish()
            else:
                threading.Thread(target=finish, name="zexec-shutdown").start()
        if wait:
            self._refuse_wait_in_callback()
            self._stopped.wait()  # a second caller waits for the first one's teardown

    def _abandon(self) -> None:
        """Leave at once (an exception is unwinding): cancel what waits, fail the rest."""
        with self._shutdown_lock:
            self._shutdown = True
        _live.discard(self)
        self._wait_pending(True)
        if self._owns_client:
            self._client.close()  # fails whatever still runs: nothing is left pending
        if self._cluster is not None:
            self._cluster.stop()
        self._stopped.set()

    shutdown.__doc__ = Executor.shutdown.__doc__


class DirectView(_ExecutorBase):
    """An Executor bound to one engine (through the MUX): tasks run there, in order."""

    def __init__(self, client: Client, engine_id: int) -> None:
        self._target = engine_id
        self._init_base(client)

    @property
    def engine_id(self) -> int:
        return self._target

    shutdown = _ExecutorBase._shutdown_view

    def __repr__(self) -> str:
        return f"<DirectView engine={self._target}>"


class _Options(_ExecutorBase):
    """``ex.options(...)``: ``ex``'s tasks with other defaults (time limit, retries).

    It shares ``ex``'s connection (and its engine, for a DirectView); ``ex.shutdown()``
    waits for its futures too and stops it.
    """

    def __init__(self, base: _ExecutorBase, timeout: float | None, retries: int | None,
                 grace: float | None) -> None:
        self._base = base
        self._target = base._target
        self._init_base(base._client, base._retries if retries is None else retries)
        self._timeout = base._timeout if timeout is None else timeout
        self._grace = base._grace if grace is None else grace
        self._scheme = getattr(base, "_scheme", None)

    def _send(self, fn: Callable, args: Any, kwargs: dict | None = None, chunk: bool = False,
              timeout: float | None = None, retries: int | None = None,
              grace: float | None = None) -> Future:
        return self._base._send(fn, args, kwargs, chunk,
                                self._timeout if timeout is None else timeout,
                                self._retries if retries is None else retries,
                                self._grace if grace is None else grace)

    @property
    def client(self) -> Client:
        return self._client

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> Future:
        if self._base._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        return super().submit(fn, *args, **kwargs)

    submit.__doc__ = _ExecutorBase.submit.__doc__

    def _track(self, fut: Future) -> Future:
        self._base._track(fut)  # the executor it came from waits for it on shutdown
        return super()._track(fut)

    shutdown = _ExecutorBase._shutdown_view

    def __repr__(self) -> str:
        return f"<options of {self._base!r}: timeout={self._timeout} retries={self._retries}>"
