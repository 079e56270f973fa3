"""Garbage on every socket: nothing crashes, nothing is unpickled, service goes on."""

from __future__ import annotations

import os
import random

import pytest
import zmq

import tasks
from zexec import LocalCluster
from zexec.connection import ConnectionInfo
from zexec.protocol import Session

ROUTER_SIDES = ["registration", "task_client", "task_engine", "mux_client", "mux_engine",
                "control_client", "control_engine", "hb_pong"]


def garbage_messages(info: ConnectionInfo, engine_uuid: bytes, rng: random.Random):
    """Every kind of bad message: random, truncated, unsigned, wrong key, unknown, replayed."""
    good = Session(info.key_bytes)
    wrong = Session(b"not-the-key" * 3)
    pickled_bomb = b"cos\nsystem\n(S'touch /tmp/zexec-pwned'\ntR."
    replay = good.pack("abort_request", {"msg_ids": ["nothing"]})
    yield [os.urandom(rng.randint(1, 64))]
    yield [os.urandom(rng.randint(1, 64)) for _ in range(rng.randint(2, 6))]
    yield [engine_uuid, os.urandom(20), os.urandom(8)]
    yield good.pack("apply_request", {})[:3]                                  # truncated
    unsigned = good.pack("apply_request", {"fn": "x", "nfn": 1}, buffers=[pickled_bomb])
    unsigned[1] = b""
    yield unsigned
    yield wrong.pack("apply_request", {"fn": "x", "nfn": 1}, buffers=[pickled_bomb], idents=[engine_uuid])
    yield wrong.pack("registration_request", {"uuid": "evil"})
    yield good.pack("no_such_type", {"x": 1})
    yield good.pack("apply_request", {"fn": 1}, idents=[engine_uuid])        # signed, malformed
    yield replay
    yield replay                                                             # replayed
    yield [b"<IDS|MSG>", b"sig"]


@pytest.mark.timeout(120)
def test_garbage_on_every_socket(no_leaks, tmp_path):
    rng = random.Random(1234)
    marker = "/tmp/zexec-pwned"
    if os.path.exists(marker):
        os.unlink(marker)
    with LocalCluster(2) as ex:
        info = ex.client.info
        uuid = ex.client.engine_info(ex.engines[0])["uuid"].encode()
        pids = {e: ex.client.engine_info(e)["pid"] for e in ex.engines}
        ctx = zmq.Context()
        socks = []
        try:
            for chan in ROUTER_SIDES + ["iopub_engine"]:
                kind = zmq.PUB if chan == "iopub_engine" else zmq.DEALER
                s = ctx.socket(kind)
                s.linger = 0
                s.connect(info.url(chan))
                socks.append((chan, s))
            for _round in range(3):
                for chan, s in socks:
                    for msg in garbage_messages(info, uuid, rng):
                        s.send_multipart(msg)
                # between rounds, the cluster keeps serving both ways
                assert ex.submit(tasks.mul, 6, 7).result(30) == 42
                assert ex.engine(ex.engines[0]).submit(tasks.mul, 2, 5).result(30) == 10
            assert list(ex.map(tasks.mul, range(50), range(50))) == [i * i for i in range(50)]
            st = ex.status()
            assert sorted(e["id"] for e in st["engines"]) == sorted(pids)
            assert {e: ex.client.engine_info(e)["pid"] for e in ex.engines} == pids
        finally:
            for _, s in socks:
                s.close(linger=0)
            ctx.term()
    assert not os.path.exists(marker), "a bad message was unpickled"



def test_replayed_request_runs_once(no_leaks, tmp_path):
    from zexec import serialize

    log = tmp_path / "runs"
    with LocalCluster(1) as ex:
        info = ex.client.info
        s = Session(info.key_bytes)
        fn = serialize.dumps(tasks.append_line)
        # it runs past 10 ms, as any task may on a loaded machine: reported started
        args = serialize.dumps(((str(log), 0.05), {}))
        frames = s.pack("apply_request", {"fn": "replay-test", "nfn": len(fn)}, buffers=[*fn, *args])
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        try:
            sock.connect(info.url("task_client"))
            sock.send_multipart(frames)
            # its reply, after the notice that it started (that notice was taken for
            # the reply, and the reply then for an answer to the replay)
            kinds = []
            while "apply_reply" not in kinds:
                assert sock.poll(30_000), f"no reply to the original request (got {kinds})"
                kinds.append(s.unpack(sock.recv_multipart()).header["msg_type"])
            assert set(kinds) <= {"status", "apply_reply"}, kinds
            sock.send_multipart(frames)  # the same signed message again
            assert not sock.poll(1000), "a replayed request was answered"
            # the replay changed nothing: the cluster serves and the task ran once
            assert ex.submit(tasks.mul, 3, 3).result(30) == 9
            assert log.read_text().count("ran") == 1
        finally:
            sock.close(linger=0)
            ctx.term()


def test_one_frame_message_does_not_stall_the_mux(no_leaks):
    # pyzmq's C device, given a one-frame message, waits inside recv for more frames;
    # the hub nudges it each beat, and what it merged is recovered
    with LocalCluster(1) as ex:
        info = ex.client.info
        ctx = zmq.Context()
        socks = []
        try:
            for chan in ("mux_client", "mux_engine"):
                s = ctx.socket(zmq.DEALER)
                s.linger = 0
                s.connect(info.url(chan))
                socks.append(s)
            view = ex.engine(ex.engines[0])
            for s in socks:
                f = view.submit(tasks.sleep, 0.2)
                s.send(b"one frame")
                assert f.result(15) == 0.2
                assert view.submit(tasks.mul, 3, 3).result(15) == 9
        finally:
            for s in socks:
                s.close(linger=0)
            ctx.term()


def test_interrupted_send_is_ended_not_glued_to_the_next():
    """A KeyboardInterrupt between two frames ends that message; the next one arrives whole."""
    from zexec import wire

    class Interrupting(list):
        def __iter__(self):
            yield from self[:2]
            raise KeyboardInterrupt

    ctx = zmq.Context()
    try:
        tx, rx = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
        tx.bind("inproc://interrupted")
        rx.connect("inproc://interrupted")
        with pytest.raises(KeyboardInterrupt):
            wire.send_frames(tx, Interrupting([b"a", b"b", b"c", b"d"]))
        wire.send_frames(tx, [b"next", b"message"])
        assert rx.recv_multipart() == [b"a", b"b", b""]
        assert rx.recv_multipart() == [b"next", b"message"]
    finally:
        ctx.destroy(linger=0)


@pytest.mark.parametrize("kind", ["lb", "direct"])
def test_keyboard_interrupt_in_submit_loses_no_later_task(cluster, monkeypatch, kind):
    """Ctrl-C while submit sends (caught, as in a notebook): later tasks still complete."""
    from zexec import wire

    ex = cluster.ex if kind == "lb" else cluster.ex.engine(cluster.ex.engines[0])
    assert ex.submit(pow, 2, 2).result(30) == 4
    real, calls = wire._send, []

    def interrupt_third_frame(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(wire, "_send", interrupt_third_frame)
    with pytest.raises(KeyboardInterrupt):
        ex.submit(pow, 3, 3)
    monkeypatch.setattr(wire, "_send", real)
    fs = [ex.submit(pow, 2, i) for i in range(5)]
    assert [f.result(30) for f in fs] == [2 ** i for i in range(5)]
    assert not [m for m, (f, _) in cluster.ex.client._futures.items() if not f.done()]
