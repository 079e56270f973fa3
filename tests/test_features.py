"""Beyond a process pool: broadcast, time limits, interrupt, futures as arguments, progress.

Each runs on a real cluster (the module's shared one, or a private one when a test kills
or replaces engines).
"""

from __future__ import annotations

import os

import pytest

import tasks
from zexec import ZmqExecutor


@pytest.fixture
def ex(cluster):
    ex = ZmqExecutor(connection=cluster.connection_file)
    yield ex
    ex.shutdown(wait=True, cancel_futures=True)


def test_broadcast_runs_once_on_every_live_engine(ex):
    engines = ex.engines
    futures = ex.broadcast(tasks.getpid)
    assert len(futures) == len(engines) == 3
    pids = [f.result(30) for f in futures]
    # one call per engine, in engine-id order: each engine's own pid
    assert pids == [ex.engine(e).submit(os.getpid).result(30) for e in engines]
    assert len(set(pids)) == 3 and os.getpid() not in pids


def test_broadcast_passes_args_and_kwargs(ex):
    assert [f.result(30) for f in ex.broadcast(tasks.mul, 6, y=7)] == [42, 42, 42]


# -- time limits and interrupts --------------------------------------------------------
import concurrent.futures as cf  # noqa: E402
import threading  # noqa: E402

import feature_tasks as ft  # noqa: E402
from conftest import wait_until  # noqa: E402
from zexec import DependencyError, LocalCluster, TaskInterrupted  # noqa: E402


def _pid_of(path):
    wait_until(lambda: os.path.exists(path), 30, what=f"{path} to be written")
    return int(open(path).read())


def test_options_keep_submit_stdlib_and_share_the_client(ex):
    limited = ex.options(timeout=30, retries=1)
    assert isinstance(limited, cf.Executor) and limited.client is ex.client
    assert limited.submit(tasks.mul, 6, y=7).result(30) == 42
    assert list(limited.map(tasks.mul, [1, 2], [3, 4])) == [3, 8]
    with pytest.raises(ValueError):
        ex.options(timeout=0)
    with pytest.raises(ValueError):
        ex.engine(ex.engines[0]).options(retries=2)  # a direct task is never retried


def test_time_limit_interrupts_a_running_task(ex, tmp_path):
    started, interrupted = str(tmp_path / "started"), str(tmp_path / "interrupted")
    fut = ex.options(timeout=1.0).submit(ft.mark_then_sleep, started, interrupted, 60)
    with pytest.raises(TimeoutError):
        fut.result(30)
    pid = _pid_of(started)
    # KeyboardInterrupt reached the task itself, and its engine lives on and serves
    wait_until(lambda: os.path.exists(interrupted), 10, what="the task to see KeyboardInterrupt")
    assert pid in [f.result(30) for f in ex.broadcast(tasks.getpid)]


def test_a_queued_task_past_its_limit_never_runs(ex, tmp_path):
    release, ran, busy = str(tmp_path / "release"), str(tmp_path / "ran"), tmp_path / "busy"
    busy.mkdir()
    blockers = ex.broadcast(ft.block, str(busy), release)
    wait_until(lambda: len(os.listdir(busy)) == 3, 30, what="every engine to be busy")
    fut = ex.options(timeout=0.5).submit(tasks.touch, ran)
    with pytest.raises(TimeoutError):
        fut.result(30)
    tasks.touch(release)
    assert [b.result(30) for b in blockers] == [None] * 3
    # the engines are free again and ran what came after: the expired task never ran
    assert [f.result(30) for f in [ex.submit(tasks.mul, i) for i in range(6)]] == list(range(6))
    assert not os.path.exists(ran)


def test_interrupt_fails_only_the_running_task(ex, tmp_path):
    started, interrupted = str(tmp_path / "started"), str(tmp_path / "interrupted")
    view = ex.engine(ex.engines[0])
    running = view.submit(ft.mark_then_sleep, started, interrupted, 60)
    queued = view.submit(tasks.mul, 6, 7)  # behind it on the same engine
    _pid_of(started)
    assert ex.interrupt(running)
    with pytest.raises(TaskInterrupted) as info:
        running.result(30)
    assert isinstance(info.value, cf.CancelledError)
    assert isinstance(info.value.__cause__, KeyboardInterrupt)
    assert os.path.exists(interrupted)
    assert queued.result(30) == 42
    assert not ex.interrupt(queued)  # done: nothing to interrupt


