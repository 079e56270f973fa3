"""A task's log records reach the submitting client's logging, as from a process pool.

Real cluster (the module's shared one); the client's side is a handler on a test logger
in this process.  Forged messages to the client are plain frames on a PUB socket.
"""

from __future__ import annotations

import json
import logging
import os
import threading

import pytest
import zmq

from conftest import wait_until
from zexec import LocalCluster, ZmqExecutor
from zexec.errors import ProtocolError
from zexec.protocol import DELIM, Session, Signer, check_content

LOGGER = "zexec_test_logfwd"  # not under "zexec": a user's logger


def warn(text):
    logging.getLogger(LOGGER).warning("task says %s", text)
    return os.getpid()


def log_exception():
    try:
        1 / 0
    except ZeroDivisionError:
        logging.getLogger(LOGGER).exception("it failed")


def debug_and_info(tag):
    lg = logging.getLogger(LOGGER + ".lv")
    lg.setLevel(logging.DEBUG)  # the engine's side lets both through; the client decides
    lg.debug("debug %s", tag)
    lg.info("info %s", tag)


def log_debug(tag):
    logging.getLogger(LOGGER + ".inherit").debug("debug %s", tag)


def many_and_threaded(n):
    lg = logging.getLogger(LOGGER)
    t = threading.Thread(target=lg.warning, args=("from a thread",))
    t.start()
    t.join()
    for i in range(n):
        lg.warning("many %d", i)


def zexec_own(tag):
    logging.getLogger("zexec.engine").warning("zexec-own %s", tag)
    logging.getLogger(LOGGER).warning("after-own %s", tag)


class Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)

    def messages(self):
        return [r.getMessage() for r in list(self.records)]

    def wait_for(self, text):
        wait_until(lambda: text in self.messages(), 30, what=f"record {text!r}")
        return next(r for r in list(self.records) if r.getMessage() == text)


@pytest.fixture
def ex(cluster):
    ex = ZmqExecutor(connection=cluster.connection_file)
    yield ex
    ex.shutdown(wait=True, cancel_futures=True)


@pytest.fixture
def collect():
    """A handler on LOGGER in this process (the client's side), the logger at WARNING."""
    lg = logging.getLogger(LOGGER)
    h = Collect()
    old = lg.level
    lg.setLevel(logging.WARNING)
    lg.addHandler(h)
    yield h
    lg.removeHandler(h)
    lg.setLevel(old)


def _engine_log(ex, eid) -> str:
    path = ex.client.engine_info(eid)["log"]
    with open(path, errors="replace") as f:
        return f.read()


def test_task_warning_reaches_client_logger_marked_with_its_engine(ex, collect):
    pid = ex.submit(warn, "hello").result(30)
    rec = collect.wait_for("task says hello")
    assert rec.name == LOGGER and rec.levelno == logging.WARNING and rec.levelname == "WARNING"
    assert rec.process == pid != os.getpid()
    assert rec.engine in ex.engines and rec.processName == f"zexec-engine-{rec.engine}"
    assert rec.funcName == "warn" and rec.lineno > 0
    # a formatter of this process formats it as its own record
    text = logging.Formatter("%(processName)s %(name)s %(levelname)s %(message)s").format(rec)
    assert text == f"zexec-engine-{rec.engine} {LOGGER} WARNING task says hello"


def test_records_are_handled_before_the_future_resolves(ex, collect):
    """They travel in the task's reply: no record comes after its result, load-balanced,
    direct or in a map's batch (a program that ends on its last result loses none)."""
    eng = ex.engine(ex.engines[0])
    for i in range(40):
        ex.submit(warn, f"lb {i}").result(30)
        eng.submit(warn, f"direct {i}").result(30)
        assert {f"task says lb {i}", f"task says direct {i}"} <= set(collect.messages())
    for i, _ in enumerate(ex.map(warn, [f"map {j}" for j in range(20)])):
        assert f"task says map {i}" in collect.messages()


def test_logged_exception_carries_its_traceback_text(ex, collect):
    ex.submit(log_exception).result(30)
    rec = collect.wait_for("it failed")
    assert rec.levelno == logging.ERROR
    assert "Traceback" in rec.exc_text and "ZeroDivisionError: division by zero" in rec.exc_text
    assert "ZeroDivisionError" in logging.Formatter().format(rec)


def test_client_logger_level_filters_forwarded_records(ex, collect):
    lg = logging.getLogger(LOGGER + ".lv")
    lg.setLevel(logging.INFO)
    try:
        ex.submit(debug_and_info, "a").result(30)
        collect.wait_for("info a")  # sent after the debug record, in the same message
        assert "debug a" not in collect.messages()
        lg.setLevel(logging.DEBUG)
        ex.submit(debug_and_info, "b").result(30)
        collect.wait_for("info b")
        assert "debug b" in collect.messages()
    finally:
        lg.setLevel(logging.NOTSET)


def test_many_records_and_a_threads_come_back_in_order(ex, collect):
    """Past 500 records the engine sends them while the task runs: none is lost or
    reordered; a record of a thread the task started comes back too."""
    ex.submit(many_and_threaded, 1200).result(30)
    collect.wait_for("many 1199")
    got = [m for m in collect.messages() if m.startswith("many ") or m == "from a thread"]
    assert got == ["from a thread"] + [f"many {i}" for i in range(1200)]


