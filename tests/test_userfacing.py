"""What a user sees: tracebacks into their own script, a failing initializer's report.

Each test runs a real script as a subprocess, the way a user would, and reads what it
prints.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(tmp_path, body: str, timeout: float = 90) -> subprocess.CompletedProcess:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(body))
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, timeout=timeout,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True)


@pytest.mark.timeout(120)
def test_traceback_shows_the_users_file_and_source(no_leaks, tmp_path):
    # functions of __main__ travel by value (cloudpickle): their frames must still name
    # the script and show its lines, with no frame of zexec's engine before them
    r = run_script(tmp_path, """\
        import traceback
        from zexec import ZmqExecutor


        def work(x):
            return 1 / (x - x)  # the failing line


        if __name__ == "__main__":
            with ZmqExecutor(max_workers=1) as ex:
                for fut in (ex.submit(work, 3), ex.map(work, [1, 2], chunksize=2)):
                    try:
                        fut.result() if hasattr(fut, "result") else list(fut)
                    except ZeroDivisionError:
                        traceback.print_exc()
                        print("----", flush=True)
        """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("----") == 2, r.stdout + r.stderr
    script = str(tmp_path / "script.py")
    assert "<dynamic-code>" not in r.stderr, r.stderr
    assert os.path.join("zexec", "engine.py") not in r.stderr, r.stderr
    assert os.path.join("zexec", "serialize.py") not in r.stderr, r.stderr
    frame = f'File "{script}", line 6, in work\n    return 1 / (x - x)  # the failing line'
    # twice per failure (a submit, a chunked map): the remote text (__cause__) and the
    # rebuilt traceback
    assert r.stderr.count(frame) == 4, r.stderr


@pytest.mark.timeout(120)
def test_failing_initializer_prints_its_traceback(no_leaks, tmp_path):
    # as ProcessPoolExecutor: "Exception in initializer:" and the traceback into the
    # user's code on the user's stderr, and the broken pool's error carries it too
    r = run_script(tmp_path, """\
        from concurrent.futures.process import BrokenProcessPool
        from zexec import ZmqExecutor


        def init():
            raise ValueError("boom")  # the failing line


        if __name__ == "__main__":
            with ZmqExecutor(max_workers=2, initializer=init) as ex:
                try:
                    ex.submit(abs, -1).result(60)
                except BrokenProcessPool as e:
                    print("broken:", e)
                    print("cause:", e.__cause__)
        """)
    assert r.returncode == 0, r.stderr
    script = str(tmp_path / "script.py")
    frame = f'File "{script}", line 6, in init\n    raise ValueError("boom")  # the failing line'
    head, _, report = r.stderr.partition("Exception in initializer:\nTraceback (most recent call last):\n")
    assert report, r.stderr
    assert report.startswith("  " + frame + "\n"), r.stderr
    assert "\nValueError: boom\n" in report, r.stderr
    assert "broken: " in r.stdout and "initializer failed" in r.stdout, r.stdout
    assert "ValueError: boom" in r.stdout, r.stdout
    assert "cause: Traceback" in r.stdout and frame in r.stdout, r.stdout
    assert os.path.join("zexec", "engine.py") not in r.stdout + r.stderr


def test_status_is_current_right_after_a_map(cluster):
    # the task scheduler sends its records to the hub in batches; status() must still
    # count every task whose result the caller already has
    ex = cluster.ex
    before = ex.status()["tasks"]
    assert list(ex.map(abs, range(-100, 0))) == list(range(100, 0, -1))
    after = ex.status()
    assert after["current"] is True
    for key in ("submitted", "ok"):
        assert after["tasks"].get(key, 0) - before.get(key, 0) == 100, (before, after["tasks"])
    assert sum(e["tasks_done"] for e in after["engines"]) >= 100
    assert all(e["queued"] == 0 for e in after["engines"]), after["engines"]


def test_the_first_task_records_wait_until_the_hub_listens():
    """The task scheduler's records go to the hub on a publisher, which drops what it
    sends before the hub's subscription arrives: the first tasks of a cluster were
    never counted as submitted, yet their replies were ("submitted" 229, "ok" 231 in
    status(), 1 cluster in about 150).  They wait for the subscription.  Plain frames."""
    import zmq

    from zexec.connection import ConnectionInfo
    from zexec.controller import hub as hub_mod
    from zexec.controller import taskscheduler as ts_mod
    from zexec.protocol import loads

    class Mon:  # the scheduler's side of the records socket
        def __init__(self):
            self.sent = []

        def send_multipart(self, frames, *args, **kwargs):
            self.sent.append(frames)

    info = ConnectionInfo(key="k" * 32)
    sched = ts_mod.TaskScheduler(info)
    sched.mon = Mon()
    sched._submitted.append(("c-2", 0, 1.0))
    sched._submitted.append(("c-3", 1, 1.0))
    sched._flush_records(flushed=1)  # the hub's subscription is not there yet
    sched._on_subscription([zmq.Frame(b"\x01mux")])  # the devices' copies: not ours
    sched._flush_records(flushed=1)
    assert sched.mon.sent == []
    sched._done.append(("c-2", "ok", 1.0, 1.1))
    sched._on_subscription([zmq.Frame(b"\x01task")])
    sched._flush_records(flushed=2)
    sched._done.append(("c-3", "ok", 1.0, 1.1))
    sched._flush_records(flushed=3)
    hub = hub_mod.Hub(info)
    for prefix, rec in sched.mon.sent:
        assert prefix == b"task"
        hub._task_records(loads(rec))
    assert hub.counts["submitted"] == hub.counts["ok"] == 2, dict(hub.counts)
    assert hub.flushed == 3
