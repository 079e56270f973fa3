"""The concurrent.futures contract, run over every kind of zexec executor.

Modelled on CPython's test_concurrent_futures: each test runs against the load-balanced
executor (through the task scheduler, and with ``scheme="pure"`` through the MUX
device), a DirectView and an owned ``ZmqExecutor(max_workers=n)``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import os
import threading
import weakref

import pytest

import tasks
from conftest import wait_until
from zexec import ZmqExecutor
from zexec.errors import RemoteTraceback

KINDS = ["lb", "pure", "direct", "owned"]


@pytest.fixture(scope="module")
def owned():
    ex = ZmqExecutor(max_workers=2)
    yield ex
    ex.shutdown()


@pytest.fixture(params=KINDS)
def executor(request, cluster, owned):
    """A ready executor of each kind; per-test clients so shutdown tests stay isolated."""
    if request.param == "owned":
        yield owned
        return
    ex = ZmqExecutor(connection=cluster.connection_file,
                     scheme="pure" if request.param == "pure" else "leastload")
    yield ex if request.param != "direct" else ex.engine(ex.engines[0])
    ex.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(params=KINDS)
def fresh(request, cluster):
    """An executor of each kind that the test may shut down."""
    if request.param == "owned":
        ex = ZmqExecutor(max_workers=1)
        yield ex
        ex.shutdown()
        return
    ex = ZmqExecutor(connection=cluster.connection_file,
                     scheme="pure" if request.param == "pure" else "leastload")
    yield ex if request.param != "direct" else ex.engine(ex.engines[-1])
    ex.shutdown()


def test_submit(executor):
    assert executor.submit(pow, 2, 8).result(30) == 256


def test_submit_keyword(executor):
    assert executor.submit(tasks.mul, 2, y=8).result(30) == 16
    assert executor.submit(tasks.mul, x=3, y=5).result(30) == 15


def test_submit_lambda_and_closure(executor):
    k = 7
    assert executor.submit(lambda x: x + k, 1).result(30) == 8

    def make_adder(n):
        return lambda x: x + n

    assert [executor.submit(make_adder(i), 1).result(30) for i in range(3)] == [1, 2, 3]


def test_returns_real_futures(executor):
    f = executor.submit(pow, 3, 2)
    assert isinstance(f, cf.Future)
    assert isinstance(executor, cf.Executor)
    assert f.result(30) == 9
    assert f.done() and not f.running() and not f.cancelled()


def test_map(executor):
    assert list(executor.map(pow, range(10), range(10))) == list(map(pow, range(10), range(10)))
    assert list(executor.map(pow, range(40), range(40), chunksize=6)) == [i ** i for i in range(40)]
    assert list(executor.map(pow, [], [])) == []


def test_map_chunksize_invalid(executor):
    with pytest.raises(ValueError):
        executor.map(pow, range(3), range(3), chunksize=0)
    with pytest.raises(ValueError):
        executor.map(pow, range(3), range(3), chunksize=-1)


def test_map_exception(executor):
    it = executor.map(divmod, [1, 1, 1, 1], [2, 2, 0, 2])
    assert next(it) == (0, 1)
    assert next(it) == (0, 1)
    with pytest.raises(ZeroDivisionError):
        next(it)


def test_map_timeout(executor, tmp_path):
    release = str(tmp_path / "release")
    it = executor.map(tasks.wait_for_file, [release, release], timeout=0.5)
    with pytest.raises(cf.TimeoutError):
        list(it)
    open(release, "w").close()


def test_map_is_lazy_in_its_results(executor, tmp_path):
    release = str(tmp_path / "release")
    it = executor.map(tasks.wait_for_file, [release], [30], [5])  # returns at once
    open(release, "w").close()
    assert list(it) == [5]


@pytest.mark.parametrize("chunksize", [1, 2])
def test_map_does_not_keep_yielded_results(executor, chunksize):
    # CPython's test_free_reference: a result is freed the moment the caller drops it,
    # before the iterator is resumed (a local in the generator would keep it until
    # then), with no wait: the IO thread that resolved its future must not hold it
    # either.  It did, now and then (see Client._on_reply), hence many items
    for obj in executor.map(tasks.Box, range(200), chunksize=chunksize):
        ref = weakref.ref(obj)
        del obj
        assert ref() is None


def test_remote_exception_type_message_traceback(executor):
    f = executor.submit(tasks.raise_value_error, "bad value 42")
    with pytest.raises(ValueError, match="bad value 42") as info:
        f.result(30)
    cause = info.value.__cause__
    # the class ProcessPoolExecutor uses (CPython's tests check the exact type)
    assert type(cause) is RemoteTraceback is cf.process._RemoteTraceback
    assert "raise_value_error" in str(cause) and "raise_value_error" in cause.tb
    assert isinstance(f.exception(), ValueError)


def test_as_completed_and_wait(executor):
    fs = [executor.submit(tasks.mul, i, 2) for i in range(20)]
    assert sorted(f.result() for f in cf.as_completed(fs, timeout=30)) == [i * 2 for i in range(20)]
    done, not_done = cf.wait(fs, timeout=30, return_when=cf.ALL_COMPLETED)
    assert len(done) == 20 and not not_done
    bad = executor.submit(tasks.raise_value_error, "x")
    done, _ = cf.wait([bad], timeout=30, return_when=cf.FIRST_EXCEPTION)
    assert bad in done


def test_asyncio_integration(executor):
    async def main():
        loop = asyncio.get_running_loop()
        a = await asyncio.wrap_future(executor.submit(pow, 2, 5))
        b = await loop.run_in_executor(executor, pow, 3, 3)
        return a, b

    assert asyncio.run(main()) == (32, 27)


def test_cancel_pending_never_runs(executor, tmp_path):
    release, blockers = _block_every_engine(executor, tmp_path)
    ran = str(tmp_path / "ran")
    try:
        victim = executor.submit(tasks.touch, ran)
        assert victim.cancel()
        assert victim.cancelled()
        with pytest.raises(cf.CancelledError):
            victim.result(0)
    except BaseException:
        open(release, "w").close()
        raise
    _assert_never_ran(executor, release, blockers, ran)


def test_cancelled_futures_reach_wait_and_as_completed(executor, tmp_path):
    """A cancelled future is done for ``wait`` and ``as_completed``, whether they were
    already waiting when it was cancelled or are called after."""
    release, blockers = _block_every_engine(executor, tmp_path)
    ran = str(tmp_path / "ran")
    try:
        victims = [executor.submit(tasks.touch, ran) for _ in range(3)]
        seen: list = []
        waiter = threading.Thread(target=lambda: seen.extend(cf.as_completed(victims, timeout=30)))
        waiter.start()
        wait_until(lambda: all(v._waiters for v in victims), 30, what="as_completed to wait")
        assert all(v.cancel() for v in victims)
        waiter.join(30)
        assert not waiter.is_alive() and set(seen) == set(victims)
        done, not_done = cf.wait(victims, timeout=30)
        assert done == set(victims) and not not_done
        assert list(cf.as_completed(victims, timeout=30)) and all(v.cancelled() for v in victims)
    finally:
        open(release, "w").close()
    _assert_never_ran(executor, release, blockers, ran)


def test_running_future_cannot_be_cancelled(executor, tmp_path):
    started, release = str(tmp_path / "started"), str(tmp_path / "release")
    f = executor.submit(tasks.touch_then_wait, started, release, value=3)
    wait_until(f.running, 30, what="future to turn RUNNING")
    assert os.path.exists(started)
    assert not f.cancel()
    open(release, "w").close()
    assert f.result(30) == 3


def test_output_is_written_before_the_result(executor, capsys):
    # a task's output is in this process's sys.stdout when its future resolves, as a
    # pool worker's print is before its result comes back: a program that ends on its
    # last result (CPython's test_interpreter_shutdown) loses none of it
    for i in range(30):
        text = f"hello {i} from an engine"
        assert executor.submit(tasks.printer, text).result(30) == len(text)
        assert text in capsys.readouterr().out


def test_shutdown_then_submit_raises(fresh):
    assert fresh.submit(pow, 2, 2).result(30) == 4
    fresh.shutdown(wait=True)
    with pytest.raises(RuntimeError):
        fresh.submit(pow, 2, 2)
    fresh.shutdown()  # idempotent


def test_shutdown_waits_for_pending(fresh):
    fs = [fresh.submit(tasks.sleep, 0.05) for _ in range(4)]
    fresh.shutdown(wait=True)
    assert all(f.done() and f.result() == 0.05 for f in fs)


def test_shutdown_cancel_futures(fresh, tmp_path):
    release = str(tmp_path / "release")
    started = str(tmp_path / "started")
    first = fresh.submit(tasks.touch_then_wait, started, release)
    wait_until(lambda: os.path.exists(started), 30, what="first task to start")
    wait_until(first.running, 30, what="first task RUNNING")
    # 2 s of work in all: with the first engine blocked, the others cannot drain it
    # before shutdown cancels what still waits (50 no-ops sometimes could)
    rest = [fresh.submit(tasks.sleep_then_touch, 0.01, str(tmp_path / f"ran{i}")) for i in range(200)]
    open(release, "w").close()
    fresh.shutdown(wait=True, cancel_futures=True)
    assert first.result(0) is None
    assert all(f.done() for f in rest)
    assert any(f.cancelled() for f in rest)
    for i, f in enumerate(rest):
        if f.cancelled():
            assert not os.path.exists(tmp_path / f"ran{i}")


@pytest.mark.parametrize("wait", [True, False])
def test_shutdown_from_a_done_callback(fresh, wait):
    """As in ProcessPoolExecutor: shutdown(wait=False) works there, wait=True raises
    RuntimeError (it cannot wait in the thread that resolves futures), and either way
    the shutdown goes on and every future finishes."""
    called = threading.Event()
    seen: list = []

    def cb(_f):
        try:
            fresh.shutdown(wait=wait)
            seen.append(None)
        except BaseException as e:  # noqa: BLE001
            seen.append(e)
        called.set()

    fs = [fresh.submit(tasks.sleep, 0.05) for _ in range(6)]
    fs[0].add_done_callback(cb)
    assert called.wait(30)
    if wait:
        assert isinstance(seen[0], RuntimeError)
    else:
        assert seen == [None]
    done, not_done = cf.wait(fs, timeout=30)
    assert not not_done and all(f.result() == 0.05 for f in fs)
    fresh.shutdown()  # waits for the teardown the callback started
    with pytest.raises(RuntimeError):
        fresh.submit(pow, 2, 2)


def test_context_manager(cluster):
    with ZmqExecutor(connection=cluster.connection_file) as ex:
        f = ex.submit(pow, 2, 3)
    assert f.result(0) == 8
    with pytest.raises(RuntimeError):
        ex.submit(pow, 1, 1)


def test_map_timeout_cancels_the_waited_future(executor, tmp_path):
    release, ran = str(tmp_path / "release"), str(tmp_path / "ran")
    # every engine busy, with more waiting than the scheduler hands out per engine
    n = len(executor.engines) * 20 if isinstance(executor, ZmqExecutor) else 1
    blockers = [executor.submit(tasks.wait_for_file, release) for _ in range(n)]
    try:
        it = executor.map(tasks.touch, [ran], timeout=0.3)
        with pytest.raises(cf.TimeoutError):
            next(it)
    except BaseException:
        open(release, "w").close()
        raise
    _assert_never_ran(executor, release, blockers, ran)


def test_callable_objects_are_pickled_per_submit(executor):
    c = tasks.Counter()
    assert executor.submit(c).result(30) == 1
    assert executor.submit(c).result(30) == 1  # a fresh copy each time, as in a process pool
    c.n = 10
    assert executor.submit(c).result(30) == 11


def _block_every_engine(executor, tmp_path):
    """Tasks that hold every engine (and fill the scheduler's per-engine queues) until
    ``release`` exists, so a task submitted next waits where it can be cancelled."""
    started, release = str(tmp_path / "started"), str(tmp_path / "release")
    if isinstance(executor, ZmqExecutor):
        n = len(executor.engines)
        blockers = [executor.submit(tasks.wait_for_file, release) for _ in range(n * 20)]
    else:
        blockers = [executor.submit(tasks.touch_then_wait, started, release)]
        wait_until(lambda: os.path.exists(started), 30, what="blocker to start")
    return release, blockers


def _assert_never_ran(executor, release, blockers, ran):
    """Release the blockers; once a later task has run, the cancelled one had its chance."""
    open(release, "w").close()
    for b in blockers:
        b.result(30)
    executor.submit(tasks.identity, 1).result(30)
    assert not os.path.exists(ran)


@pytest.mark.timeout(60)
def test_failing_initializer_is_logged_on_concurrent_futures(no_leaks, tmp_path):
    # as a ProcessPoolExecutor's worker, the engine logs "Exception in initializer:" on
    # the 'concurrent.futures' logger at CRITICAL, so a handler the initializer put
    # there (CPython's test: a QueueHandler to the parent) reports the failure
    path = str(tmp_path / "cf.log")
    ex = ZmqExecutor(max_workers=1, initializer=tasks.init_log_to_file_then_fail,
                     initargs=(path,))
    try:
        wait_until(lambda: ex._broken, 30, what="executor to be broken")
        with pytest.raises(cf.BrokenExecutor):
            ex.submit(tasks.mul, 1, 1)
    finally:
        ex.shutdown()
    with open(path) as f:
        text = f.read()
    assert "Exception in initializer:" in text and "ValueError: error in initializer" in text
