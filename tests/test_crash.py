"""The crash matrix and engine failures, on real clusters."""

from __future__ import annotations

import concurrent.futures as cf
import os
import pickle
import signal
import subprocess
import sys
import time

import psutil
import pytest

import tasks
from conftest import wait_until
from zexec import EngineDiedError, LocalCluster, RemoteError, ZmqExecutor


def test_unpicklable_argument_fails_that_future_only(cluster):
    ex = cluster.ex
    f = ex.submit(tasks.identity, tasks.Unpicklable())
    with pytest.raises(TypeError, match="cannot be pickled"):
        f.result(30)
    assert ex.submit(tasks.mul, 3, 3).result(30) == 9


def test_unpicklable_result(cluster):
    ex = cluster.ex
    with pytest.raises(TypeError, match="cannot be pickled"):
        ex.submit(tasks.return_unpicklable).result(30)
    assert ex.submit(tasks.mul, 2, 3).result(30) == 6


def test_unpicklable_exception_becomes_remote_error(cluster):
    with pytest.raises(RemoteError, match="UnpicklableError") as info:
        cluster.ex.submit(tasks.raise_unpicklable_error).result(30)
    assert "raise_unpicklable_error" in info.value.traceback
    assert info.value.ename == "UnpicklableError"


def test_exception_failing_to_unpickle_on_client(cluster):
    with pytest.raises(RemoteError, match="FailsToUnpickleError") as info:
        cluster.ex.submit(tasks.raise_fails_to_unpickle).result(30)
    assert "raise_fails_to_unpickle" in info.value.traceback
    assert cluster.ex.submit(tasks.mul, 1, 5).result(30) == 5


@pytest.mark.parametrize("kind", ["lb", "direct"])
def test_os_exit_in_task_fails_with_engine_died(cluster, kind):
    ex = cluster.ex
    target = ex.engine(ex.engines[0]) if kind == "direct" else ex
    t0 = time.monotonic()
    f = target.submit(tasks.hard_exit, 7)
    with pytest.raises(EngineDiedError) as info:
        f.result(30)
    elapsed = time.monotonic() - t0
    err = info.value
    assert err.exitcode == 7, str(err)
    assert err.log and "engine-" in err.log
    assert f"engine {err.engine_id} died" in str(err)
    assert elapsed < 5, elapsed
    # the cluster keeps serving, and LocalCluster replaces the engine (new id)
    assert ex.submit(tasks.mul, 2, 2).result(30) == 4
    wait_until(lambda: err.engine_id not in ex.engines and len(ex.engines) == cluster.n, 30,
               what="the dead engine gone and a replacement in")
    if kind == "direct":
        with pytest.raises(EngineDiedError):
            ex.engine(err.engine_id).submit(tasks.mul, 1, 1)


def test_an_engine_dying_in_a_batched_flood_fails_its_batches_tasks_only(cluster, monkeypatch):
    # submits of a short function travel in batches (see Client._coalesce): an item
    # that kills its engine fails with the tasks of the batches that engine held,
    # every other task gets its result, and none hangs
    from zexec import client as client_mod

    monkeypatch.setattr(client_mod, "COALESCE_AT", 0, raising=False)
    ex = cluster.ex
    ex.client._runtimes[client_mod._stat_key(tasks.exit_at)] = 1e-5
    fs = [ex.submit(tasks.exit_at, i, 1500) for i in range(3000)]
    died = []
    for i, f in enumerate(fs):
        try:
            assert f.result(60) == i
        except EngineDiedError as e:
            died.append((i, e))
    assert 1500 in [i for i, _ in died]
    assert {e.engine_id for _, e in died} == {died[0][1].engine_id}
    # whole batches fail together; a task the engine held alone fails alone (the last
    # held task of a flood may leave alone: nothing of its function is left to join it)
    dead = {i for i, _ in died}
    batches = {id(fs[i]._zbatch) for i in dead if getattr(fs[i], "_zbatch", None) is not None}
    assert batches
    assert all(i in dead for i, f in enumerate(fs) if id(getattr(f, "_zbatch", None)) in batches)
    assert len(died) < 3000 // 2
    wait_until(lambda: len(ex.engines) == cluster.n, 30, what="a replacement engine")


