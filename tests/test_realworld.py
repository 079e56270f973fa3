"""What real clients of an executor rely on beyond the stdlib contract (issue 11)."""

from __future__ import annotations

import collections
import functools
import os
import signal
import sys
import types

import pytest

import tasks
from conftest import wait_until
from zexec import LocalCluster, serialize
from zexec import client as client_mod
from zexec import executor as executor_mod
from zexec.futures import cancel_all


def test_max_workers_follows_the_live_engines(cluster):
    # dask sizes its work by ``_max_workers``: an executor joined to a running cluster
    # (connection=...) must report the engines there, not None
    assert cluster.ex._max_workers == len(cluster.ex.engines) == 3


@pytest.mark.timeout(60)
def test_max_workers_drops_when_an_engine_dies(no_leaks):
    with LocalCluster(2, replace=False) as ex:
        assert ex._max_workers == 2
        victim = ex.engine(ex.engines[0]).submit(tasks.getpid).result(30)
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: ex._max_workers == 1, 30, what="the engine count to drop")


def _by_value_functions():
    # defined here, not at module level: a nested function goes by value, as the
    # functions of a user's __main__ do
    def scale(x, k):
        return x * k

    def calls(x, k):
        calls.n = getattr(calls, "n", 0) + 1
        return calls.n

    return scale, calls


def test_a_callable_object_is_pickled_with_a_reference_to_its_function():
    scale, _ = _by_value_functions()
    keys = []
    frames = serialize.dumps(tasks.Scaled(scale, 2), lambda fn: keys.append(fn) or "k1")
    assert keys == [scale]
    assert b"scale" not in frames[0]  # the function's code is not in the per-task payload
    back = serialize.loads(frames, {"k1": scale})
    assert back.fn is scale and back.k == 2


def test_a_callable_objects_state_is_seen_at_every_submit(cluster):
    scale, _ = _by_value_functions()
    wrapper = tasks.Scaled(scale, 1)
    got = []
    for k in (1, 2, 3):
        wrapper.k = k  # state that changes between submits must be seen
        got.append(cluster.ex.submit(wrapper, 10).result(30))
    assert got == [10, 20, 30]
    # the function inside went once per client: the wrapper's later submits name it
    assert any(entry[0] is scale for entry in cluster.ex.client._fn_cache.values())


def test_the_function_inside_a_callable_is_cached_on_the_engine(cluster):
    # as a plain function is: the engine keeps one copy of it (its attribute persists)
    _, calls = _by_value_functions()
    view = cluster.ex.engine(cluster.ex.engines[0])
    counts = [view.submit(functools.partial(calls, k=0), 0).result(30) for _ in range(3)]
    assert counts == [1, 2, 3]
    assert list(cluster.ex.map(functools.partial(calls, k=0), range(2)))  # load-balanced too


def test_a_maps_batches_carry_enough_work_to_pay_for_their_trips():
    # tiny items (an optimiser's generation): one batch, not one per engine
    assert client_mod.batch_size(16, 4, 1e-5) == 16
    assert client_mod.batch_size(3, 4, 1e-5) == 3  # fewer items than engines, too
    # items with work enough: a share per engine, each batch at least BATCH_MIN long
    assert client_mod.batch_size(16, 4, 5e-4) == 4
    assert client_mod.batch_size(16, 4, 1e-4) == 10
    # many tiny items: batches of at most BATCH_TIME, spread over the engines
    assert client_mod.batch_size(100_000, 4, 1e-5) == int(client_mod.BATCH_TIME / 1e-5)
    # long items, or one item: no batch
    assert client_mod.batch_size(16, 4, 0.01) == 1
    assert client_mod.batch_size(1, 4, 1e-5) == 1


