"""LocalCluster's start methods: processes forked from this one ("fork"), whose engines
start with this program's modules, or fresh interpreters ("spawn")."""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing
import os
import signal
import subprocess
import sys
import threading

import psutil
import pytest

import tasks
from conftest import wait_until
from zexec import LocalCluster, ZmqExecutor
from zexec.forked import ForkedProcess

#: a module nothing in zexec, the tests' helpers or pytest imports
ONLY_HERE = "colorsys"


def _on_engine(ex, fn, *args):
    return ex.submit(fn, *args).result(30)


@pytest.mark.timeout(90)
def test_forked_engines_start_with_this_programs_modules(no_leaks, monkeypatch):
    import colorsys  # noqa: F401 - imported by this program only

    # __main__ as it is: an attribute the script set at run time, no module import gives
    monkeypatch.setattr(sys.modules["__main__"], "zexec_start_mark", "as it was", raising=False)
    cluster = LocalCluster(1, start_method="fork", preload=False)  # nothing named to import
    with cluster as ex:
        assert isinstance(cluster.procs["engines"], ForkedProcess)
        assert isinstance(cluster.procs["controller"], ForkedProcess)
        pid = _on_engine(ex, tasks.getpid)
        assert psutil.Process(pid).ppid() == cluster.procs["engines"].pid
        assert _on_engine(ex, tasks.is_loaded, ONLY_HERE)  # at its first task
        assert _on_engine(ex, tasks.main_attr, "zexec_start_mark") == "as it was"
        first = ex.engines
        os.kill(pid, signal.SIGKILL)  # the replacement is forked warm too
        wait_until(lambda: ex.engines and ex.engines != first, 30, what="a replacement engine")
        assert _on_engine(ex, tasks.getpid) != pid
        assert _on_engine(ex, tasks.is_loaded, ONLY_HERE)
        assert _on_engine(ex, tasks.main_attr, "zexec_start_mark") == "as it was"


@pytest.mark.timeout(90)
def test_recycled_forked_engines_start_warm(no_leaks):
    import colorsys  # noqa: F401

    with LocalCluster(1, start_method="fork", preload=False, max_tasks_per_child=1) as ex:
        pids = set()
        for _ in range(3):  # each task on a new engine
            pids.add(_on_engine(ex, tasks.getpid))
            assert _on_engine(ex, tasks.is_loaded, ONLY_HERE)
        assert len(pids) == 3


@pytest.mark.timeout(90)
def test_spawned_engines_are_fresh_interpreters(no_leaks):
    import colorsys  # noqa: F401

    cluster = LocalCluster(1, start_method="spawn", preload=False)
    with cluster as ex:
        assert isinstance(cluster.procs["engines"], subprocess.Popen)
        assert not _on_engine(ex, tasks.is_loaded, ONLY_HERE)
        assert _on_engine(ex, tasks.main_attr, "__name__") == "__main__"
        assert _on_engine(ex, tasks.main_attr, "__file__").endswith(os.path.join("zexec", "__main__.py"))


@pytest.mark.timeout(90)
def test_forked_processes_leave_without_this_programs_exit_handlers(no_leaks, tmp_path):
    # they leave with os._exit, as multiprocessing's forked children do: an atexit
    # handler of this program (flushing its files, removing its lock) is not theirs
    me = os.getpid()

    def mark() -> None:
        if os.getpid() != me:
            open(tmp_path / f"exit-{os.getpid()}", "w").close()

    atexit.register(mark)
    try:
        cluster = LocalCluster(2, start_method="fork")
        with cluster as ex:
            first = ex.engines
            os.kill(_on_engine(ex, tasks.getpid), signal.SIGKILL)
            wait_until(lambda: len(ex.engines) == 2 and ex.engines != first, 30,
                       what="a replacement engine")
        # stop() has waited for the engine set and the controller to exit
        assert not list(tmp_path.iterdir()), "a forked process ran this program's atexit handlers"
    finally:
        atexit.unregister(mark)


def test_forked_process_handle_reports_how_it_ended():
    from zexec import forked

    p = forked.start(lambda: 7, os.devnull)
    assert p.wait(30) == 7 and p.poll() == 7 and p.returncode == 7
    p.kill()  # reaped: not signalled again (its pid may be another process's now)

    def sleep_forever():
        signal.pause()

    p = forked.start(sleep_forever, os.devnull)
    with pytest.raises(subprocess.TimeoutExpired):
        p.wait(0.05)
    assert p.poll() is None
    p.send_signal(signal.SIGTERM)
    assert p.wait(30) == -signal.SIGTERM

    p = forked.start(sleep_forever, os.devnull)
    try:  # a session and process group of its own, as start_new_session=True gives
        wait_until(lambda: os.getsid(p.pid) == p.pid, 30, what="the child's setsid")
        assert os.getpgid(p.pid) == p.pid
    finally:
        p.kill()
        assert p.wait(30) == -signal.SIGKILL