def test_zexec_own_records_stay_in_the_engine_log(ex, collect):
    ours = Collect()
    logging.getLogger("zexec").addHandler(ours)
    try:
        eid = ex.engines[0]
        ex.engine(eid).submit(zexec_own, "x1").result(30)
        collect.wait_for("after-own x1")
        assert not [m for m in ours.messages() if "zexec-own" in m]
        wait_until(lambda: "zexec-own x1" in _engine_log(ex, eid), 30, what="the engine's log")
        assert "after-own x1" not in _engine_log(ex, eid)
    finally:
        logging.getLogger("zexec").removeHandler(ours)


def test_forward_output_false_keeps_records_in_the_engine_log(cluster, ex, collect):
    eid = ex.engines[0]
    quiet = ZmqExecutor(connection=cluster.connection_file, forward_output=False)
    try:
        quiet.engine(eid).submit(warn, "quietly").result(30)
        wait_until(lambda: "task says quietly" in _engine_log(ex, eid), 30, what="the engine's log")
    finally:
        quiet.shutdown(wait=True)
    # the forwarding client still gets its own, and never the other one's
    ex.engine(eid).submit(warn, "loudly").result(30)
    collect.wait_for("task says loudly")
    assert "task says quietly" not in collect.messages()
    assert "task says loudly" not in _engine_log(ex, eid)


@pytest.mark.timeout(120)
def test_forked_engines_keep_the_programs_levels_so_its_debug_records_reach_it(no_leaks):
    """basicConfig(level=DEBUG) before the cluster starts: a task's debug record of a
    logger with no level of its own is logged on the engine (its root level is the
    program's, not zexec's INFO) and handled here, as in a fork pool's worker."""
    root = logging.getLogger()
    old = root.level
    lg = logging.getLogger(LOGGER + ".inherit")
    h = Collect()
    lg.addHandler(h)
    root.setLevel(logging.DEBUG)  # what basicConfig(level=DEBUG) does to the levels
    try:
        with LocalCluster(1, start_method="fork") as ex:
            ex.submit(log_debug, "inherited").result(30)
            rec = h.wait_for("debug inherited")
            assert rec.levelno == logging.DEBUG and rec.name == LOGGER + ".inherit"
    finally:
        root.setLevel(old)
        lg.removeHandler(h)


def _record(msg, **over):
    return {"name": LOGGER, "levelno": logging.WARNING, "levelname": "WARNING", "msg": msg, **over}


def test_log_content_schema_checks_every_record():
    """Plain data: what the client accepts before it rebuilds a single record."""
    check_content("log", {"records": [_record("m", lineno=3, exc_text=None, created=1.5)],
                          "msg_id": "x-1", "engine": 0})
    for bad in ("text", [1], [_record("m", name=None)], [{"name": "n", "levelno": 30}],
                [_record("m"), _record("m", levelno=1.5)], [_record("m", exc_text=["tb"])],
                [_record("m", created="now")]):
        with pytest.raises(ProtocolError):
            check_content("log", {"records": bad})
    with pytest.raises(ProtocolError):
        check_content("log", {})


@pytest.mark.parametrize("bad", ["unsigned", "records not a list", "name not a string",
                                 "no msg", "levelno a string"])
def test_malformed_or_unsigned_log_message_is_dropped_and_logged(cluster, collect, caplog, bad):
    info = cluster.ex.client.info
    ex = ZmqExecutor(connection=cluster.connection_file)  # a fresh client: its first drop is logged
    me = Session(info.key_bytes)
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.linger = 0
    try:
        topic = ex.client.session.session.encode()
        mon = pub.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        pub.connect(info.url("iopub_engine"))
        assert mon.poll(10_000)
        pub.disable_monitor()
        mon.close(linger=0)
        n = iter(range(10**6))

        def probe():
            # a PUB drops what goes before the device's subscription reaches it: send
            # a valid record until one arrives, then everything after is in order
            pub.send_multipart(me.pack("log", {"records": [_record(f"probe {next(n)}")]},
                                       idents=[topic]))
            return any(m.startswith("probe") for m in collect.messages())

        wait_until(probe, 30, what="a forged valid record")
        content = {"records": [_record("bad one")]}
        if bad == "records not a list":
            content = {"records": _record("bad one")}
        elif bad == "name not a string":
            content["records"][0]["name"] = ["a list"]
        elif bad == "no msg":
            del content["records"][0]["msg"]
            content["records"].append(_record("bad one"))
        elif bad == "levelno a string":
            content["records"][0]["levelno"] = "30"
        body = [json.dumps(me.header("log")).encode(), b"{}", json.dumps(content).encode()]
        sig = b"" if bad == "unsigned" else Signer(info.key_bytes).sign(body)
        with caplog.at_level(logging.WARNING, logger="zexec.client"):
            pub.send_multipart([topic, DELIM, sig, *body])
            pub.send_multipart(me.pack("log", {"records": [_record("after the bad one")]},
                                       idents=[topic]))
            collect.wait_for("after the bad one")
        assert "bad one" not in collect.messages()
        drops = [r.getMessage() for r in caplog.records if r.name == "zexec.client"]
        assert any("dropped bad message (iopub)" in m for m in drops), drops
        assert ex.submit(pow, 2, 5).result(30) == 32  # the client goes on
    finally:
        pub.close(linger=0)
        ctx.term()
        ex.shutdown(wait=True)