def test_short_items_of_a_map_travel_together_each_with_its_own_outcome(cluster):
    ex = cluster.ex
    assert list(ex.map(tasks.positive, range(12))) == list(range(12))
    key = client_mod._stat_key(tasks.positive)
    ex.client._runtimes[key] = 1e-3  # known short, with work enough to spread
    fs = ex._submit_items(tasks.positive, [(x,) for x in [0, -1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]])
    batches = {id(f._zbatch) for f in fs}
    assert len(batches) == len(ex.engines)  # one batch per engine, not one task per item
    with pytest.raises(ValueError, match="negative: -1"):
        fs[1].result(30)  # the failing item fails alone
    assert [f.result(30) for f in fs[2:]] == list(range(2, 12)) and fs[0].result(30) == 0
    # through map: ordered results, the failure raised at its own place
    it = ex.map(tasks.positive, [0, 1, -2, 3, 4, 5])
    assert next(it) == 0 and next(it) == 1
    with pytest.raises(ValueError, match="negative: -2"):
        next(it)


def test_a_small_map_of_tiny_items_is_one_batch_and_fails_at_its_own_place(cluster):
    ex = cluster.ex
    assert list(ex.map(tasks.positive, range(8))) == list(range(8))
    ex.client._runtimes[client_mod._stat_key(tasks.positive)] = 1e-5  # known tiny
    fs = ex._submit_items(tasks.positive, [(x,) for x in [0, 1, 2, -3, 4, 5, 6, 7]])
    assert len({id(f._zbatch) for f in fs}) == 1  # one trip for the whole call
    assert [f.result(30) for f in fs[:3]] == [0, 1, 2]
    with pytest.raises(ValueError, match="negative: -3"):
        fs[3].result(30)
    assert [f.result(30) for f in fs[4:]] == [4, 5, 6, 7]
    ex.client._runtimes[client_mod._stat_key(tasks.positive)] = 1e-5
    it = ex.map(tasks.positive, [0, 1, -2, 3])
    assert next(it) == 0 and next(it) == 1
    with pytest.raises(ValueError, match="negative: -2"):
        next(it)


def test_a_batchs_items_and_results_travel_as_one_payload_each_failing_alone():
    # the engine's side, on plain frames: arguments in one payload, "ok" results in one
    by_ref = lambda fn: "k"  # noqa: E731 - no function travels by reference here
    args = serialize.dumps_items([((x,), {}) for x in [1, -2, 3, -4]], by_ref)
    items = [[f"m{i}", 0] for i in range(4)]
    outcomes, frames, packed = serialize.run_batch(tasks.unpicklable_if_negative, items, args,
                                                   packed=len(args))
    assert packed == 0  # a result that cannot be pickled: each alone, and it fails alone
    assert [o["status"] for o in outcomes] == ["ok", "error", "ok", "error"]
    assert "could not be pickled" in outcomes[1]["traceback"]
    outcomes, frames, packed = serialize.run_batch(tasks.positive, items, args, packed=len(args))
    assert packed == 1 and [o["status"] for o in outcomes] == ["ok", "error", "ok", "error"]
    assert serialize.loads(frames[:packed]) == [1, 3]  # the "ok" results, in order
    assert "n" not in outcomes[0] and outcomes[1]["n"] >= 1  # an error's own frames follow
    # arguments that cannot be read on the engine: every item fails with that error
    outcomes, frames, packed = serialize.run_batch(tasks.positive, items, [b"not a pickle"],
                                                   packed=1)
    assert packed == 0 and len(outcomes) == 4 and all(o["status"] == "error" for o in outcomes)
    assert sum(o["n"] for o in outcomes) == len(frames)
    # results that are one object go one by one: each a snapshot of its own
    assert serialize.shared([[1], [2]]) is False
    shared = [0]
    assert serialize.shared([shared, shared]) and serialize.shared([(shared, 1), (2, shared)])
    assert not serialize.shared([(1, "a"), (1, "a")])  # immutable values may repeat


