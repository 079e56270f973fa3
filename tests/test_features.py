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
