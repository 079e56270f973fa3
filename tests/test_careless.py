"""Careless use, no attacker (issue 12, findings 1-8): each must end in a result or a
clear error, never a hang, a lost cluster or a leak."""

from __future__ import annotations

import gc
import os
import weakref

import pytest

from zexec import LocalCluster


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
