"""Careless use, no attacker (issue 12, findings 1-8): each must end in a result or a
clear error, never a hang, a lost cluster or a leak."""

from __future__ import annotations

import gc
import os
import weakref

import numpy as np
import pytest

from zexec import LocalCluster, serialize, wire
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
