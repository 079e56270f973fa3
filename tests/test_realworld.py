"""What real clients of an executor rely on beyond the stdlib contract (issue 11)."""

from __future__ import annotations

import functools
import os
import signal

import pytest

import tasks
from conftest import wait_until
from zexec import LocalCluster, serialize


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


def _by_value_functions():
    # defined here, not at module level: a nested function goes by value, as the
    # functions of a user's __main__ do
    def scale(x, k):
        return x * k

    def calls(x, k):
        calls.n = getattr(calls, "n", 0) + 1
        return calls.n

    return scale, calls


def test_a_callable_object_is_pickled_with_a_reference_to_its_function():
    scale, _ = _by_value_functions()
    keys = []
    frames = serialize.dumps(tasks.Scaled(scale, 2), lambda fn: keys.append(fn) or "k1")
    assert keys == [scale]
    assert b"scale" not in frames[0]  # the function's code is not in the per-task payload
    back = serialize.loads(frames, {"k1": scale})
    assert back.fn is scale and back.k == 2


def test_a_callable_objects_state_is_seen_at_every_submit(cluster):
    scale, _ = _by_value_functions()
    wrapper = tasks.Scaled(scale, 1)
    got = []
    for k in (1, 2, 3):
        wrapper.k = k  # state that changes between submits must be seen
        got.append(cluster.ex.submit(wrapper, 10).result(30))
    assert got == [10, 20, 30]
    # the function inside went once per client: the wrapper's later submits name it
    assert any(entry[0] is scale for entry in cluster.ex.client._fn_cache.values())


def test_the_function_inside_a_callable_is_cached_on_the_engine(cluster):
    # as a plain function is: the engine keeps one copy of it (its attribute persists)
    _, calls = _by_value_functions()
    view = cluster.ex.engine(cluster.ex.engines[0])
    counts = [view.submit(functools.partial(calls, k=0), 0).result(30) for _ in range(3)]
    assert counts == [1, 2, 3]
    assert list(cluster.ex.map(functools.partial(calls, k=0), range(2)))  # load-balanced too
