"""What real clients of an executor rely on beyond the stdlib contract (issue 11)."""

from __future__ import annotations

import os
import signal

import pytest

import tasks
from conftest import wait_until
from zexec import LocalCluster


def test_max_workers_follows_the_live_engines(cluster):
    # dask sizes its work by ``_max_workers``: an executor joined to a running cluster
    # (connection=...) must report the engines there, not None
    assert cluster.ex._max_workers == len(cluster.ex.engines) == 3


@pytest.mark.timeout(60)
def test_max_workers_drops_when_an_engine_dies(no_leaks):
    with LocalCluster(2, replace=False) as ex:
        assert ex._max_workers == 2
        victim = ex.engine(ex.engines[0]).submit(tasks.getpid).result(30)
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: ex._max_workers == 1, 30, what="the engine count to drop")