def test_interrupt_a_load_balanced_task(ex, tmp_path):
    started, interrupted = str(tmp_path / "started"), str(tmp_path / "interrupted")
    fut = ex.submit(ft.mark_then_sleep, started, interrupted, 60)
    _pid_of(started)
    assert ex.interrupt(fut)
    with pytest.raises(TaskInterrupted):
        fut.result(30)


def test_interrupt_before_start_cancels(ex, tmp_path):
    release = str(tmp_path / "release")
    view = ex.engine(ex.engines[-1])
    blocker = view.submit(tasks.wait_for_file, release, 60)
    queued = view.submit(tasks.mul, 1)
    assert ex.interrupt(queued)
    assert queued.cancelled()
    tasks.touch(release)
    assert blocker.result(30) is None


@pytest.mark.timeout(90)
def test_a_task_that_ignores_its_interrupt_loses_its_engine_only(no_leaks, tmp_path):
    started = str(tmp_path / "started")
    # one engine that holds four load-balanced tasks: the stuck one and three queued
    with LocalCluster(1, hwm=4, heartbeat_period=0.25) as ex:
        first = ex.engines
        stuck = ex.options(timeout=0.5, grace=0.5).submit(ft.stubborn, started, 60)
        queued = [ex.submit(tasks.mul, i, 10) for i in range(3)]
        with pytest.raises(TimeoutError):
            stuck.result(30)
        # the engine gave up on it and exited; its queued tasks went back to the task
        # scheduler, and run on the replacement: none of them failed
        assert [f.result(60) for f in queued] == [0, 10, 20]
        wait_until(lambda: ex.engines and ex.engines != first, 30, what="a replacement engine")
        assert ex.client.engine_info(first[0]).get("exitcode") == 7


# -- futures as arguments --------------------------------------------------------------
def test_a_future_argument_stands_for_its_result(ex):
    a = ex.submit(tasks.mul, 2, 3)
    b = ex.submit(tasks.mul, a, y=a)
    assert b.result(30) == 36
    assert b.msg_id is not None


def test_dependents_wait_without_blocking_or_threads(ex, tmp_path):
    release = str(tmp_path / "release")
    a = ex.submit(tasks.wait_for_file, release, 60, 5)
    threads = threading.active_count()
    dependents = [ex.submit(tasks.mul, a, i) for i in range(20)]  # returns at once
    assert all(isinstance(d, cf.Future) and not d.done() for d in dependents)
    assert threading.active_count() == threads
    tasks.touch(release)
    assert [d.result(30) for d in dependents] == [5 * i for i in range(20)]


def test_a_failed_dependency_fails_the_dependent_naming_it(ex):
    a = ex.submit(tasks.raise_value_error, "boom")
    b = ex.submit(tasks.mul, a, 2)
    c = ex.submit(tasks.mul, b, 2)
    with pytest.raises(DependencyError) as info:
        b.result(30)
    assert info.value.msg_id == a.msg_id and a.msg_id in str(info.value)
    assert isinstance(info.value.__cause__, ValueError)
    with pytest.raises(DependencyError) as info:
        c.result(30)  # a chain fails down the line
    assert isinstance(info.value.__cause__, DependencyError)


def test_a_cancelled_dependency_fails_the_dependent(ex, tmp_path):
    release = str(tmp_path / "release")
    view = ex.engine(ex.engines[0])
    blocker = view.submit(tasks.wait_for_file, release, 60)
    a = view.submit(tasks.mul, 1)
    b = ex.submit(tasks.mul, a, 2)
    assert a.cancel()
    with pytest.raises(DependencyError, match="cancelled"):
        b.result(30)
    tasks.touch(release)
    blocker.result(30)


def test_cancel_a_dependent_before_it_is_sent(ex, tmp_path):
    release, ran = str(tmp_path / "release"), str(tmp_path / "ran")
    a = ex.submit(tasks.wait_for_file, release, 60)
    b = ex.submit(tasks.touch, ran, a)
    assert b.cancel() and b.cancelled()
    tasks.touch(release)
    assert a.result(30) is None
    assert ex.submit(tasks.mul, 1).result(30) == 1
    assert b._inner is None and not os.path.exists(ran)  # never sent


