"""The command line as a user runs it: every error is one clear line and a non-zero exit.

Each test runs ``python -m zexec ...`` as a subprocess.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import subprocess
import sys
import time

import pytest

from conftest import wait_until
from zexec.connection import ConnectionInfo, allocate, new_key

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT)


def zexec(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zexec", *args], env=ENV, timeout=timeout,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True)


def assert_one_line_error(r: subprocess.CompletedProcess, command: str, *words: str) -> None:
    assert r.returncode != 0, r
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"zexec {command}: error: "), r.stderr
    for w in words:
        assert w in lines[0], r.stderr


@pytest.fixture
def stale_file(tmp_path):
    """A connection file whose controller is gone: nobody listens at its addresses."""
    path = tmp_path / "stale.json"
    allocate(ConnectionInfo(key=new_key(), transport="tcp", ip="127.0.0.1")).write(str(path))
    return str(path)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("command", ["status", "stop"])
def test_stale_connection_file_is_one_line(no_leaks, stale_file, command):
    r = zexec(command, "--connection-file", stale_file)
    assert_one_line_error(r, command, "no answer from the controller", "stale")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("command", ["status", "stop", "engine"])
def test_missing_connection_file_is_one_line(no_leaks, tmp_path, command):
    path = str(tmp_path / "nowhere.json")
    r = zexec(command, "--connection-file", path)
    assert_one_line_error(r, command, "no connection file", path)


@pytest.mark.timeout(60)
def test_connection_file_that_is_not_one_is_one_line(no_leaks, tmp_path):
    path = tmp_path / "junk.json"
    path.write_text("not json")
    r = zexec("status", "--connection-file", str(path))
    assert_one_line_error(r, "status", "not a zexec connection file")


@pytest.mark.timeout(60)
def test_controller_in_a_missing_directory_is_one_line(no_leaks, tmp_path):
    path = str(tmp_path / "missing" / "c.json")
    r = zexec("controller", "--connection-file", path)
    assert_one_line_error(r, "controller", "no directory", str(tmp_path / "missing"))


@pytest.mark.timeout(60)
def test_engine_on_a_stale_file_says_so(no_leaks, stale_file):
    # it waits for a controller that may still be starting, but says at once that
    # none answers, instead of staying silent for 30 s
    proc = subprocess.Popen([sys.executable, "-m", "zexec", "engine", "--connection-file", stale_file],
                            env=ENV, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    seen = b""
    sel = selectors.DefaultSelector()
    sel.register(proc.stderr, selectors.EVENT_READ)
    try:
        deadline = time.monotonic() + 20
        while b"no controller answers" not in seen:
            left = deadline - time.monotonic()
            assert left > 0 and sel.select(left), f"no warning in 20 s: {seen!r}"
            chunk = os.read(proc.stderr.fileno(), 4096)
            assert chunk, f"engine set exited ({proc.wait(5)}): {seen!r}"
            seen += chunk
        assert b"stale" in seen, seen
    finally:
        sel.close()
        proc.terminate()
        proc.wait(10)
        proc.stderr.close()


def start_controller(path: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "zexec", "controller", "--connection-file", path],
                            env=ENV, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()  # the ready line (or "" if it exited)
    assert "zexec controller running" in line, (line, proc.poll())
    return proc


@pytest.mark.timeout(90)
def test_stop_ends_the_controller_and_the_engine_sets(no_leaks, tmp_path):
    # a replacing engine set would restart the engines that `stop` shut down, then wait
    # for a hub that is gone; the hub's shutdown notification stops it, with exit 0
    path = str(tmp_path / "c.json")
    ctl = start_controller(path)
    eng = subprocess.Popen([sys.executable, "-m", "zexec", "engine", "--connection-file", path,
                            "-n", "2", "--replace"], env=ENV, stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        def engines():
            r = zexec("status", "--connection-file", path, "--json")
            return r.returncode == 0 and len(json.loads(r.stdout)["engines"]) == 2
        wait_until(engines, 30, interval=0.2, what="two engines")
        r = zexec("stop", "--connection-file", path)
        assert r.returncode == 0, r.stderr
        assert "stopped the controller and 2 engines" in r.stdout
        assert ctl.wait(30) == 0
        assert eng.wait(30) == 0, eng.stderr.read()
        assert "ERROR" not in eng.stderr.read()
    finally:
        for p in (eng, ctl):
            if p.poll() is None:
                p.kill()
            p.wait(10)
        eng.stderr.close()
        ctl.stdout.close()


def test_every_option_says_what_it_does():
    from zexec.__main__ import parser

    p = parser()
    subs = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subs.choices.items():
        for action in sub._actions:
            if action.help == argparse.SUPPRESS:
                continue  # internal: LocalCluster passes these
            assert action.help, f"zexec {name} {action.option_strings}: no help text"
    text = subs.choices["controller"].format_help()
    assert "(defaultzexec-cluster.json)" in "".join(text.split()), text  # wrapped at any space


@pytest.mark.timeout(90)
def test_stop_ends_zexec_local(no_leaks):
    proc = subprocess.Popen([sys.executable, "-m", "zexec", "local", "-n", "1"], env=ENV,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        assert "connection file: " in line, (line, proc.poll())
        path = line.rsplit("connection file: ", 1)[1].strip()
        r = zexec("stop", "--connection-file", path)
        assert r.returncode == 0, r.stderr
        assert proc.wait(30) == 0
        assert "the controller stopped" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        proc.stdout.close()
