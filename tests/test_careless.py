"""Careless use, no attacker (issue 12, findings 1-8): each must end in a result or a
clear error, never a hang, a lost cluster or a leak."""

from __future__ import annotations

import pytest

from zexec import LocalCluster


@pytest.mark.parametrize("n", [0, -1])
def test_local_cluster_refuses_no_engines(n):
    # like ProcessPoolExecutor(max_workers=0): a cluster without engines is a mistake
    with pytest.raises(ValueError, match="n must be"):
        LocalCluster(n)


def test_local_cluster_none_means_cpu_count():
    import os

    assert LocalCluster().n == (os.cpu_count() or 1)