def test_pure_scheme_engine_death_fails_exactly_its_tasks(cluster):
    ex = ZmqExecutor(connection=cluster.connection_file, scheme="pure")
    try:
        wait_until(lambda: len(ex.engines) == cluster.n, 30, what="all engines")
        doomed = ex.submit(tasks.hard_exit, 7)
        others = [ex.submit(tasks.mul, i, 2) for i in range(3 * cluster.n)]
        with pytest.raises(EngineDiedError) as info:
            doomed.result(30)
        dead = info.value.engine_id
        ok = 0
        for i, f in enumerate(others):
            try:
                assert f.result(30) == 2 * i
                ok += 1
            except EngineDiedError as e:
                assert e.engine_id == dead  # queued behind the exit on the same engine
        assert ok >= 2 * cluster.n
        # later tasks go to the live engines only
        assert ex.submit(tasks.mul, 3, 3).result(30) == 9
    finally:
        ex.shutdown()


def _engine_pids(ex):
    return {e: ex.client.engine_info(e)["pid"] for e in ex.engines}


@pytest.mark.parametrize("retries", [0, 1])
def test_sigkill_busy_engine(no_leaks, tmp_path, retries):
    with LocalCluster(2, retries=retries, heartbeat_period=0.2, heartbeat_misses=5) as ex:
        started, release = str(tmp_path / "s"), str(tmp_path / "r")
        victim = ex.engine(ex.engines[0]).submit(tasks.getpid).result(30)
        # one long task on each engine, through the load balancer
        fs = [ex.submit(tasks.touch_then_wait, started + str(i), release, value=i) for i in range(2)]
        wait_until(lambda: all(os.path.exists(started + str(i)) for i in range(2)), 30, what="tasks to start")
        wait_until(lambda: all(f.running() for f in fs), 30, what="RUNNING")
        t0 = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        if retries:
            open(release, "w").close()
            assert sorted(f.result(30) for f in fs) == [0, 1]
        else:
            done, _ = cf.wait(fs, timeout=30, return_when=cf.FIRST_EXCEPTION)
            detect = time.monotonic() - t0
            dead = [f for f in done if f.exception() is not None]
            assert len(dead) == 1 and isinstance(dead[0].exception(), EngineDiedError)
            assert dead[0].exception().exitcode == -signal.SIGKILL
            assert detect < 1.5, detect
            open(release, "w").close()
            assert [f.result(30) for f in fs if f not in dead]
        assert ex.submit(tasks.mul, 4, 4).result(30) == 16


def _gone_or_zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:  # it may go between any two looks
        return True


def test_sigstop_engine_declared_dead_by_heartbeat(no_leaks, tmp_path):
    with LocalCluster(2, heartbeat_period=0.2, heartbeat_misses=5) as ex:
        eid = ex.engines[0]
        pid = ex.engine(eid).submit(tasks.getpid).result(30)
        release = str(tmp_path / "r")
        f = ex.engine(eid).submit(tasks.wait_for_file, release)
        wait_until(f.running, 30, what="RUNNING")
        t0 = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        try:
            with pytest.raises(EngineDiedError) as info:
                f.result(30)
            detect = time.monotonic() - t0
            assert detect < 0.2 * 5 + 1.5, detect
            assert "heartbeat" in str(info.value)
            wait_until(lambda: eid not in ex.engines, 10, what="engine dropped from ex.engines")
            wait_until(lambda: _gone_or_zombie(pid), 10, what="the stopped engine to be killed")
        finally:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        assert ex.submit(tasks.mul, 5, 5).result(30) == 25


