"""Fixtures: shared clusters, and a check that no process or thread outlives a test."""

from __future__ import annotations

import os
import threading
import time

import psutil
import pytest

from zexec import LocalCluster


def wait_until(pred, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):
    """Poll ``pred`` until true, failing the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def _children() -> list:
    return [p for p in psutil.Process().children(recursive=True) if p.is_running()
            and p.status() != psutil.STATUS_ZOMBIE]


def _under(proc, pids: frozenset) -> bool:
    try:
        return any(a.pid in pids for a in proc.parents())
    except psutil.Error:  # gone meanwhile
        return False


def assert_no_children(timeout: float = 10.0, keep: frozenset = frozenset()) -> None:
    """Every child process (but those in ``keep``) must exit within ``timeout``."""
    def left():
        # a process of a kept (module-shared) cluster's tree is not this test's, also
        # when it was born during the test: a replacement engine the shared cluster's
        # engine set forks late for an engine an earlier test killed
        return [p for p in _children() if p.pid not in keep and not _under(p, keep)]

    try:
        wait_until(lambda: not left(), timeout, what="child processes to exit")
    except AssertionError:
        procs = left()
        names = [(p.pid, " ".join(p.cmdline())) for p in procs]
        for p in procs:
            p.kill()
        raise AssertionError(f"processes left behind: {names}")


def _zexec_threads() -> list:
    return [t for t in threading.enumerate() if t.name.startswith("zexec-") and t.is_alive()]


@pytest.fixture
def no_leaks():
    """For tests that start and stop their own cluster: nothing may survive them."""
    before = {t.ident for t in _zexec_threads()}
    keep = frozenset(p.pid for p in _children())  # a module's shared cluster stays
    yield
    assert_no_children(keep=keep)
    wait_until(lambda: not [t for t in _zexec_threads() if t.ident not in before], 10,
               what="zexec threads to exit")


@pytest.fixture(scope="module")
def cluster():
    """One LocalCluster(3) per test module (keeps the suite fast); checked clean at the end."""
    c = LocalCluster(3, heartbeat_period=0.25, heartbeat_misses=8)
    ex = c.__enter__()
    c.ex = ex
    yield c
    c.__exit__(None, None, None)
    assert_no_children()


@pytest.fixture(scope="session", autouse=True)
def _session_clean():
    yield
    assert_no_children()
    assert os.getpid()