def test_items_of_a_batch_each_get_their_own_arguments_and_fail_alone(cluster):
    np = pytest.importorskip("numpy")
    ex = cluster.ex
    key = client_mod._stat_key(tasks.add_one_inplace)
    ex.client._runtimes[key] = 1e-5  # tiny: one batch
    a = np.zeros(3)
    # the same array for two items: each changes its own copy, as with a task per item
    fs = ex._submit_items(tasks.add_one_inplace, [(a,), (a,), (np.ones(3),)])
    assert len({id(f._zbatch) for f in fs}) == 1
    assert [f.result(30).tolist() for f in fs] == [[1.0] * 3, [1.0] * 3, [2.0] * 3]
    ex.client._runtimes[client_mod._stat_key(tasks.unpicklable_if_negative)] = 1e-5
    fs = ex._submit_items(tasks.unpicklable_if_negative, [(1,), (-1,), (tasks.Unpicklable(),), (4,)])
    assert {id(f._zbatch) for i, f in enumerate(fs) if i != 2} == {id(fs[0]._zbatch)}
    assert fs[0].result(30) == 1 and fs[3].result(30) == 4
    with pytest.raises(TypeError, match="cannot be pickled"):
        fs[1].result(30)  # its result
    with pytest.raises(TypeError, match="cannot be pickled"):
        fs[2].result(30)  # its argument
    ex.client._runtimes[client_mod._stat_key(tasks.double)] = 1e-5
    rows = np.arange(20.0).reshape(10, 2)
    assert [r.tolist() for r in ex.map(tasks.double, rows)] == (rows * 2).tolist()


def test_a_batch_is_cancelled_whole_or_not_at_all(cluster, tmp_path):
    ex = cluster.ex
    ran = str(tmp_path / "ran")
    # known short, with work enough to spread: its maps go in a batch per engine
    ex.client._runtimes[client_mod._stat_key(tasks.touch)] = 1e-3
    release = str(tmp_path / "release")
    blockers = [ex.submit(tasks.wait_for_file, release) for _ in range(len(ex.engines) * 20)]
    try:
        fs = ex._submit_items(tasks.touch, [(ran,)] * 12)
        part = [f for f in fs if f._zbatch is fs[0]._zbatch]
        rest = [f for f in fs if f._zbatch is not fs[0]._zbatch]
        assert len(part) > 1
        assert not part[0].cancel()  # one item of a batch: the batch still runs
        assert cancel_all(rest) == rest and all(f.cancelled() for f in rest)
    finally:
        open(release, "w").close()
    for b in blockers:
        b.result(30)
    assert all(f.result(30) is None for f in part)


def test_shutdown_cancels_and_waits_for_batched_items(cluster, tmp_path):
    from zexec import ZmqExecutor

    ex = ZmqExecutor(connection=cluster.connection_file)
    release = str(tmp_path / "release")
    blockers = [ex.submit(tasks.wait_for_file, release) for _ in range(len(ex.engines) * 20)]
    ex.client._runtimes[client_mod._stat_key(tasks.sleep_then_touch)] = 1e-3  # a batch per engine
    items = [(0.001, str(tmp_path / f"ran{i}")) for i in range(12)]
    fs = ex._submit_items(tasks.sleep_then_touch, items)
    batches = {f._zbatch for f in fs}
    assert len(batches) > 1
    # the executor waits for (and cancels) a batch, not each of its items
    assert len(ex._pending) == len(blockers) + len(batches)
    open(release, "w").close()
    ex.shutdown(wait=True, cancel_futures=True)
    assert all(f.done() for f in fs) and all(b.done() for b in blockers)
    for i, f in enumerate(fs):
        if f.cancelled():
            assert f._zbatch.cancelled()
            assert not os.path.exists(tmp_path / f"ran{i}")
        else:
            assert f.result(0) is None and os.path.exists(tmp_path / f"ran{i}")


def test_main_imports_names_what_the_script_imported(monkeypatch):
    import json

    import psutil

    from zexec.cluster import main_imports

    script = types.ModuleType("__main__")
    script.psutil, script.json, script.zexec_fn = psutil, json, serialize.dumps
    script.Process = psutil.Process  # a class imported from a module
    monkeypatch.setitem(sys.modules, "__main__", script)
    # stdlib and zexec are left out: the engine set has them already or needs none
    assert main_imports() == sorted({"psutil", psutil.Process.__module__})


