"""Careless use, no attacker (issue 12, findings 1-8): each must end in a result or a
clear error, never a hang, a lost cluster or a leak."""

from __future__ import annotations

import gc
import os
import signal
import tempfile
import weakref
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import psutil
import pytest

import tasks
from conftest import wait_until
from zexec import (EngineDiedError, EngineSetDiedError, LocalCluster, NoEnginesError, ZmqExecutor,
                   serialize, wire)
from zexec.errors import ProtocolError
from zexec.futures import ZFuture


@pytest.mark.parametrize("n", [0, -1])
def test_local_cluster_refuses_no_engines(n):
    # like ProcessPoolExecutor(max_workers=0): a cluster without engines is a mistake
    with pytest.raises(ValueError, match="n must be"):
        LocalCluster(n)


def test_local_cluster_none_means_cpu_count():
    assert LocalCluster().n == (os.cpu_count() or 1)


def test_an_executor_keeps_its_cluster_alive(no_leaks):
    c = LocalCluster(2).start()
    ex = c.executor()
    try:
        c.wait_for_engines(ex.client)
        ref = weakref.ref(c)
        del c
        gc.collect()
        assert ref() is not None and ex.cluster is ref()
        assert ex.submit(pow, 2, 3).result(30) == 8
    finally:
        cluster = ex.cluster
        ex.shutdown()  # not its cluster to stop: it did not start it
        if cluster is not None:
            assert cluster.procs
            cluster.stop()


def test_executor_of_a_with_block_names_its_cluster(no_leaks):
    c = LocalCluster(1)
    with c as ex:
        assert ex.cluster is c


def test_array_changed_after_submit_runs_with_its_value_at_submit(cluster):
    """Finding 1: its out-of-band frame was signed at submit and sent later, changed:
    dropped as forged, the future hung (50 of 50)."""
    ex = cluster.ex
    for target in (ex, ex.engine(ex.engines[0])):
        fs = []
        for _ in range(20):
            a = np.zeros(25_000)  # 200 kB: an out-of-band frame, not shared memory
            fs.append(target.submit(np.sum, a))
            a[:] = 1
        assert [f.result(30) for f in fs] == [0.0] * 20


@pytest.mark.timeout(120)
def test_big_array_changed_after_submit_on_tcp(no_leaks):
    """On tcp a big frame goes through the scheduler on its header's signature: an
    engine that then dropped it held its place forever, and every later task hung."""
    with LocalCluster(1, transport="tcp") as ex:
        fs = []
        for _ in range(3):
            a = np.zeros(1 << 18)  # 2 MiB: past BIG_FRAME, routed on its header alone
            fs.append(ex.submit(np.sum, a))
            a[:] = 1
        assert [f.result(60) for f in fs] == [0.0] * 3

        # a payload that changes after signing all the same (as a zero-copy frame
        # would): the engine fails that task, and goes on serving
        client = ex.client
        a = np.zeros(1 << 18)
        header = client.session.header("apply_request", reply_to=client.reply_to)
        fut = ZFuture()
        fut.msg_id = header["msg_id"]
        frames = client.session.pack(
            "apply_request", {"fn": "", "nfn": 1}, header=header,
            buffers=[*serialize.dumps(np.sum), *serialize.dumps(((a,), {}))])
        a[:] = 1
        client._futures[fut.msg_id] = (fut, None)
        with client._send_lock:
            wire.send_frames(client.task_send, frames)
        with pytest.raises(ProtocolError, match="does not match its signature"):
            fut.result(60)
        assert ex.submit(pow, 2, 5).result(60) == 32


@pytest.mark.timeout(180)
def test_a_poison_task_fails_and_the_cluster_keeps_its_engines(no_leaks):
    """Finding 2: retries of a task that kills its engine killed young engine after
    young engine, the crash-loop guard stopped replacing, and the cluster ended empty."""
    with LocalCluster(2, retries=6) as ex:
        with pytest.raises(EngineDiedError) as info:
            ex.submit(tasks.hard_exit, 1).result(120)
        assert info.value.exitcode == 1
        wait_until(lambda: len(ex.engines) == 2, 60, what="two engines again")
        assert ex.submit(tasks.mul, 6, 7).result(60) == 42


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("how", ["return", "exit", "raise"])
def test_a_process_forked_by_a_task_never_runs_engine_code(cluster, how):
    """Finding 3: the child of a task that returned (or exited, or raised) went on as
    a copy of the engine, spinning on the engine's sockets after everything stopped."""
    ex = cluster.ex
    child = ex.submit(tasks.fork_and_return, how).result(30)
    assert isinstance(child, int) and child > 0
    wait_until(lambda: _gone(child), 10, what="the forked child to exit")
    assert ex.submit(tasks.mul, 2, 21).result(30) == 42


def _long_dir(base, length: int = 107) -> str:
    path = str(base)
    while len(path) < length:
        path = os.path.join(path, "d" * min(40, max(1, length - len(path) - 1)))
    os.makedirs(path, exist_ok=True)
    return path


def test_a_long_tmpdir_still_starts_a_cluster(no_leaks, tmp_path, monkeypatch):
    """Finding 8: a 107-character TMPDIR gave a bare ``ZMQError: File name too long``."""
    long = _long_dir(tmp_path)
    monkeypatch.setenv("TMPDIR", long)
    monkeypatch.setattr(tempfile, "tempdir", None)  # tempfile reads TMPDIR again
    c = LocalCluster(1)
    with c as ex:
        assert c.dir.startswith(long)  # the connection file and logs go where asked
        assert ex.submit(pow, 2, 3).result(60) == 8
    assert not any(os.path.exists(d) for d in (c.dir, c.ipc_dir) if d)