def test_forked_child_writes_its_output_and_errors_to_its_log(tmp_path, capfd):
    from zexec import forked

    log = tmp_path / "child.log"

    def fails():
        print("from the child")
        raise RuntimeError("boom in the child")

    p = forked.start(fails, str(log))
    assert p.wait(30) == 1
    text = log.read_text()
    assert "from the child" in text and "RuntimeError: boom in the child" in text
    out, err = capfd.readouterr()
    assert "child" not in out + err  # nothing on this process's streams


def test_start_method_is_checked():
    with pytest.raises(ValueError, match="start_method must be one of"):
        LocalCluster(1, start_method="forkserver")


@pytest.mark.timeout(90)
@pytest.mark.parametrize("method, expected", [("spawn", "spawn"), ("forkserver", "spawn"),
                                              ("fork", "fork")])
def test_mp_context_picks_the_start_method(no_leaks, method, expected):
    # ProcessPoolExecutor(mp_context=...): a program that asked for spawn (it must not
    # be forked) gets engines that are not forked from it
    ex = ZmqExecutor(max_workers=1, mp_context=multiprocessing.get_context(method))
    try:
        assert ex.cluster.start_method == expected
        assert ex.submit(pow, 2, 5).result(30) == 32
    finally:
        ex.shutdown()


