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
