"""Keys and encryption: a wrong HMAC key or missing Curve keys get nothing; loopback by default."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import psutil
import pytest

from test_launch import no_leaks, start_controller, stop_process  # noqa: F401 - fixtures
from zexec import ClusterLostError, ZmqExecutor
from zexec.connection import ConnectionInfo


def _variant(path, tmp_path, name, **changes):
    d = json.loads(open(path).read())
    d.update(changes)
    out = tmp_path / name
    ConnectionInfo.from_dict(d).write(str(out))
    return str(out)


def _controller_log_has(path, text, timeout=10.0):
    """Wait until the controller's log (written by start_controller) shows ``text``."""
    from conftest import wait_until

    def seen():
        with open(str(path) + ".log", errors="replace") as f:
            return text in f.read()

    try:
        wait_until(seen, timeout, what=repr(text))
        return True
    except AssertionError:
        return False


@pytest.fixture
def ctl(tmp_path, no_leaks):  # noqa: F811
    path = tmp_path / "cluster.json"
    proc = start_controller(path, "--curve")
    yield str(path), proc
    stop_process(proc)


def _engine(path):
    return subprocess.Popen([sys.executable, "-m", "zexec", "engine", "--connection-file", path, "-n", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_file_is_private_and_controller_binds_loopback(ctl):
    path, proc = ctl
    assert os.stat(path).st_mode & 0o777 == 0o600
    info = ConnectionInfo.read(path)
    assert info.ip == "127.0.0.1" and info.curve
    from conftest import wait_until

    def listening():
        tree = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
        return [c.laddr for p in tree for c in p.net_connections("tcp") if c.status == psutil.CONN_LISTEN]

    wait_until(lambda: len(listening()) >= len(info.addresses), 20, what="every socket bound")
    assert all(a.ip == "127.0.0.1" for a in listening()), listening()


def test_curve_cluster_serves_key_holders(ctl):
    path, _ = ctl
    eng = _engine(path)
    try:
        with ZmqExecutor(connection=path) as ex:
            ex.client.wait_for_engines(1, 30)
            assert ex.submit(pow, 3, 4).result(30) == 81
    finally:
        stop_process(eng)


@pytest.mark.parametrize("how", ["no curve keys", "other cluster's curve keys"])
def test_without_curve_keys_nothing_connects(ctl, tmp_path, how):
    from zexec.connection import new_curve_keys

    path, _ = ctl
    bad = _variant(path, tmp_path, "bad.json", curve=None if how == "no curve keys" else new_curve_keys())
    with pytest.raises(ClusterLostError, match="no answer"):
        ZmqExecutor(connection=bad, timeout=2)


def test_wrong_hmac_key_cannot_register_or_submit_and_is_logged(tmp_path, no_leaks):  # noqa: F811
    path = str(tmp_path / "cluster.json")
    proc = start_controller(path)  # no curve: the HMAC key alone must keep them out
    try:
        bad = _variant(path, tmp_path, "wrong.json", key="0" * 64)
        with pytest.raises(ClusterLostError, match="no answer"):
            ZmqExecutor(connection=bad, timeout=2)
        assert _controller_log_has(path, "bad signature")
        eng = _engine(bad)
        try:
            from conftest import wait_until

            reg_port = ConnectionInfo.read(path).addresses["registration"]

            def engine_connected():
                procs = [psutil.Process(eng.pid)] + psutil.Process(eng.pid).children(recursive=True)
                return any(c.raddr and c.raddr.port == reg_port and c.status == psutil.CONN_ESTABLISHED
                           for p in procs for c in p.net_connections("tcp"))

            wait_until(engine_connected, 30, what="the wrong-key engine to reach the registrar")
            with ZmqExecutor(connection=path) as ex:
                # its registration request was dropped (logged) and never answered
                assert ex.status()["engines"] == []
                assert eng.poll() is None  # still waiting, registered nowhere
        finally:
            stop_process(eng)
    finally:
        stop_process(proc)
