"""No false positives: busy engines, two per core, stay registered for 60 s."""

import os
import time

import pytest

import tasks
from zexec import LocalCluster


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_busy_engines_are_not_declared_dead(no_leaks):
    n = 2 * (os.cpu_count() or 1)
    with LocalCluster(n) as ex:  # default heartbeat: 0.5 s x 6 misses
        engines = list(ex.engines)
        pids = {e: ex.client.engine_info(e)["pid"] for e in engines}
        deadline = time.monotonic() + 60
        rounds = 0
        while time.monotonic() < deadline:
            results = list(ex.map(tasks.spin, [2.0] * n))
            assert all(r > 0 for r in results)
            rounds += 1
        assert ex.engines == engines
        assert {e: ex.client.engine_info(e)["pid"] for e in engines} == pids
        st = ex.status()
        assert st["dead"] == []
        assert rounds >= 10