@pytest.mark.timeout(90)
def test_engines_start_with_the_preloaded_modules(no_leaks):
    # colorsys: a module nothing in zexec or the tests imports
    cluster = LocalCluster(1, start_method="spawn", preload=["colorsys", "no_such_module_zexec_test"])
    with cluster as ex:
        pid = ex.submit(tasks.getpid).result(30)
        assert ex.submit(tasks.is_loaded, "colorsys").result(30)  # before any task imported it
        first = ex.engines
        os.kill(pid, signal.SIGKILL)  # the replacement starts warm too
        wait_until(lambda: ex.engines and ex.engines != first, 30, what="a replacement engine")
        assert ex.submit(tasks.is_loaded, "colorsys").result(30)
        with open(cluster.logs["engines"]) as f:
            log = f.read()
    # a module that fails to import is skipped with a log line, never fatal
    assert "no_such_module_zexec_test failed to import" in log


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_large_bytes_travel_out_of_band(kind):
    data = bytes(range(256)) * (5 << 12)  # 5 MiB
    obj = kind(bytearray(data)) if kind is memoryview else kind(data)
    frames = serialize.dumps(((obj,), {}))
    assert len(frames) == 2 and memoryview(frames[1]).nbytes == len(data)  # not in the stream
    assert len(frames[0]) < 1000
    (back,), _ = serialize.loads(frames)
    assert type(back) is kind and bytes(back) == data


def test_large_bytes_round_trip_through_shared_memory(cluster):
    ex = cluster.ex
    data = os.urandom(3 << 20)
    back = ex.submit(tasks.identity, data).result(60)
    assert type(back) is bytes and back == data
    assert os.listdir(ex.client.info.shm_dir) == []  # every buffer file was removed


def test_a_flood_of_submits_waits_in_the_client(cluster, tmp_path, monkeypatch):
    # back-pressure: the task scheduler holds at most MAX_IN_FLIGHT of a client's
    # tasks; the rest wait in the client, leave as replies come back, and cancel at once
    monkeypatch.setattr(client_mod, "MAX_IN_FLIGHT", 4)
    ex = cluster.ex
    release = str(tmp_path / "release")
    blockers = [ex.submit(tasks.wait_for_file, release) for _ in range(4)]
    try:
        fs = [ex.submit(tasks.touch, str(tmp_path / f"ran{i}"), i) for i in range(20)]
        assert len(ex.client._held) == 20 and len(ex.client._inflight) == 4
        assert fs[7].cancel() and fs[7].cancelled()  # dropped where it waits: here
    finally:
        open(release, "w").close()
    assert [f.result(30) for f in blockers] == [None] * 4
    assert [f.result(30) for i, f in enumerate(fs) if i != 7] == [i for i in range(20) if i != 7]
    assert not os.path.exists(tmp_path / "ran7")
    wait_until(lambda: not ex.client._inflight and not ex.client._held, 10, what="the flood to drain")


def test_a_flood_of_short_tasks_paces_its_submitter(cluster, monkeypatch):
    # a thread that submits without pause would starve the client's IO thread of the
    # GIL: past MAX_HELD held tasks it waits until the IO thread has sent half of them
    monkeypatch.setattr(client_mod, "MAX_IN_FLIGHT", 20)
    monkeypatch.setattr(client_mod, "MAX_HELD", 40, raising=False)
    monkeypatch.setattr(client_mod, "PACE_WAIT", 5.0, raising=False)  # gives up only if nothing moves in 5 s
    monkeypatch.setattr(client_mod, "PACE_MIN", 1, raising=False)
    ex = cluster.ex
    client = ex.client
    most, fs = 0, []
    for i in range(1500):
        fs.append(ex.submit(tasks.mul, i, i))
        most = max(most, len(client._held))
    assert most <= 40
    assert client._pacing
    assert [f.result(60) for f in fs] == [i * i for i in range(1500)]