# -- progress --------------------------------------------------------------------------
import io  # noqa: E402

import zexec  # noqa: E402
import zexec.progressbar as zprogress  # noqa: E402


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("bar", ["plain", "tqdm"])
def test_progress_over_futures_yields_them_as_they_complete(ex, monkeypatch, bar):
    if bar == "plain":
        monkeypatch.setattr(zprogress, "_tqdm", None)
    else:
        pytest.importorskip("tqdm")
    futures = [ex.submit(tasks.mul, i, 2) for i in range(5)]
    term = _Terminal()
    seen = list(zexec.progress(futures, file=term))
    assert sorted(seen, key=futures.index) == futures and all(f.done() for f in seen)
    assert "5/5" in term.getvalue()


@pytest.mark.parametrize("bar", ["plain", "tqdm"])
def test_progress_over_map_keeps_order_and_is_silent_off_a_terminal(ex, monkeypatch, bar):
    if bar == "plain":
        monkeypatch.setattr(zprogress, "_tqdm", None)
    else:
        pytest.importorskip("tqdm")
    term, pipe = _Terminal(), io.StringIO()
    assert list(zexec.progress(ex.map(tasks.mul, range(20)), total=20, file=term)) == list(range(20))
    assert "20/20" in term.getvalue()
    assert list(zexec.progress(ex.map(tasks.mul, range(20)), file=pipe)) == list(range(20))
    assert pipe.getvalue() == ""  # not a terminal: no bar at all


def test_a_finished_future_with_a_long_limit_is_not_kept(ex):
    import gc
    import weakref

    fut = ex.options(timeout=3600).submit(tasks.mul, 2)
    assert fut.result(30) == 2
    ref = weakref.ref(fut)
    del fut
    # the client's timer holds it weakly; the executor lets it go once its done-callbacks
    # have run in the IO thread, which may be just after result() returned
    wait_until(lambda: gc.collect() is not None and ref() is None, 10, what="the future to be freed")


@pytest.mark.parametrize("scheme", ["pure", "direct"])
def test_time_limits_on_the_mux_paths(cluster, tmp_path, scheme):
    started, interrupted = str(tmp_path / "started"), str(tmp_path / "interrupted")
    with ZmqExecutor(connection=cluster.connection_file,
                     scheme="pure" if scheme == "pure" else "leastload") as ex:
        target = ex if scheme == "pure" else ex.engine(ex.engines[1])
        limited = target.options(timeout=1.0)
        fut = limited.submit(ft.mark_then_sleep, started, interrupted, 60)
        after = target.submit(tasks.mul, 3, 5)
        with pytest.raises(TimeoutError):
            fut.result(30)
        wait_until(lambda: os.path.exists(interrupted), 10, what="the task to see KeyboardInterrupt")
        assert after.result(30) == 15


def test_a_task_that_catches_its_interrupt_keeps_its_result(ex, tmp_path):
    started = str(tmp_path / "started")
    view = ex.engine(ex.engines[0])
    fut = view.submit(ft.stubborn, started, 1.0)  # ignores KeyboardInterrupt for 1 s
    pid = _pid_of(started)
    assert ex.interrupt(fut, grace=30)
    assert fut.result(30) == "done"
    assert view.submit(os.getpid).result(30) == pid  # within its grace: the engine stays


@pytest.mark.timeout(90)
def test_tasks_queued_behind_a_stuck_direct_task_move_to_another_engine(no_leaks, tmp_path):
    started = str(tmp_path / "started")
    with LocalCluster(1, hwm=4, heartbeat_period=0.25) as ex:
        first = ex.engines
        stuck = ex.engine(first[0]).options(timeout=0.5, grace=0.5).submit(ft.stubborn, started, 60)
        _pid_of(started)
        # the task scheduler sees an idle engine: the first of these leaves it with its
        # payload, which only the engine still holds when it has to give it back
        queued = [ex.submit(tasks.mul, i, 10) for i in range(3)]
        with pytest.raises(TimeoutError):
            stuck.result(30)
        assert [f.result(60) for f in queued] == [0, 10, 20]
        wait_until(lambda: ex.engines and ex.engines != first, 30, what="a replacement engine")