def test_owned_executor_max_tasks_per_child(no_leaks):
    with ZmqExecutor(max_workers=2, max_tasks_per_child=3) as ex:
        pids = [ex.submit(tasks.getpid).result(30) for _ in range(12)]
        assert all(isinstance(p, int) for p in pids)
        assert len(set(pids)) >= 4  # engines were recycled, no task lost


def test_replacement_engines_go_live_without_waiting_for_a_beat(no_leaks):
    """A new engine's heart is pinged as soon as it subscribes: with a 30 s heartbeat
    period, recycling after every task still serves (it waited a period per engine)."""
    with ZmqExecutor(max_workers=1, max_tasks_per_child=1, heartbeat_period=30) as ex:
        pids = [ex.submit(os.getpid).result(25) for _ in range(4)]
    assert len(set(pids)) == 4


def test_initializer(no_leaks, tmp_path):
    marker = str(tmp_path / "init")
    with ZmqExecutor(max_workers=2, initializer=tasks.touch, initargs=(marker,)) as ex:
        assert ex.submit(os.path.exists, marker).result(30)


def test_hub_killed_fails_pending_futures(no_leaks, tmp_path):
    from zexec.errors import ClusterLostError

    cluster = LocalCluster(1)
    ex = cluster.__enter__()
    try:
        release = str(tmp_path / "r")
        f = ex.submit(tasks.wait_for_file, release)
        wait_until(f.running, 30, what="RUNNING")
        ctl = psutil.Process(cluster.procs["controller"].pid)
        hub = ctl.children()[0]  # forked first
        t0 = time.monotonic()
        hub.kill()
        with pytest.raises(cf.BrokenExecutor):
            f.result(30)
        assert time.monotonic() - t0 < 10
        with pytest.raises(ClusterLostError):
            ex.submit(tasks.mul, 1, 1)
    finally:
        open(tmp_path / "r", "w").close()
        cluster.__exit__(None, None, None)


@pytest.mark.parametrize("part,kind", [("task", "lb"), ("mux", "direct"), ("heartbeat", "lb")])
def test_stopped_controller_part_fails_pending_futures(no_leaks, tmp_path, part, kind):
    """A part stopped by SIGSTOP would hold its tasks forever while the hub beats on:
    the controller takes it for dead, and pending futures fail (nothing hangs)."""
    from zexec.controller.supervisor import PARTS, STOPPED_LIMIT
    from zexec.errors import ClusterLostError

    cluster = LocalCluster(2)
    ex = cluster.__enter__()
    try:
        ctl = psutil.Process(cluster.procs["controller"].pid)
        parts = dict(zip(PARTS, sorted(ctl.children(), key=lambda p: (p.create_time(), p.pid))))
        target = ex if kind == "lb" else ex.engine(ex.engines[0])
        assert target.submit(tasks.mul, 2, 3).result(30) == 6
        t0 = time.monotonic()
        parts[part].suspend()
        f = target.submit(tasks.wait_for_file, str(tmp_path / "never"), 60)
        with pytest.raises(ClusterLostError):
            f.result(30)
        # the limit, then the clients' own bound on a silent hub (8 s)
        assert time.monotonic() - t0 < STOPPED_LIMIT + 12
        assert not parts[part].is_running() or parts[part].status() == psutil.STATUS_ZOMBIE
    finally:
        cluster.__exit__(None, None, None)


def test_cluster_started_from_a_thread_outlives_that_thread(no_leaks):
    """The kernel's parent-death signal follows the thread that started a process: a
    cluster made in a worker thread must keep serving after that thread has ended."""
    import threading

    made = {}
    t = threading.Thread(target=lambda: made.setdefault("ex", ZmqExecutor(max_workers=1)))
    t.start()
    t.join(60)
    ex = made["ex"]
    try:
        procs = ex.cluster.procs
        # the signal comes as the thread ends: watch for a second that nothing stops
        # (an absence has no event to wait for)
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            assert all(p.poll() is None for p in procs.values())
            time.sleep(0.05)
        assert ex.submit(pow, 2, 10).result(30) == 1024
    finally:
        ex.shutdown()