def test_a_flood_of_long_tasks_does_not_hold_up_its_submitter(cluster, tmp_path, monkeypatch):
    # tasks that free no room stop the pacing: the submit loop returns, as on a pool
    monkeypatch.setattr(client_mod, "MAX_IN_FLIGHT", 4)
    monkeypatch.setattr(client_mod, "MAX_HELD", 8)
    monkeypatch.setattr(client_mod, "PACE_WAIT", 0.2)
    ex = cluster.ex
    release = str(tmp_path / "release")
    try:
        fs = [ex.submit(tasks.wait_for_file, release) for _ in range(30)]
        assert len(ex.client._held) == 26 and not ex.client._pacing
    finally:
        open(release, "w").close()
    assert [f.result(60) for f in fs] == [None] * 30
    wait_until(lambda: ex.client._pacing, 10, what="the pacing to come back once the flood drained")


def test_pacing_comes_back_when_held_tasks_leave_fast_again(cluster, monkeypatch):
    # a pause (a full garbage collection under a million futures) once made a fast
    # flood look long: the pacing stopped for good and 180k tasks piled up here
    client = cluster.ex.client
    monkeypatch.setattr(client_mod, "MAX_HELD", 0, raising=False)  # "a flood is held"
    monkeypatch.setattr(client, "_pacing", False, raising=False)
    monkeypatch.setattr(client, "_unpaced", (0.0, client._released), raising=False)
    client.pace()
    assert not client._pacing  # nothing left since: the tasks are still slow
    monkeypatch.setattr(client, "_unpaced", (0.0, client._released - 1000), raising=False)
    client.pace()
    assert client._pacing  # a thousand left in the last look: fast again


def test_a_drained_flood_gives_the_client_registries_back(cluster, tmp_path, monkeypatch):
    # a dict or set keeps the table of its largest size: once nothing is pending after
    # a flood, the client rebuilds its registries (and trims the C heap)
    monkeypatch.setattr(client_mod, "MAX_IN_FLIGHT", 4)
    monkeypatch.setattr(client_mod, "TRIM_AFTER", 1000, raising=False)
    ex = cluster.ex
    client = ex.client
    empty = (sys.getsizeof({}), sys.getsizeof(collections.OrderedDict()), sys.getsizeof(set()))
    release = str(tmp_path / "release")
    try:
        blockers = [ex.submit(tasks.wait_for_file, release) for _ in range(4)]
        fs = [ex.submit(tasks.mul, i, 2) for i in range(5000)]
        assert len(client._held) == 5000  # the registries are grown
    finally:
        open(release, "w").close()
    assert [f.result(60) for f in blockers] == [None] * 4
    assert [f.result(60) for f in fs] == [2 * i for i in range(5000)]
    del fs
    wait_until(lambda: (sys.getsizeof(client._futures), sys.getsizeof(client._held),
                        sys.getsizeof(client._inflight)) == empty, 10,
               what="the registries to be rebuilt empty")
    assert ex.submit(tasks.mul, 3, 4).result(30) == 12  # and the client goes on


def test_a_long_map_of_new_short_items_learns_to_batch_from_its_first_replies(cluster, monkeypatch):
    # a function never run before goes item by item; once its first replies say its
    # items are short (the submitter paces meanwhile), the rest go in batches
    monkeypatch.setattr(client_mod, "MAX_IN_FLIGHT", 4)
    monkeypatch.setattr(client_mod, "MAX_HELD", 8, raising=False)
    monkeypatch.setattr(client_mod, "PACE_WAIT", 5.0, raising=False)
    monkeypatch.setattr(client_mod, "PACE_MIN", 1, raising=False)
    monkeypatch.setattr(executor_mod, "REDECIDE", 4, raising=False)
    fn = eval("lambda x: x + 1")  # a new function: no run time known for it
    ex = cluster.ex
    fs = ex._submit_items(fn, [(i,) for i in range(300)])
    assert [f.result(60) for f in fs] == [i + 1 for i in range(300)]
    assert getattr(fs[0], "_zbatch", None) is None
    assert any(getattr(f, "_zbatch", None) is not None for f in fs)
    assert list(ex.map(fn, range(50))) == [i + 1 for i in range(50)]


