"""Protocol on plain frames: signing, verification, replay guard; no sockets."""

import pickle

import pytest

from zexec.errors import ProtocolError
from zexec.protocol import BIG_FRAME, DELIM, ReplayGuard, Session, split_idents


def make(key=b"k" * 32):
    return Session(key)


def test_roundtrip_with_idents_and_buffers():
    a, b = make(), make()
    frames = a.pack("apply_request", {"x": 1}, buffers=[b"payload", memoryview(b"more")],
                    idents=[b"engine-1", b"client"], parent={"msg_id": "p"})
    msg = b.unpack(frames)
    assert msg.idents == [b"engine-1", b"client"]
    assert msg.header["msg_type"] == "apply_request"
    assert msg.header["session"] == a.session
    assert msg.parent == {"msg_id": "p"}
    assert msg.content == {"x": 1}
    assert [bytes(x) for x in msg.buffers] == [b"payload", b"more"]


@pytest.mark.parametrize("index", [2, 3, 4, 5])
def test_tampered_frame_is_rejected(index):
    frames = make().pack("apply_request", {"x": 1}, buffers=[b"payload"])
    frames[index] = bytes(frames[index])[:-1] + b"X"
    with pytest.raises(ProtocolError, match="signature|JSON"):
        make().unpack(frames)


def test_wrong_key_rejected_before_unpickling(monkeypatch):
    calls = []
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: calls.append(a))
    frames = make(b"wrong" * 8).pack("apply_request", {}, buffers=[pickle.dumps(1)])
    with pytest.raises(ProtocolError, match="bad signature"):
        make().unpack(frames)
    assert calls == []


def test_unsigned_and_truncated_and_garbage():
    s = make()
    frames = s.pack("x", {})
    unsigned = list(frames)
    unsigned[1] = b""
    with pytest.raises(ProtocolError, match="unsigned"):
        make().unpack(unsigned)
    with pytest.raises(ProtocolError, match="truncated"):
        make().unpack(frames[:3])
    with pytest.raises(ProtocolError, match="delimiter"):
        make().unpack([b"\x00garbage", b"more"])
    with pytest.raises(ProtocolError):
        make().unpack([DELIM])


def test_frame_boundaries_are_signed():
    s = make()
    frames = s.pack("x", {}, buffers=[b"ab", b"c"])
    moved = frames[:-2] + [b"a", b"bc"]
    with pytest.raises(ProtocolError, match="bad signature"):
        make().unpack(moved)


def test_replay_rejected():
    s, r = make(), make()
    frames = s.pack("x", {"n": 1})
    r.unpack(frames)
    with pytest.raises(ProtocolError, match="replay"):
        r.unpack(frames)


def test_replay_guard_bounded():
    g = ReplayGuard(size=100)
    for i in range(1000):
        assert g.check(str(i).encode())
    assert len(g._seen) <= 100
    assert not g.check(b"999")


def test_big_frames_signed_in_chunks_and_tamper_detected():
    s = make()
    big = bytearray(BIG_FRAME * 3 + 17)
    frames = s.pack("x", {}, buffers=[memoryview(big)])
    make().unpack(frames)
    big[BIG_FRAME * 2 + 5] ^= 1
    with pytest.raises(ProtocolError, match="bad signature"):
        make().unpack(frames)


def test_malformed_json_and_missing_fields():
    s = make()
    body = [b"not json", b"{}", b"{}"]
    frames = [DELIM, s.signer.sign(body), *body]
    with pytest.raises(ProtocolError, match="JSON"):
        make().unpack(frames)
    body = [b'{"msg_id": "1"}', b"{}", b"{}"]
    frames = [DELIM, s.signer.sign(body), *body]
    with pytest.raises(ProtocolError, match="msg_type"):
        make().unpack(frames)


def test_split_idents():
    assert split_idents([b"a", b"b", DELIM, b"s", b"h"]) == ([b"a", b"b"], [b"s", b"h"])


def test_routing_signature_for_big_payloads():
    s = make()
    big = bytes(BIG_FRAME)
    frames = s.pack("apply_request", {}, buffers=[big])
    assert b":" in frames[1]
    make().unpack(frames)                      # full check passes
    tampered = list(frames)
    tampered[-1] = b"\x01" + big[1:]
    make().verify(tampered[1:], routing=True)  # the router only vouches for the header
    with pytest.raises(ProtocolError, match="bad signature"):
        make().unpack(tampered)                # an unpickler never accepts it
    bad_head = list(frames)
    bad_head[2] = bad_head[2].replace(b"apply_request", b"apply_requesX")
    with pytest.raises(ProtocolError, match="bad signature"):
        make().verify(bad_head[1:], routing=True)
    small = s.pack("x", {}, buffers=[b"small"])
    assert b":" not in small[1]
