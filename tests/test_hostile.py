"""Hostile and careless input (issue 12, findings 9-15): no hang, no crash, no leak.

Protocol and policy cases on plain frames and plain data; the rest against real
clusters, some over tcp (where any local user can reach the ports without the key).
"""

from __future__ import annotations

import json
import os
import stat
import time

from zexec import connection
from zexec.connection import ConnectionInfo, new_key


def test_connection_file_temp_is_exclusive_and_private(tmp_path, monkeypatch):
    """Another user who pre-creates the temporary file must not receive the key (15)."""
    path = tmp_path / "cluster.json"
    info = ConnectionInfo(key=new_key())
    # the names the writer may pick: the old fixed one, and a "random" one we predict
    names = iter(["aaaa", "bbbb"])
    monkeypatch.setattr(connection.secrets, "token_hex", lambda n: next(names))
    traps = [f"{path}.{os.getpid()}.tmp", f"{path}.aaaa.tmp"]
    readers = []
    for t in traps:
        with open(t, "w"):
            pass
        os.chmod(t, 0o644)
        readers.append(open(t))
    try:
        info.write(str(path))
        for r in readers:
            assert info.key not in r.read(), "the key went into a file someone else created"
    finally:
        for r in readers:
            r.close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert json.loads(path.read_text())["key"] == info.key
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["cluster.json", *(os.path.basename(t) for t in traps)])


# -- helpers ---------------------------------------------------------------------------

import psutil  # noqa: E402
import pytest  # noqa: E402
import zmq  # noqa: E402

import tasks  # noqa: E402
from conftest import wait_until  # noqa: E402
from zexec import LocalCluster  # noqa: E402
from zexec.protocol import DELIM, Session, Signer, dumps  # noqa: E402

LONE = "\ud800"  # half of a UTF-16 pair: JSON can carry it, UTF-8 cannot


def forge(info, header, content=None, parent=None, idents=(), buffers=()):
    """A message signed with the cluster key whatever its JSON holds (a careless key holder)."""
    def enc(v):
        return v if isinstance(v, bytes) else dumps(v if v is not None else {})

    body = [enc(header), enc(parent), enc(content), *buffers]
    return [*idents, DELIM, Signer(info.key_bytes).sign(body), *body]


def header(msg_type, **fields):
    h = Session(b"x").header(msg_type)
    h.update(fields)
    return h


def json_bytes(obj) -> bytes:
    """JSON with escapes (lone surrogates included), as a foreign client would send it."""
    return json.dumps(obj).encode()


def cluster_pids(c) -> set:
    ctl = psutil.Process(c.procs["controller"].pid)
    return {ctl.pid, *(p.pid for p in ctl.children(recursive=True))}


def assert_serves(c, pids=None):
    """New tasks of both kinds complete, status() answers, and no process died."""
    ex = c.ex
    assert ex.submit(tasks.mul, 6, 7).result(30) == 42
    for e in ex.engines:
        assert ex.engine(e).submit(tasks.mul, e, 2).result(30) == 2 * e
    st = ex.status()
    assert sorted(e["id"] for e in st["engines"]) == sorted(ex.engines)
    if pids is not None:
        dead = [p for p in pids if not psutil.pid_exists(p)
                or psutil.Process(p).status() == psutil.STATUS_ZOMBIE]
        assert not dead, f"processes died: {dead}"


class Raw:
    """DEALER/PUB/SUB sockets of a stranger (or a careless key holder) to a cluster's addresses."""

    def __init__(self, info):
        self.info = info
        self.ctx = zmq.Context()
        self.socks = {}

    def sock(self, chan, kind=zmq.DEALER, identity=None):
        key = (chan, kind, identity)
        if key not in self.socks:
            s = self.ctx.socket(kind)
            s.linger = 0
            if identity is not None:
                s.identity = identity
            s.connect(self.info.url(chan))
            self.socks[key] = s
        return self.socks[key]

    def close(self):
        for s in self.socks.values():
            s.close(linger=0)
        self.ctx.term()


@pytest.fixture
def raw(cluster):
    r = Raw(cluster.ex.client.info)
    yield r
    r.close()


def engine_uuid(c, eid) -> bytes:
    return c.ex.client.engine_info(eid)["uuid"].encode()