def _short(ex, fn):
    """Record ``fn`` as known short, as its first replies would."""
    ex.client._runtimes[client_mod._stat_key(fn)] = 1e-5


def test_a_flood_of_a_short_functions_submits_travels_in_batches(cluster, monkeypatch):
    # one message per tiny task cost the scheduler and the engines more than the
    # tasks: past COALESCE_AT in flight, submits of a function known short are held
    # as their pickled parts and leave together, each with its own outcome
    monkeypatch.setattr(client_mod, "COALESCE_AT", 8, raising=False)
    # few in flight: the scheduler's share fills at once and stays full, as in any
    # flood, whatever the speed of this machine (a cluster keeping up with a slow
    # submitter would take each task as it comes, alone)
    monkeypatch.setattr(client_mod, "MAX_IN_FLIGHT", 240)
    ex = cluster.ex
    _short(ex, tasks.positive)
    before = ex.status()["tasks"].get("submitted", 0)
    xs = [(-i if i % 97 == 5 else i) for i in range(3000)]
    fs = [ex.submit(tasks.positive, x) for x in xs]
    for x, f in zip(xs, fs):
        if x < 0:
            with pytest.raises(ValueError, match=f"negative: {x}$"):
                f.result(60)
        else:
            assert f.result(60) == x
    assert sum(getattr(f, "_zbatch", None) is not None for f in fs) > 2000
    # the scheduler and the hub saw the batches, not 3000 messages
    wait_until(lambda: ex.status()["tasks"].get("submitted", 0) > before, 10, what="the hub's records")
    assert ex.status()["tasks"]["submitted"] - before < 1000
    wait_until(lambda: not ex.client._inflight and not ex.client._batched_n and not ex.client._held,
               10, what="the flood to drain")


def test_a_held_submit_runs_with_its_arguments_as_they_were_at_submit(cluster, monkeypatch):
    monkeypatch.setattr(client_mod, "COALESCE_AT", 0, raising=False)
    ex = cluster.ex
    _short(ex, tasks.identity)
    args = [[i] for i in range(500)]
    fs = [ex.submit(tasks.identity, a) for a in args]
    for a in args:
        a.append("changed after submit")
    assert [f.result(60) for f in fs] == [[i] for i in range(500)]


def test_submits_of_other_callables_keep_their_order_among_held_ones(cluster, monkeypatch):
    # a task with a time limit never joins a batch, and a partial's tasks batch only
    # with each other (their function is serialize.call): held among a plain
    # function's tasks, each gets its own result
    monkeypatch.setattr(client_mod, "COALESCE_AT", 0, raising=False)
    ex = cluster.ex
    _short(ex, tasks.mul)
    fs = []
    for i in range(600):
        if i % 50 == 0:
            fs.append(ex.submit(functools.partial(tasks.mul, y=3), i))
        elif i % 50 == 25:
            fs.append(ex.options(timeout=30).submit(tasks.mul, i, 3))
        else:
            fs.append(ex.submit(tasks.mul, i, 3))
    assert [f.result(60) for f in fs] == [3 * i for i in range(600)]
    assert all(getattr(f, "_zbatch", None) is None for i, f in enumerate(fs) if i % 50 == 25)
    for i in range(0, 600, 50):  # a partial's batch holds partials only
        b = getattr(fs[i], "_zbatch", None)
        assert b is None or all(f in fs[::50] for f in b._items)


