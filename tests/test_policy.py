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