def all_pids(c) -> set:
    return cluster_pids(c) | {c.ex.client.engine_info(e)["pid"] for e in c.ex.engines}


# -- with the key: one message must never take a process down (13, 14) -----------------

CARELESS = {
    # finding 13: each of these crashed the task scheduler (and so the controller) or the hub
    "list msg_id": [("task_client", header("apply_request", msg_id=["a", "list"], reply_to="nobody-r"),
                     {"fn": "", "nfn": 0})],
    "abort msg_ids 5": [("task_client", header("abort_request", reply_to="nobody-r"), {"msg_ids": 5})],
    "abort msg_ids nested": [("task_client", header("abort_request", reply_to="nobody-r"),
                              {"msg_ids": [["a"]]})],
    "list header to task_client": [("task_client", ["a", "JSON", "list"], {})],
    "list header to task_engine": [("task_engine", ["a", "JSON", "list"], {})],
    "list parent_id in apply_reply": [("task_engine as engine", header("apply_reply", parent_id=["x"], status="ok"), {})],
    "max_tasks lots": [
        ("registration", header("registration_request"), {"uuid": "careless-1", "max_tasks": "lots", "pid": 1}),
        ("registration", header("registration_complete"), {"uuid": "careless-1"}),
        ("registration", header("heart_beating"), {"uuid": "careless-1"})],
    "lone surrogate uuid": [
        ("registration", header("registration_request"), json_bytes({"uuid": "careless-" + LONE, "pid": 2})),
        ("registration", header("registration_complete"), json_bytes({"uuid": "careless-" + LONE})),
        ("registration", header("heart_beating"), json_bytes({"uuid": "careless-" + LONE}))],
    # finding 14: each of these killed the engine or its watcher thread
    "request without msg_id": [("mux_client", {"msg_type": "apply_request", "reply_to": "nobody-r"},
                                {"fn": "", "nfn": 0})],
    "resend msg_ids 7": [("mux_client", header("resend_request", reply_to="nobody-r"), {"msg_ids": 7})],
}


@pytest.mark.parametrize("case", sorted(CARELESS), ids=lambda c: c.replace(" ", "_"))
def test_wrongly_typed_signed_message_is_dropped(cluster, raw, case):
    """13, 14: a signed but wrongly typed message is dropped and logged; nothing crashes."""
    info = cluster.ex.client.info
    pids = all_pids(cluster)
    eng = engine_uuid(cluster, cluster.ex.engines[0])
    for chan, hdr, content in CARELESS[case]:
        idents = [eng] if chan == "mux_client" else []
        chan, _, as_engine = chan.partition(" as ")
        sock = raw.sock(chan, identity=eng if as_engine else None)
        sock.send_multipart(forge(info, hdr, content, idents=idents))
    assert_serves(cluster, pids)


def test_engine_watcher_survives_a_bad_resend_request(cluster, raw):
    """14: the watcher thread reads the sockets while a task runs; a resend_request whose
    msg_ids is 7 killed it, and later long tasks were never reported running."""
    ex = cluster.ex
    eid = ex.engines[-1]
    view = ex.engine(eid)
    f1 = view.submit(tasks.sleep, 1.0)
    wait_until(f1.running, 20, what="the first task to be reported running")
    raw.sock("mux_client").send_multipart(forge(
        ex.client.info, header("resend_request", reply_to="nobody-r"), {"msg_ids": 7},
        idents=[engine_uuid(cluster, eid)]))
    f2 = view.submit(tasks.sleep, 1.0)
    wait_until(f2.running, 20, what="the watcher to report the next task running")
    assert f1.result(30) == 1.0 and f2.result(30) == 1.0