def test_cluster_processes_do_not_import_asyncio():
    # a tenth of a second of every engine's and controller's start (pyzmq's socket
    # monitor helpers import it); zexec reads monitor events itself
    code = ("import sys, zexec.engineset, zexec.controller.supervisor as s; "
            "from zexec.controller import hub, heartbeat, taskscheduler, devices; "
            "print('asyncio' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.strip() == "False", out.stderr


SIGCHLD_IGNORED = r"""
import gc, os, re, signal, sys, time
signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # this program reaps nothing
gc.disable()
from zexec import LocalCluster
cluster = LocalCluster(1, start_method="fork")
with cluster as ex:
    print("gc in an engine:", ex.submit(gc.isenabled).result(30))
    with open(cluster.logs["controller"]) as f:
        hub = int(re.search(r"hub=(\d+)", f.read()).group(1))
    os.kill(hub, signal.SIGKILL)
    ctl = cluster.procs["controller"].pid
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(ctl, 0)
        except ProcessLookupError:
            print("the controller saw its hub die")
            break
        time.sleep(0.05)
"""


@pytest.mark.timeout(90)
def test_forked_processes_reap_their_children_when_this_program_ignores_sigchld(no_leaks):
    # an ignored SIGCHLD is inherited: the controller would not learn that a part died
    out = subprocess.run([sys.executable, "-c", SIGCHLD_IGNORED], capture_output=True, text=True,
                         timeout=80, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert "gc in an engine: True" in out.stdout, out.stderr
    assert "the controller saw its hub die" in out.stdout, out.stderr


@pytest.mark.timeout(120)
def test_a_cluster_forked_while_another_clients_threads_work(cluster, no_leaks):
    # only the forking thread goes on in the child: the other client's IO thread (busy
    # on its sockets right then) and its zmq context are not used there
    stop = threading.Event()
    done = []

    def submit_on_the_other_cluster() -> None:
        while not stop.is_set():
            done.append(cluster.ex.submit(pow, 2, 8).result(30))

    t = threading.Thread(target=submit_on_the_other_cluster)
    t.start()
    try:
        for _ in range(2):
            with LocalCluster(1, start_method="fork") as ex:
                assert ex.submit(pow, 3, 3).result(30) == 27
    finally:
        stop.set()
        t.join(60)
    assert done and set(done) == {256}
    assert cluster.ex.submit(pow, 2, 9).result(30) == 512


#: released by the test once the child is forked (the module waits on it in this process only)
IMPORT_GATE = threading.Event()


@pytest.mark.timeout(90)
def test_forked_child_imports_a_module_another_thread_was_importing(tmp_path, monkeypatch):
    # the thread's module lock is held in the child by a thread it does not have: a task
    # importing that module (or one importing it) waited forever
    from zexec import forked

    name = "zexec_test_slow_import"
    (tmp_path / f"{name}.py").write_text(
        "import os, sys\n"
        f"if os.getpid() == {os.getpid()}:\n"
        f"    sys.modules[{__name__!r}].IMPORT_GATE.wait(60)\n"
        "VALUE = 5\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    IMPORT_GATE.clear()
    t = threading.Thread(target=__import__, args=(name,))
    t.start()
    p = None
    try:
        wait_until(lambda: name in sys.modules, 30, what="the thread inside the import")
        p = forked.start(lambda: 0 if __import__(name).VALUE == 5 else 2, os.devnull)
        assert p.wait(30) == 0
    finally:
        IMPORT_GATE.set()
        t.join(60)
        if p is not None:
            p.kill()
            p.wait(30)
        sys.modules.pop(name, None)


@contextlib.contextmanager
def _mp_queue():
    """A multiprocessing.Queue, closed and its feeder thread joined afterwards."""
    q = multiprocessing.Queue()
    try:
        yield q
    finally:
        q.close()
        q.join_thread()


def _get_items(q, count: int, timeout: float = 30.0) -> list:
    """``count`` items from a multiprocessing.Queue, each within ``timeout``."""
    return [q.get(timeout=timeout) for _ in range(count)]


@pytest.mark.timeout(90)
def test_forked_engines_inherit_a_multiprocessing_queue_in_initargs(no_leaks):
    # a forked pool's workers inherit initargs; a Queue does not pickle, so it would fail
    with _mp_queue() as q:
        with ZmqExecutor(max_workers=2, initializer=tasks.init_put_pid, initargs=(q,)) as ex:
            inits = _get_items(q, 2)
            assert {kind for kind, _ in inits} == {"init"}
            pids = {pid for _, pid in inits}
            assert len(pids) == 2
            # the tasks use the queue the initializer kept, and their items arrive too
            ran_on = set(ex.map(tasks.put_on_init_queue, range(20)))
            assert ran_on <= pids
            assert sorted(x for _, x in _get_items(q, 20)) == list(range(20))


@pytest.mark.timeout(90)
def test_a_failing_initializer_reports_through_an_inherited_queue(no_leaks):
    from zexec.errors import InitializerError

    with _mp_queue() as q:
        ex = ZmqExecutor(max_workers=1, initializer=tasks.init_queue_log_then_fail, initargs=(q,))
        try:
            record = q.get(timeout=30)  # the engine's QueueHandler, before it exited
            assert "Exception in initializer" in record.getMessage()
            assert "error in initializer" in record.getMessage()
            wait_until(lambda: ex._broken, 30, what="the executor broken")
            with pytest.raises(InitializerError):  # a BrokenProcessPool
                ex.submit(tasks.double, 1)
        finally:
            ex.shutdown()


@pytest.mark.timeout(90)
def test_a_replacement_engine_runs_the_initializer_with_the_inherited_queue(no_leaks):
    with _mp_queue() as q:
        with LocalCluster(2, start_method="fork", replace=True, initializer=tasks.init_put_pid,
                          initargs=(q,)) as ex:
            first = {pid for _, pid in _get_items(q, 2)}
            # a process killed while its queue's feeder thread writes leaves the queue's
            # lock held, for every writer (as with any multiprocessing.Queue): the
            # victim is an engine done with the queue
            victim = ex.submit(tasks.close_init_queue).result(30)
            assert victim in first
            os.kill(victim, signal.SIGKILL)
            kind, pid = q.get(timeout=30)  # the replacement's initializer
            assert kind == "init" and pid not in first
            wait_until(lambda: len(ex.engines) == 2, 30, what="the replacement registered")
            assert set(ex.map(tasks.put_on_init_queue, range(20))) <= (first - {victim}) | {pid}
            assert sorted(x for _, x in _get_items(q, 20)) == list(range(20))


@pytest.mark.timeout(60)
def test_spawned_engines_still_need_an_initializer_that_pickles(no_leaks):
    with _mp_queue() as q:
        cluster = LocalCluster(1, start_method="spawn", initializer=tasks.init_put_pid, initargs=(q,))
        with pytest.raises(RuntimeError, match="inheritance") as err:
            cluster.__enter__()
        assert not cluster.procs
        if sys.version_info >= (3, 11):
            assert any("start_method='fork'" in note for note in err.value.__notes__)