def test_a_flood_of_held_submits_is_cancelled_here_or_by_whole_batches(cluster, tmp_path, monkeypatch):
    monkeypatch.setattr(client_mod, "COALESCE_AT", 0, raising=False)
    ex = cluster.ex
    _short(ex, tasks.touch)
    release = str(tmp_path / "release")
    blockers = [ex.submit(tasks.wait_for_file, release) for _ in range(len(ex.engines))]
    try:
        fs = [ex.submit(tasks.touch, str(tmp_path / f"ran{i}"), i) for i in range(400)]
        wait_until(lambda: not ex.client._held, 10, what="the held tasks to leave in batches")
        batched = [f for f in fs if getattr(f, "_zbatch", None) is not None]
        assert batched
        assert not batched[0].cancel()  # one task of a batch: its batch still runs
        cancelled = cancel_all(fs)  # whole batches: every task of each is asked for
        assert len(cancelled) >= len(fs) - 1 - len(batched[0]._zbatch._items)
    finally:
        open(release, "w").close()
    assert [b.result(30) for b in blockers] == [None] * len(blockers)
    for i, f in enumerate(fs):
        if f.cancelled():
            assert not os.path.exists(tmp_path / f"ran{i}")
        else:
            assert f.result(30) == i and os.path.exists(tmp_path / f"ran{i}")


def test_a_task_sent_in_a_batch_is_not_interrupted_alone_and_says_so(cluster, tmp_path, monkeypatch):
    # the engine runs a batch as one task: an interrupt names that task, never one of
    # its items, so interrupt() of a flood's batched submit cannot act, and must say so
    # (it returned True and the task ran on to its end)
    monkeypatch.setattr(client_mod, "COALESCE_AT", 0, raising=False)
    monkeypatch.setattr(client_mod, "MAX_IN_FLIGHT", 0)  # all held first: none leaves alone
    ex = cluster.ex
    _short(ex, tasks.wait_for_file)
    release = str(tmp_path / "release")
    fs = [ex.submit(tasks.wait_for_file, release, 30, i) for i in range(200)]
    try:
        monkeypatch.setattr(client_mod, "MAX_IN_FLIGHT", 2000)
        ex.client._wake()
        wait_until(lambda: not ex.client._held, 10, what="the held tasks to leave in batches")
        assert all(getattr(f, "_zbatch", None) is not None for f in fs)
        wait_until(lambda: any(f.running() for f in fs), 10, what="a batch to start")
        assert ex.interrupt(next(f for f in fs if f.running())) is False
        # queued or running: no task of a batch asked for in part is dropped or interrupted
        assert ex.interrupt(fs[-1]) is False
    finally:
        open(release, "w").close()
    assert [f.result(30) for f in fs] == list(range(200))


def test_a_flood_of_a_callable_objects_submits_travels_in_batches_seeing_its_state(cluster, monkeypatch):
    # a partial or a wrapper of a by-value function: pickled with each task's
    # arguments (its state at that submit), its tasks batch as a plain function's do
    monkeypatch.setattr(client_mod, "COALESCE_AT", 0, raising=False)
    monkeypatch.setattr(client_mod, "MAX_IN_FLIGHT", 240)  # full at once (see above)
    scale, _ = _by_value_functions()
    ex = cluster.ex
    _short(ex, scale)  # what partials of it are recorded under
    _short(ex, tasks.Scaled)  # and the wrapper's instances
    wrapper = tasks.Scaled(scale, 0)
    fs = []
    for i in range(900):
        wrapper.k = i % 7  # changes between submits: each task sees its own
        if i // 100 % 2:
            fs.append(ex.submit(wrapper, i))
        else:
            fs.append(ex.submit(functools.partial(scale, k=i % 7), i))
    assert [f.result(60) for f in fs] == [i * (i % 7) for i in range(900)]
    assert sum(getattr(f, "_zbatch", None) is not None for f in fs) > 600