def test_a_task_goes_to_the_engine_that_frees_first(no_leaks, tmp_path):
    """Before any runtime is known, a task is not queued behind a (possibly long) task
    at a busy engine: it waits in the scheduler for the first engine that frees."""
    release = str(tmp_path / "release")
    with LocalCluster(2) as ex:
        long = ex.submit(tasks.wait_for_file, release, 60)
        short = ex.submit(os.getpid)
        after = ex.submit(os.getpid)
        try:
            assert after.result(30) == short.result(30)  # while the long task still runs
            assert not long.done()
        finally:
            open(release, "w").close()
        long.result(30)


def test_client_sigkilled_leaves_nothing(no_leaks, tmp_path):
    script = tmp_path / "client.py"
    script.write_text(
        "import os, sys, zexec\n"
        "c = zexec.LocalCluster(2)\n"
        "ex = c.__enter__()\n"
        "print(os.getpid(), c.dir, c.shm_dir, flush=True)\n"
        "sys.stdin.read()\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p or os.getcwd() for p in sys.path))
    p = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True, env=env)
    try:
        dirs = [d for d in p.stdout.readline().split()[1:] if d != "None"]
        assert dirs and all(os.path.isdir(d) for d in dirs)
        tree = psutil.Process(p.pid).children(recursive=True)
        assert len(tree) >= 2 + 6 + 2
        t0 = time.monotonic()
        p.kill()
        p.wait(10)
        gone, alive = psutil.wait_procs(tree, timeout=15)
        assert not alive, [(q.pid, q.cmdline()) for q in alive]
        assert time.monotonic() - t0 < 15
        # the key and the buffers go with it: the controller removes the cluster's dirs
        wait_until(lambda: not any(os.path.exists(d) for d in dirs), 5, what="cluster dirs removed")
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()


def test_connection_file_is_private_and_cluster_exits_clean(no_leaks):
    c = LocalCluster(1)
    with pytest.raises(ZeroDivisionError):
        with c as ex:
            mode = os.stat(c.connection_file).st_mode & 0o777
            assert mode == 0o600
            ex.submit(divmod, 1, 0).result(30)
    assert not c.procs


def test_queued_tasks_fail_when_no_engine_is_left(no_leaks, tmp_path):
    from zexec import NoEnginesError

    with LocalCluster(1, replace=False, no_engine_timeout=1.0) as ex:
        eid = ex.engines[0]
        started = str(tmp_path / "s")
        first = ex.submit(tasks.touch_then_wait, started, str(tmp_path / "never"))
        wait_until(lambda: os.path.exists(started), 30, what="first task to start")
        queued = [ex.submit(tasks.mul, i, 2) for i in range(5)]
        pid = ex.client.engine_info(eid)["pid"]
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(EngineDiedError):
            first.result(30)
        for f in queued:
            # held by the engine (failed with it) or still queued (failed for want of engines)
            with pytest.raises((EngineDiedError, NoEnginesError)):
                f.result(30)
        assert ex.engines == []


def test_failing_initializer_breaks_the_executor(no_leaks):
    # CPython's contract: the executor is created; then it is broken, submit() raises
    # BrokenExecutor (or its futures fail with it), and nothing hangs
    ex = ZmqExecutor(max_workers=2, initializer=tasks.init_fail)
    try:
        try:
            f = ex.submit(tasks.mul, 1, 1)
        except cf.BrokenExecutor:
            pass
        else:
            with pytest.raises(cf.BrokenExecutor):
                f.result(30)
        wait_until(lambda: ex._broken, 30, what="executor to be broken")
        with pytest.raises(cf.BrokenExecutor, match="initializer"):
            ex.submit(tasks.mul, 1, 1)
    finally:
        ex.shutdown()