@pytest.mark.timeout(90)
def test_engine_drops_a_shutdown_request_whose_content_is_not_an_object(cluster, raw):
    """A signed shutdown_request whose content is a JSON string (one of the fuzz test's
    whole-frame cases) shut the engine down: the fuzz test's MUX probe then went
    unanswered whenever its copy on control overtook the one on MUX (the replay guard
    drops the second).  Malformed, it is dropped: the engine goes on serving."""
    ex = cluster.ex
    eid = ex.engines[0]
    eng = engine_uuid(cluster, eid)
    pid = ex.client.engine_info(eid)["pid"]
    sock = raw.sock("control_client")
    sock.send_multipart(forge(ex.client.info, header("shutdown_request"), b'"s"', parent=b"[1]",
                              idents=[eng]))
    # a question behind it on the same connection: answered once the engine has handled it
    probe = Session(ex.client.info.key_bytes).pack("abort_request", {"msg_ids": ["probe"]},
                                                   idents=[eng])
    sock.send_multipart(probe)
    assert sock.poll(30_000), "no answer to the probe behind the shutdown_request"
    sock.recv_multipart()
    assert ex.engine(eid).submit(os.getpid).result(30) == pid


# -- status() and the hub's task table (12) ---------------------------------------------

def _monitor_copy(status) -> list:
    hdr = {"msg_type": "apply_reply", "msg_id": "m", "parent_id": "p", "status": status}
    return [zmq.Frame(f) for f in (b"mux_out", b"client-r", b"engine", DELIM, b"",
                                   json_bytes(hdr), b"{}", b"{}")]


def test_hub_counts_only_known_statuses():
    """12: unsigned copies on the monitor set the status words status() counts: a lone
    surrogate broke every later status(), and distinct words grew the table for good."""
    from zexec.controller.hub import Hub

    hub = Hub(ConnectionInfo(key=new_key()))
    hub._on_monitor(_monitor_copy("ok"))
    hub._on_monitor(_monitor_copy(LONE))
    for i in range(20_000):
        hub._on_monitor(_monitor_copy(f"word-{i}"))
    hub._on_monitor(_monitor_copy(["a", "list"]))
    assert hub.counts["ok"] == 1
    assert len(hub.counts) <= 6, sorted(hub.counts)[:10]
    dumps({"tasks": dict(hub.counts)})  # what queue_reply sends: it must encode


# -- without the key, over tcp (any local user can reach the ports) ---------------------

@pytest.fixture(scope="module")
def tcp_cluster():
    """A LocalCluster over tcp on loopback, whose ports every local user can reach."""
    c = LocalCluster(2, transport="tcp", heartbeat_period=0.25, heartbeat_misses=8)
    c.ex = c.__enter__()
    yield c
    c.__exit__(None, None, None)


@pytest.fixture
def tcp_raw(tcp_cluster):
    r = Raw(tcp_cluster.ex.client.info)
    yield r
    r.close()


def _connected(sock, chan, info):
    """Connect ``sock`` to ``chan`` and wait for its handshake (bounded)."""
    mon = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
    try:
        sock.connect(info.url(chan))
        assert mon.poll(10_000), f"no handshake with {chan}"
    finally:
        sock.disable_monitor()
        mon.close(linger=0)
    return sock


@pytest.mark.timeout(120)
def test_engine_identity_cannot_be_taken_over(tcp_cluster, tcp_raw):
    """9: a stranger's DEALER with an engine's identity (read off the notification feed)
    on task_engine and mux_engine took that engine's route: 5 of 5 futures hung."""
    ex = tcp_cluster.ex
    info = ex.client.info
    pids = all_pids(tcp_cluster)
    eid = ex.engines[0]
    uuid = engine_uuid(tcp_cluster, eid)
    thieves = []
    for chan in ("task_engine", "mux_engine", "control_engine", "hb_pong", "registration"):
        s = tcp_raw.ctx.socket(zmq.DEALER)
        s.linger = 0
        s.identity = uuid
        thieves.append(_connected(s, chan, info))
    try:
        lb = [ex.submit(tasks.mul, i, 2) for i in range(10)]
        direct = [ex.engine(eid).submit(tasks.mul, i, 3) for i in range(5)]
        assert [f.result(30) for f in lb] == [2 * i for i in range(10)]
        assert [f.result(30) for f in direct] == [3 * i for i in range(5)]
        assert_serves(tcp_cluster, pids)
        for s in thieves:
            assert not s.poll(0), "a stranger received a message meant for the engine"
    finally:
        for s in thieves:
            s.close(linger=0)


