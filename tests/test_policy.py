"""Scheduling and heartbeat policy on plain data."""

from zexec.controller.policy import choose_engine, ewma, heart_failures, outstanding_bound


def test_least_load_wins():
    order = ["a", "b", "c"]
    assert choose_engine(order, {"a": 2, "b": 0, "c": 1}, dict.fromkeys(order, 4)) == "b"


def test_ties_rotate_from_start():
    order = ["a", "b", "c"]
    loads = dict.fromkeys(order, 1)
    cap = dict.fromkeys(order, 4)
    assert choose_engine(order, loads, cap, start=0) == "a"
    assert choose_engine(order, loads, cap, start=1) == "b"
    assert choose_engine(order, loads, cap, start=2) == "c"


def test_bound_respected_and_none_when_full():
    order = ["a", "b"]
    assert choose_engine(order, {"a": 2, "b": 1}, {"a": 2, "b": 1}) is None
    assert choose_engine(order, {"a": 2, "b": 1}, {"a": 3, "b": 1}) == "a"
    assert choose_engine([], {}, {}) is None


def test_outstanding_bound_adapts():
    assert outstanding_bound(0.010, 0.0005) == 2          # long tasks: shallow queues
    assert outstanding_bound(0.00002, 0.0005) == 16       # no-ops: deep queues
    assert 2 < outstanding_bound(0.0001, 0.0005) < 16
    assert outstanding_bound(0, 0.001) == 16
    assert outstanding_bound(3.0, 0.001) == 1            # very long: no queue, as a pool


def test_heart_failures():
    last = {"a": 10, "b": 7, "c": 4}
    assert heart_failures(last, 10, 3) == ["c"]
    assert sorted(heart_failures(last, 12, 3)) == ["b", "c"]
    assert heart_failures({}, 5, 1) == []


def test_ewma():
    assert ewma(None, 5) == 5
    assert ewma(10, 0, 0.5) == 5


def test_a_stale_hub_beat_removes_no_engine_it_cannot_speak_for():
    """A client starts from a connection reply that can be newer than a hub_beat it reads
    after (another socket): the beat removes only engines the hub knew, and not as starting."""
    import threading

    from zexec.client import Client

    c = object.__new__(Client)  # the engine bookkeeping only: no sockets
    c._engines = {i: {"id": i, "uuid": u} for i, u in enumerate("abc")}
    c._dead, c._futures, c._direct_frames, c._abort_waits, c._draining = {}, {}, {}, {}, {}
    c._last_id = -1
    c._cond = threading.Condition()
    # taken while engine 1 was starting and before engine 2 registered: both stay
    c._sync_engines({"0": c._engines[0]}, pending=[1], next_id=2)
    assert sorted(c._engines) == [0, 1, 2] and not c._dead
    # a beat that knew all three and lists 0 and 2 live: engine 1 is gone
    c._sync_engines({"0": c._engines[0], "2": c._engines[2]}, pending=[], next_id=3)
    assert sorted(c._engines) == [0, 2] and list(c._dead) == [1]


def test_runs_long_needs_a_start_report_and_a_long_run():
    from zexec.controller.policy import runs_long

    assert not runs_long(None, 0.001)                 # not reported started
    assert not runs_long(0.02, 0.001)                 # under the floor
    assert runs_long(0.06, 0.001)                     # past the floor, 60x the mean
    assert not runs_long(0.06, 0.02)                  # 3x the mean: an ordinary task
    assert runs_long(0.09, 0.02)
    assert runs_long(0.06, None)                      # nothing measured yet


def test_give_back_only_to_an_idle_engine_with_an_empty_queue():
    from zexec.controller.policy import give_back_from

    cap = {"a": 16, "b": 16, "c": 16}
    long = {"a": True, "b": False, "c": False}
    # b is idle, nothing waits here: a's queued tasks should move
    assert give_back_from({"a": 5, "b": 0, "c": 3}, cap, long, queued=0) == ["a"]
    # tasks still wait in the scheduler: the idle engine gets those first
    assert give_back_from({"a": 5, "b": 0, "c": 3}, cap, long, queued=2) == []
    # nobody idle
    assert give_back_from({"a": 5, "b": 1, "c": 3}, cap, long, queued=0) == []
    # an idle engine that cannot take work (unreachable, at max_tasks) does not count
    assert give_back_from({"a": 5, "b": 0, "c": 3}, dict(cap, b=0), long, queued=0) == []
    # only its running task: nothing to give back
    assert give_back_from({"a": 1, "b": 0, "c": 3}, cap, long, queued=0) == []
    # a task that does not run long keeps its queue
    assert give_back_from({"a": 5, "b": 0, "c": 3}, cap, dict(long, a=False), queued=0) == []
    assert give_back_from({}, {}, {}, queued=0) == []
