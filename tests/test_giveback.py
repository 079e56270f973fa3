"""Tasks queued at an engine behind a long-running one move to an engine that is free."""

from __future__ import annotations

import os
from concurrent.futures import wait

import pytest

import tasks
from conftest import wait_until
from zexec import LocalCluster


@pytest.mark.timeout(180)
def test_tasks_queued_behind_a_long_one_run_elsewhere(no_leaks, tmp_path):
    with LocalCluster(2) as ex:
        # no-ops measured first: the scheduler then queues many tasks at each engine
        for _ in range(3):
            wait([ex.submit(tasks.getpid) for _ in range(50)])
        started, release = str(tmp_path / "started"), str(tmp_path / "release")
        long = ex.submit(tasks.pid_then_wait, started, release)
        shorts = [ex.submit(tasks.getpid) for _ in range(60)]
        try:
            # some shorts went to the long task's engine before it was known to run
            # long; they must not wait for it: all finish while it still runs
            done, not_done = wait(shorts, timeout=45)
            assert not not_done, f"{len(not_done)} short tasks waited behind the long one"
            assert not long.done()
            wait_until(lambda: os.path.exists(started), 30, what="the long task's pid")
            with open(started) as f:
                busy = int(f.read())
            pids = {f.result() for f in shorts}
            assert busy not in pids  # none ran on the busy engine (the long one is first there)
            assert ex.status()["tasks"].get("given_back", 0) > 0
        finally:
            tasks.touch(release)
        assert long.result(60) == busy
        # the engines serve on as usual
        assert sorted(ex.map(abs, range(-20, 0))) == list(range(1, 21))
        st = ex.status()
        assert all(e["queued"] == 0 for e in st["engines"]), st["engines"]
        assert st["tasks"]["submitted"] == st["tasks"]["ok"], st["tasks"]


def test_a_task_given_back_may_come_to_the_same_engine_again(monkeypatch):
    """A task given back is queued again, and may go to the very engine that gave it
    back (its long task ended: it is the least loaded).  That engine had seen the same
    signed request: its replay guard dropped it, and the future waited for ever while
    the scheduler counted the task as that engine's (issue 12: a burst of tasks under
    load hung 1 time in 40).  Plain frames, both ends' own code."""
    import zmq

    from zexec.connection import ConnectionInfo
    from zexec.controller import taskscheduler as ts_mod
    from zexec.engine import Engine
    from zexec.protocol import Session

    class Sock:
        def __init__(self):
            self.sent = []

        def send_multipart(self, frames, *args, **kwargs):
            self.sent.append([bytes(f) for f in frames])

    info = ConnectionInfo(key="k" * 32)
    to_engine = []
    monkeypatch.setattr(ts_mod, "send_frames", lambda sock, frames: to_engine.append(list(frames)))
    sched = ts_mod.TaskScheduler(info, hwm=2)
    sched.engine_sock = None  # send_frames above stands for it
    sched._add_engine({"id": 0, "uuid": "e" * 32})
    engine = Engine(info)
    engine.task_sock, engine.mux = Sock(), Sock()

    def deliver():  # what the scheduler sent, as the engine reads it (no routing identity)
        frames, = to_engine
        to_engine.clear()
        engine._dispatch(engine.task_sock, [zmq.Frame(bytes(f)) for f in frames[1:]])

    client = Session(info.key_bytes)
    for _ in range(2):
        sched._on_client([zmq.Frame(f) for f in client.pack(
            "apply_request", {"fn": "", "nfn": 1}, idents=[b"client"], buffers=[b"fn", b"args"])])
        sched._dispatch()
        deliver()
    running, waiting = [item[3]["msg_id"] for item in engine.queue]

    # the first runs long: the scheduler takes the second back, and the engine lets it go
    assert sched.give_back(b"e" * 32, [waiting]) == 1
    deliver()
    assert [item[3]["msg_id"] for item in engine.queue] == [running]
    reply, = engine.task_sock.sent
    sched._on_engine([zmq.Frame(b"e" * 32), *(zmq.Frame(f) for f in reply)])
    assert [t.msg_id for t in sched.queue] == [waiting]

    # the only engine with room is the same one: the same request goes there again, and runs
    sched._dispatch()
    deliver()
    assert [item[3]["msg_id"] for item in engine.queue] == [running, waiting]