@pytest.mark.parametrize("chan", ["mux_client", "mux_engine"])
def test_lone_delimiter_on_the_mux_loses_no_task(cluster, raw, chan):
    """10: ``[b"<IDS|MSG>"]`` makes the C device glue the next request (or reply) onto it;
    the hub found no delimiter where it looked, reported nothing lost, and 5 of 5 direct
    tasks hung.  The lost message is found by its signature and recovered."""
    ex = cluster.ex
    view = ex.engine(ex.engines[1])
    s = _connected(raw.ctx.socket(zmq.DEALER), chan, ex.client.info)
    raw.socks[("lone", chan)] = s
    for i in range(5):
        s.send(DELIM)
        f = view.submit(tasks.sleep, 0.05 * i)
        assert f.result(30) == 0.05 * i


@pytest.mark.timeout(120)
def test_one_frame_junk_on_the_mux_hangs_no_future(cluster, raw):
    """10: random one-frame junk between direct tasks: every future resolves (with its
    value, or ZexecError once recovery gave up), none hangs."""
    import random
    from concurrent.futures import wait

    from zexec.errors import ZexecError

    rng = random.Random(10)
    ex = cluster.ex
    view = ex.engine(ex.engines[1])
    s = _connected(raw.ctx.socket(zmq.DEALER), "mux_client", ex.client.info)
    raw.socks[("junk", "mux_client")] = s
    fs = []
    for i in range(200):
        s.send(rng.choice([DELIM, b"", os.urandom(rng.randint(1, 40))]))
        fs.append(view.submit(tasks.mul, i, 2))
    done, pending = wait(fs, timeout=60)
    assert not pending, f"{len(pending)} of {len(fs)} futures hung"
    for i, f in enumerate(fs):
        e = f.exception()
        assert e is None and f.result() == 2 * i or isinstance(e, ZexecError), e
    assert_serves(cluster)


FLOODER = r"""
import sys, time, zmq
url, kind, secs = sys.argv[1], sys.argv[2], float(sys.argv[3])
ctx = zmq.Context()
s = ctx.socket(zmq.DEALER if kind == "pong" else zmq.XSUB)
s.linger = 0
s.sndhwm = 0
s.connect(url)
stop = time.monotonic() + secs
i = 0
while time.monotonic() < stop:
    for _ in range(500):
        i += 1
        if kind == "pong":
            s.send(b"1")
        elif kind == "distinct":
            s.send(b"\x01" + i.to_bytes(6, "little"))
        else:
            s.send(b"\x01hub_beat" if kind == "same" else b"\x01")
        if i % 5000 == 0:
            s.send(b"\x01" + b"x" * 200)  # a long topic: its sender is cut off (and reconnects)
s.close()
ctx.term()
"""


def _listener(c, port):
    for p in psutil.Process(c.procs["controller"].pid).children(recursive=True):
        if any(k.status == "LISTEN" and k.laddr.port == port for k in p.net_connections("tcp")):
            return p
    raise AssertionError(f"no process listens on port {port}")


@pytest.mark.timeout(120)
def test_subscription_and_pong_floods_cost_no_memory_and_no_engine(tcp_cluster):
    """11: floods of subscriptions (notification, hb_ping) and pongs (hb_pong): drains are
    bounded and fair, memory stays flat, engines keep beating, the cluster keeps serving."""
    import subprocess
    import sys

    ex = tcp_cluster.ex
    info = ex.client.info
    pids = all_pids(tcp_cluster)
    engines = {e: ex.client.engine_info(e)["pid"] for e in ex.engines}
    hub = _listener(tcp_cluster, info.addresses["registration"])
    heart = _listener(tcp_cluster, info.addresses["hb_ping"])
    rss0 = {p.pid: p.memory_info().rss for p in (hub, heart)}
    floods = [("notification", "same"), ("notification", "distinct"), ("hb_ping", "empty"),
              ("hb_pong", "pong")]
    secs = 4.0
    procs = [subprocess.Popen([sys.executable, "-c", FLOODER, info.url(chan), kind, str(secs)])
             for chan, kind in floods]
    try:
        # the cluster serves through the flood, tasks of both kinds
        done = 0
        while any(p.poll() is None for p in procs):
            assert ex.submit(tasks.mul, done, 2).result(30) == 2 * done
            assert ex.engine(ex.engines[0]).submit(tasks.mul, done, 3).result(30) == 3 * done
            done += 1
        assert done >= 2
    finally:
        for p in procs:
            p.kill()
            p.wait()
    grown = {pid: (psutil.Process(pid).memory_info().rss - rss0[pid]) >> 20 for pid in rss0}
    assert max(grown.values()) < 40, f"MB grown (hub {hub.pid}, heartbeat {heart.pid}): {grown}"
    assert {e: ex.client.engine_info(e)["pid"] for e in ex.engines} == engines, "engines were replaced"
    assert ex.client._broken is None
    assert_serves(tcp_cluster, pids)


