"""Large buffers: out-of-band frames, shared memory on one host, integrity checked."""

from __future__ import annotations

import os

import numpy as np
import pytest

import tasks
from zexec import LocalCluster
from zexec.errors import ProtocolError
from zexec.shm import ShmStore


@pytest.fixture(scope="module")
def big():
    return np.random.default_rng(0).random(2 << 20)  # 16 MiB


def test_shared_memory_round_trip(cluster, big):
    ex = cluster.ex
    shm_dir = ex.client.info.shm_dir
    assert shm_dir and shm_dir.startswith("/dev/shm")
    for target in (ex, ex.engine(ex.engines[0])):
        out = target.submit(tasks.identity, big).result(60)
        assert np.array_equal(out, big)
        out[0] = -1.0  # writable, and a private copy
        assert big[0] != -1.0
        assert np.array_equal(target.submit(tasks.double, big).result(60), big * 2)
        inplace = target.submit(tasks.add_one_inplace, big).result(60)
        assert np.array_equal(inplace, big + 1)
    assert os.listdir(shm_dir) == []  # every buffer file was removed


def test_tcp_cluster_sends_big_buffers_as_frames(no_leaks, big):
    with LocalCluster(1, transport="tcp") as ex:
        assert ex.client.info.shm_store() is None
        assert np.array_equal(ex.submit(tasks.identity, big).result(60), big)


def test_tampered_buffer_file_is_rejected(tmp_path):
    store = ShmStore(str(tmp_path))
    data = np.arange(1 << 18, dtype=np.float64)  # 2 MiB
    frames = [b"stream", memoryview(data).cast("B")]
    refs = store.export(frames, 1)
    assert frames[1] == b"" and len(refs) == 1
    path = tmp_path / refs[0][1]
    raw = bytearray(path.read_bytes())
    raw[100] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ProtocolError, match="digest"):
        store.open(frames, refs)
    with pytest.raises(ProtocolError, match="malformed"):
        store.open(frames, [[1, "../../etc/passwd", 10, "00"]])


def test_full_shared_memory_falls_back_to_sockets(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_bytes(b"")
    store = ShmStore(str(not_a_dir))  # every write fails, as on a full tmpfs
    data = np.arange(1 << 18, dtype=np.float64)
    frames = [b"stream", memoryview(data).cast("B")]
    assert store.export(frames, 1) == []
    assert bytes(frames[1]) == data.tobytes()  # untouched: it goes as a frame


def test_big_frames_leave_no_thread_behind(no_leaks, big):
    """Hashing a big frame uses helper threads for that message only: none outlives
    the cluster (checked by ``no_leaks``), over shared memory and over zmq frames."""
    for transport in ("ipc", "tcp"):  # shared memory on ipc, zmq frames on tcp
        with LocalCluster(1, transport=transport) as ex:
            assert np.array_equal(ex.submit(tasks.identity, big).result(60), big)