def test_a_batched_callable_objects_error_keeps_its_own_traceback(cluster, monkeypatch):
    monkeypatch.setattr(client_mod, "COALESCE_AT", 0, raising=False)
    ex = cluster.ex
    _short(ex, tasks.positive)
    monkeypatch.setattr(client_mod, "MAX_IN_FLIGHT", 0)  # every task waits here first
    fs = [ex.submit(functools.partial(tasks.positive), -i if i == 150 else i) for i in range(300)]
    monkeypatch.setattr(client_mod, "MAX_IN_FLIGHT", 2000)
    ex.client._wake()
    with pytest.raises(ValueError, match="negative: -150") as info:
        fs[150].result(60)
    assert getattr(fs[150], "_zbatch", None) is not None  # it ran in a batch
    tb = "".join(__import__("traceback").format_tb(info.value.__traceback__))
    assert "def positive" in tb or "in positive" in tb
    assert "serialize.py" not in str(getattr(info.value, "__cause__", ""))
    assert [f.result(60) for i, f in enumerate(fs) if i != 150] == [i for i in range(300) if i != 150]


def test_a_submit_interrupted_after_it_was_held_never_runs(cluster, tmp_path, monkeypatch):
    # KeyboardInterrupt in the submitting thread after its task was held (in the wake-up
    # of the IO thread, a system call): the caller never gets the future, so the task
    # must not leave later in a batch and run unseen
    monkeypatch.setattr(client_mod, "COALESCE_AT", 0, raising=False)
    ex = cluster.ex
    _short(ex, tasks.touch)
    client = ex.client

    def interrupted() -> None:
        raise KeyboardInterrupt

    client._wake = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            ex.submit(tasks.touch, str(tmp_path / "interrupted"), -1)
    finally:
        del client._wake
    # the same function's next submits leave right behind it, in its batch if it went
    fs = [ex.submit(tasks.touch, str(tmp_path / f"ran{i}"), i) for i in range(50)]
    assert [f.result(30) for f in fs] == list(range(50))
    assert not os.path.exists(tmp_path / "interrupted")


def test_a_kept_future_of_a_batched_flood_does_not_keep_its_batchs_other_results(cluster, monkeypatch):
    # a task that left in a batch refers to its batch (to cancel it as a whole); once the
    # batch has its outcome, the batch must not keep every other task of it and its
    # result alive for as long as the caller keeps one future
    import gc
    import weakref

    monkeypatch.setattr(client_mod, "COALESCE_AT", 0, raising=False)
    ex = cluster.ex
    _short(ex, tasks.identity)
    fs = [ex.submit(tasks.identity, [i]) for i in range(600)]
    assert [f.result(60) for f in fs] == [[i] for i in range(600)]
    kept = next(f for f in fs if getattr(f, "_zbatch", None) is not None)
    others = [weakref.ref(f) for f in fs if f is not kept and getattr(f, "_zbatch", None) is kept._zbatch]
    assert others
    value = kept.result()
    del fs
    # (the IO thread may still be settling that batch when the last result is read)
    wait_until(lambda: gc.collect() >= 0 and all(r() is None for r in others), 10,
               what="the other tasks of the kept future's batch to be freed")
    assert kept.result() is value


def test_interleaved_floods_of_two_functions_each_travel_in_batches(cluster, monkeypatch):
    # threads flooding different functions at once interleave their held tasks: each
    # batch takes its function's tasks from among the next held ones, not only those
    # right behind it (it made batches of one, a message per task again)
    monkeypatch.setattr(client_mod, "COALESCE_AT", 0, raising=False)
    ex = cluster.ex
    client = ex.client
    _short(ex, tasks.mul)
    _short(ex, tasks.identity)
    monkeypatch.setattr(client_mod, "MAX_IN_FLIGHT", 0)  # every task waits here first
    muls, ids = [], []
    for i in range(120):
        muls.append(ex.submit(tasks.mul, i, 2))
        ids.append(ex.submit(tasks.identity, i))
    assert len(client._held) == 240
    monkeypatch.setattr(client_mod, "MAX_IN_FLIGHT", 2000)
    client._wake()
    assert [f.result(60) for f in muls] == [2 * i for i in range(120)]
    assert [f.result(60) for f in ids] == list(range(120))
    for fs in (muls, ids):
        batches = [f._zbatch for f in fs if getattr(f, "_zbatch", None) is not None]
        assert len(batches) >= 110 and len(set(map(id, batches))) <= 4