# -- the fuzz test: every message type, wrongly typed, signed, to every socket ----------

NESTED = "__nested__"
WRONG = [["a", "list"], {"a": "dict"}, 7, None, LONE, 10 ** 30, True, NESTED, [[["x"]]], ""]

#: message type -> (header fields, content): every field some receiver reads
TEMPLATES = {
    "apply_request": ({"reply_to": "fuzz-r", "retries": 0}, {"fn": "", "nfn": 1, "chunk": False, "shm": []}),
    "abort_request": ({"reply_to": "fuzz-r"}, {"msg_ids": ["fuzz-x"]}),
    "resend_request": ({"reply_to": "fuzz-r"}, {"msg_ids": ["fuzz-x"]}),
    "registration_request": ({}, {"uuid": "fuzz-u", "hostname": "h", "pid": 1, "log": "l",
                                  "launcher": "fuzz-l", "max_tasks": 1}),
    "registration_complete": ({}, {"uuid": "fuzz-u"}),
    "heart_beating": ({}, {"uuid": "fuzz-u"}),
    "heart_failure": ({}, {"uuid": "fuzz-u", "reason": "r"}),
    "unregistration_notification": ({}, {"uuid": "fuzz-u", "reason": "r", "exitcode": 0, "fatal": False}),
    "engine_exit": ({}, {"launcher": "fuzz-l", "pid": 1, "exitcode": 0}),
    "connection_request": ({}, {}),
    "queue_request": ({}, {}),
    "shutdown_request": ({}, {}),
    "apply_reply": ({"parent_id": "fuzz-x", "status": "error", "engine": 0, "started": 1.0,
                     "completed": 2.0, "elapsed": 1.0},
                    {"status": "error", "ename": "E", "evalue": "v", "engine": {"id": 0}}),
    "abort_reply": ({}, {"aborted": ["fuzz-x"], "not_found": ["fuzz-y"]}),
    "resend_reply": ({}, {"missing": ["fuzz-x"]}),
    "status": ({"parent_id": "fuzz-x"}, {"state": "started", "msg_id": "fuzz-x"}),
    "stream": ({}, {"name": "stdout", "text": "t"}),
    "log": ({}, {"records": [{"name": "fuzz", "levelno": 30, "msg": "m", "lineno": 1}], "msg_id": "fuzz-x",
                 "engine": 0}),
    "lost_message": ({}, {"msg_id": "fuzz-x", "device": "mux_in"}),
    "hub_beat": ({}, {"engines": {}, "pending": [], "next_id": 0}),
    "unregistered": ({}, {"uuid": "fuzz-u"}),
    "give_back": ({}, {"msg_id": "fuzz-x", "nidents": 1}),
    "give_back_reply": ({}, {"msg_id": "fuzz-x"}),
    "interrupt_request": ({}, {"msg_id": "fuzz-x", "reason": "r", "grace": 0.1}),
}
#: a well-typed message of these types does what it says (stop the hub, add an engine):
#: they are sent only with values their schema refuses
ONLY_WRONG = {"registration_request", "shutdown_request", "unregistration_notification",
              "heart_failure", "engine_exit"}


def _encode(obj) -> bytes:
    # ASCII escapes, as any JSON library may send them: a lone surrogate travels as \ud800
    raw = json.dumps(obj).encode()
    return raw.replace(json.dumps(NESTED).encode(), b"[" * 5000 + b"]" * 5000)