def test_too_long_ipc_paths_are_a_clear_error(tmp_path):
    from zexec.connection import ConnectionInfo, allocate

    long = _long_dir(tmp_path)
    with pytest.raises(ValueError, match="too long for a unix socket.*TMPDIR"):
        allocate(ConnectionInfo(key="k", transport="ipc"), ipc_dir=long)


def test_an_engine_killed_writing_shared_memory_leaves_no_file(cluster):
    """Finding 7: its partial file stayed in /dev/shm/zexec-* until the cluster stopped."""
    ex = cluster.ex
    shm_dir = ex.client.info.shm_dir
    with pytest.raises(EngineDiedError):
        ex.submit(tasks.die_writing_shm, shm_dir).result(30)
    wait_until(lambda: os.listdir(shm_dir) == [], 10, what="the partial file removed")


def _dead_info(i: int) -> dict:
    return {"id": i, "uuid": f"{i:032x}", "hostname": "h", "pid": 10_000 + i,
            "log": "/tmp/zexec-x/engine-%d.log" % i, "launcher": "l" * 32,
            "reason": "recycled (max_tasks_per_child)", "exitcode": 1}


def test_dead_engines_kept_in_the_client_are_bounded(cluster):
    """Finding 7: max_tasks_per_child=1 left one dead entry per task, for good."""
    from zexec import client as client_mod

    kept = getattr(client_mod, "DEAD_KEPT", 256)
    c = client_mod.Client(cluster.connection_file)
    try:
        base = 100_000
        for i in range(3 * kept):
            c._engine_gone(_dead_info(base + i))
        assert len(c._dead) == kept
        last = base + 3 * kept - 1
        assert c.engine_info(last)["reason"].startswith("recycled")
        with pytest.raises(EngineDiedError, match=f"engine {last} died"):
            c.submit(pow, (2, 2), target=last)
        with pytest.raises(EngineDiedError, match=f"engine {base} died"):
            c.submit(pow, (2, 2), target=base)  # forgotten, still known dead
    finally:
        c.close()


def test_dead_engines_kept_in_the_controller_are_bounded():
    from zexec.connection import ConnectionInfo
    from zexec.controller import hub as hub_mod
    from zexec.controller import taskscheduler as ts_mod

    info = ConnectionInfo(key="k")
    hub = hub_mod.Hub(info)
    hub._publish = lambda kind, content: None  # no sockets: the bookkeeping only
    hub._tell_dead = lambda uuid: None
    sched = ts_mod.TaskScheduler(info)
    for i in range(3000):
        eng = dict(_dead_info(i), state="live")
        hub.engines[eng["uuid"]] = eng
        hub.done_by_engine[i] += 1
        hub._declare_dead(eng, "process exited", 0)
        sched._add_engine(eng)
        sched._engine_died(eng)
    assert len(hub.dead) <= getattr(hub_mod, "DEAD_KEPT", 256) and not hub.done_by_engine
    assert len(sched.dead) <= getattr(ts_mod, "DEAD_KEPT", 1000) and not sched.engines


@pytest.mark.timeout(120)
@pytest.mark.parametrize("made", ["with", "owned"])
def test_engine_set_killed_is_a_prompt_clear_error(no_leaks, tmp_path, made):
    """Finding 6: SIGKILL of the engine set left no engines, and every task failed with
    NoEnginesError 30 s later, without a word about why."""
    if made == "with":
        cluster = LocalCluster(2)
        ex = cluster.__enter__()
    else:
        ex = ZmqExecutor(max_workers=2)
        cluster = ex.cluster
    try:
        running = [ex.engine(e).submit(tasks.touch_then_wait, str(tmp_path / f"started{e}"),
                                       str(tmp_path / "never")) for e in ex.engines]
        wait_until(lambda: len(list(tmp_path.glob("started*"))) == 2, 30, what="both engines busy")
        queued = [ex.submit(tasks.mul, i, 2) for i in range(6)]
        os.kill(cluster.procs["engines"].pid, signal.SIGKILL)
        for f in [*running, *queued]:
            # EngineSetDiedError (or EngineDiedError for a running task, if that came
            # first); well before the 30 s after which NoEnginesError came
            with pytest.raises(BrokenProcessPool):
                f.result(20)
        with pytest.raises(EngineSetDiedError, match="engine set .* killed by signal SIGKILL"):
            ex.submit(tasks.mul, 1, 1)
    finally:
        if made == "with":
            cluster.__exit__(None, None, None)
        else:
            ex.shutdown()


@pytest.mark.timeout(120)
def test_engine_set_lost_is_told_to_every_client(no_leaks):
    """Finding 6, on a cluster whose processes the client did not start (as from the
    command line): the hub hears the engine set no more, and queued tasks fail at once
    with NoEnginesError saying why, not after no_engine_timeout (30 s)."""
    cluster = LocalCluster(1)
    own = cluster.__enter__()
    other = ZmqExecutor(connection=cluster.connection_file)  # sees no process: only the hub
    try:
        wait_until(lambda: len(other.engines) == 1, 30, what="the engine")
        os.kill(cluster.procs["engines"].pid, signal.SIGKILL)
        wait_until(lambda: not other.engines, 30, what="the engine declared dead")
        f = other.submit(tasks.mul, 1, 1)
        with pytest.raises(NoEnginesError, match="no engine set is running.*no word from it"):
            f.result(20)  # not after no_engine_timeout (30 s)
    finally:
        other.shutdown()
        cluster.__exit__(None, None, None)