def fuzz_messages(info):
    """(msg_type, field, frames after DELIM) for every field of every type, every wrong value."""
    from zexec.protocol import CONTENT, HEADER

    sign = Signer(info.key_bytes).sign
    n = 0
    for kind, (hextra, content) in TEMPLATES.items():
        for where, field in ([("header", f) for f in ("msg_id", "msg_type", "session", "date", *hextra)]
                             + [("content", f) for f in content]):
            spec = (HEADER if where == "header" else CONTENT.get(kind, {})).get(field)
            for value in WRONG:
                if kind in ONLY_WRONG and spec is not None and value != NESTED and spec[0](value):
                    continue
                n += 1
                h = {"msg_id": f"fuzz-{n}", "msg_type": kind, "session": "fuzz", "date": 1.0 + n,
                     **hextra}
                c = dict(content)
                (h if where == "header" else c)[field] = value
                body = [_encode(h), b"{}", _encode(c)]
                yield kind, field, [sign(body), *body]
    # whole frames of the wrong JSON type, and a header with nothing but its type
    for kind in TEMPLATES:
        for body in ([_encode(["list"]), b"{}", b"{}"], [_encode({"msg_type": kind}), b"{}", b"{}"],
                     [_encode({"msg_id": f"fuzz-p-{kind}", "msg_type": kind}), _encode([1]), _encode("s")]):
            yield kind, "frames", [sign(body), *body]


@pytest.mark.timeout(180)
def test_fuzz_wrongly_typed_signed_messages_on_every_socket(cluster, raw):
    """Every message type, each field replaced by a wrong type (list, dict, int, None, a
    lone surrogate, a huge int, deep nesting...), signed, to every socket: nothing
    dies, and the cluster still serves both kinds of task and status()."""
    ex = cluster.ex
    info = ex.client.info
    pids = all_pids(cluster)
    engines = {e: ex.client.engine_info(e)["pid"] for e in ex.engines}
    eng = engine_uuid(cluster, ex.engines[0])
    client_r = ex.client.reply_to.encode()
    topic = ex.client.session.session.encode()
    routes = {  # channel -> (socket type, identities in front: who it is routed to)
        "registration": (zmq.DEALER, []), "task_client": (zmq.DEALER, []),
        "task_engine": (zmq.DEALER, []), "mux_client": (zmq.DEALER, [eng]),
        "mux_engine": (zmq.DEALER, [client_r]), "control_client": (zmq.DEALER, [eng]),
        "control_engine": (zmq.DEALER, [client_r]), "iopub_engine": (zmq.PUB, [topic]),
        "notification": (zmq.XSUB, []), "hb_ping": (zmq.XSUB, []), "hb_pong": (zmq.DEALER, []),
    }
    socks = {chan: _connected(raw.ctx.socket(kind), chan, info) for chan, (kind, _) in routes.items()}
    raw.socks.update({("fuzz", c): s for c, s in socks.items()})
    messages = list(fuzz_messages(info))
    assert len(messages) > 500
    for chan, (kind, idents) in routes.items():
        for _kind, _field, frames in messages:
            socks[chan].send_multipart([*idents, DELIM, *frames])
    # a question behind them on the same connection is answered only once the receiver
    # has handled every fuzz message before it (one pipe, in order)
    me = Session(info.key_bytes)
    probes = {"registration": me.pack("connection_request", {}),
              "task_client": me.pack("abort_request", {"msg_ids": ["probe"]}),
              "mux_client": me.pack("resend_request", {"msg_ids": ["probe"]}, idents=[eng]),
              "control_client": me.pack("abort_request", {"msg_ids": ["probe"]}, idents=[eng])}
    check = Session(info.key_bytes, check_replay=False)
    for chan, frames in probes.items():
        s = socks[chan]
        want = check.unpack(frames).header["msg_id"]
        while s.poll(0):
            s.recv_multipart()  # answers to valid fuzz queries
        s.send_multipart(frames)
        deadline = time.monotonic() + 60
        while True:
            assert s.poll(max(0, int((deadline - time.monotonic()) * 1000))), f"{chan}: no answer"
            try:
                reply = check.unpack(s.recv_multipart())
            except Exception:  # noqa: BLE001 - answers to fuzz, in any shape
                continue
            if reply.parent.get("msg_id") == want or \
                    reply.content.get("not_found") == ["probe"] or reply.content.get("missing") == ["probe"]:
                break
    assert_serves(cluster, pids)
    assert {e: ex.client.engine_info(e)["pid"] for e in ex.engines} == engines
    assert ex.client._broken is None
    assert not [m for m, (f, _) in ex.client._futures.items() if not f.done()]
