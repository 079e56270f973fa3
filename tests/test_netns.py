"""A cluster across network namespaces: a real network between controller and engines.

Three namespaces made by the test: ``ctl`` (controller and client) bridged to ``h1``
and ``h2`` (one engine each) on private addresses 10.77.0.0/24 that exist only inside
them.  Tasks must run in both engine namespaces (each task reports the namespace it ran
in).  Then h1's link is cut while a long load-balanced task runs there: the heartbeat
declares h1's engine dead, its queued task fails with EngineDiedError and the running
one (``retries=1``) is retried on h2 and succeeds.

Needs root (``ip netns add``); skipped otherwise.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from test_launch import no_leaks, start_controller, stop_process  # noqa: F401 - fixture

PY = sys.executable
HEARTBEAT_PERIOD = 0.2
HEARTBEAT_MISSES = 6  # the controller's default
CTL_ADDR = "10.77.0.1"
HOST_ADDRS = {"h1": "10.77.0.11", "h2": "10.77.0.12"}

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="network namespaces are Linux only")


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["ip", *args], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=20)
    if check and r.returncode:
        raise RuntimeError(f"`ip {' '.join(args)}` failed ({r.returncode}): {r.stderr.strip()}")
    return r


def kill_namespace_processes(ns: str, timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL, every process still in namespace ``ns``."""
    def pids() -> list[int]:
        out = ip("netns", "pids", ns, check=False).stdout.split()
        live = []
        for pid in map(int, out):
            try:
                with open(f"/proc/{pid}/stat", "rb") as f:
                    if f.read().rpartition(b")")[2].split()[0] != b"Z":
                        live.append(pid)
            except OSError:
                pass
        return live

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while pids() and time.monotonic() < deadline:
            time.sleep(0.05)  # polling with a deadline
        if not pids():
            return


@pytest.fixture
def netns():
    """ctl bridged to h1 and h2; yields {role: namespace name}; deletes them all after."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces (ip netns add)")
    if shutil.which("ip") is None:
        pytest.skip("iproute2's `ip` is not installed")
    tag = f"zx{os.getpid()}"
    names = {role: f"{tag}{role}" for role in ("ctl", "h1", "h2")}
    made = []
    try:
        for ns in names.values():
            r = ip("netns", "add", ns, check=False)
            if r.returncode:
                pytest.skip(f"`ip netns add` failed (no CAP_SYS_ADMIN here?): {r.stderr.strip()}")
            made.append(ns)
        ctl = names["ctl"]
        ip("-n", ctl, "link", "add", "br0", "type", "bridge")
        for role, addr in HOST_ADDRS.items():
            host = names[role]
            # the veth's ctl end is v<role>; its other end is eth0 inside the host namespace
            ip("-n", ctl, "link", "add", f"v{role}", "type", "veth", "peer", "name", "eth0", "netns", host)
            ip("-n", ctl, "link", "set", f"v{role}", "master", "br0", "up")
            ip("-n", host, "addr", "add", f"{addr}/24", "dev", "eth0")
            ip("-n", host, "link", "set", "eth0", "up")
            ip("-n", host, "link", "set", "lo", "up")
        ip("-n", ctl, "addr", "add", f"{CTL_ADDR}/24", "dev", "br0")
        ip("-n", ctl, "link", "set", "br0", "up")
        ip("-n", ctl, "link", "set", "lo", "up")
        yield names
    finally:
        for ns in made:
            kill_namespace_processes(ns)
            ip("netns", "del", ns, check=False)
        left = set(ip("netns", "list", check=False).stdout.split()) & set(made)
        assert not left, f"namespaces left: {left}"


def ns_id(name: str) -> str:
    """How ``readlink /proc/self/ns/net`` names the namespace ``ip netns`` calls ``name``."""
    return f"net:[{os.stat(f'/run/netns/{name}').st_ino}]"


CLIENT = textwrap.dedent("""\
    # runs inside the ctl namespace; one JSON event per line on stdout
    import json, os, sys, time
    from zexec import EngineDiedError, ZmqExecutor

    cf, h1, h2, marker_dir = sys.argv[1:]

    def say(**event):
        print(json.dumps(event), flush=True)

    def where(pause=0.0):
        time.sleep(pause)
        return {"ns": os.readlink("/proc/self/ns/net"), "pid": os.getpid()}

    def long_on(ns, marker):
        if os.readlink("/proc/self/ns/net") == ns:
            open(marker, "w").close()
            time.sleep(120)  # until its engine is cut off
        return where()

    def outcome(fut, t0):
        try:
            return {"result": fut.result(timeout=30), "after": time.monotonic() - t0}
        except Exception as e:
            return {"error": type(e).__name__, "message": str(e), "after": time.monotonic() - t0}

    ex = ZmqExecutor(connection=cf, retries=1, forward_output=False)
    deadline = time.monotonic() + 30
    while len(ex.engines) < 2:  # the hub's notifications and beats keep this list
        assert time.monotonic() < deadline, f"engines {ex.engines}"
        time.sleep(0.05)
    say(event="engines", engines={i: ex.engine(i).submit(where).result(30) for i in ex.engines})
    spread = [f.result(30) for f in [ex.submit(where, 0.02) for _ in range(40)]]
    say(event="spread", namespaces=sorted({r["ns"] for r in spread}))
    (h1_id,) = [i for i in ex.engines if ex.engine(i).submit(where).result(30)["ns"] == h1]

    # a load-balanced task that holds h1's engine: the scheduler picks the engine, so
    # submit until one lands on h1 (on h2 it returns at once)
    held = None
    for attempt in range(50):
        marker = os.path.join(marker_dir, f"started-{attempt}")
        fut = ex.submit(long_on, h1, marker)
        deadline = time.monotonic() + 10
        while not (os.path.exists(marker) or fut.done()) and time.monotonic() < deadline:
            time.sleep(0.01)
        if os.path.exists(marker):
            held = fut
            break
        fut.result(10)
    queued = ex.engine(h1_id).submit(where)  # waits on h1's engine behind the held task
    say(event="h1_busy", engine=h1_id, attempts=attempt + 1)

    sys.stdin.readline()  # the test cuts h1's link, then says so
    t0 = time.monotonic()
    say(event="after_cut", held=outcome(held, t0), queued=outcome(queued, t0), engines=ex.engines,
        again=ex.submit(where).result(30))
    ex.shutdown()
    """)


def read_event(proc: subprocess.Popen, sel: selectors.BaseSelector, buf: bytearray, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or not sel.select(left):
            raise AssertionError(f"no event from the client within {timeout}s")
        chunk = os.read(proc.stdout.fileno(), 65536)
        if not chunk:
            raise AssertionError(f"the client exited ({proc.wait(5)}) before its next event")
        buf += chunk
    line, _, rest = bytes(buf).partition(b"\n")
    buf[:] = rest
    return json.loads(line)


def test_engines_across_namespaces(netns, tmp_path, no_leaks):  # noqa: F811 - fixture
    in_ns = {role: ["ip", "netns", "exec", ns] for role, ns in netns.items()}
    ids = {role: ns_id(ns) for role, ns in netns.items() if role != "ctl"}
    cf = tmp_path / "cluster.json"
    procs: list[subprocess.Popen] = []
    t_start = time.monotonic()
    try:
        procs.append(start_controller(cf, "--ip", CTL_ADDR, "--heartbeat-period", str(HEARTBEAT_PERIOD),
                                      "--heartbeat-misses", str(HEARTBEAT_MISSES), prefix=in_ns["ctl"]))
        assert json.loads(cf.read_text())["ip"] == CTL_ADDR
        engines = {}
        for role in ("h1", "h2"):
            with open(tmp_path / f"engine-{role}.log", "wb") as log:
                engines[role] = subprocess.Popen(
                    [*in_ns[role], PY, "-m", "zexec", "engine", "--connection-file", str(cf), "-n", "1"],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
            procs.append(engines[role])
        (tmp_path / "client.py").write_text(CLIENT)
        (tmp_path / "markers").mkdir()
        with open(tmp_path / "client.log", "wb") as log:
            client = subprocess.Popen(
                [*in_ns["ctl"], PY, str(tmp_path / "client.py"), str(cf), ids["h1"], ids["h2"],
                 str(tmp_path / "markers")],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
        procs.append(client)
        sel = selectors.DefaultSelector()
        sel.register(client.stdout, selectors.EVENT_READ)
        buf = bytearray()

        # tasks run in both engine namespaces, on two distinct engines
        ev = read_event(client, sel, buf, 40)
        assert ev["event"] == "engines"
        assert sorted(e["ns"] for e in ev["engines"].values()) == sorted(ids.values())
        assert len({e["pid"] for e in ev["engines"].values()}) == 2
        ev = read_event(client, sel, buf, 40)
        assert ev == {"event": "spread", "namespaces": sorted(ids.values())}

        # h1's engine is busy: cut its link and let the heartbeat find out
        ev = read_event(client, sel, buf, 60)
        assert ev["event"] == "h1_busy"
        h1_engine = ev["engine"]
        ip("-n", netns["ctl"], "link", "set", "vh1", "down")
        t_cut = time.monotonic()
        client.stdin.write(b"cut\n")
        client.stdin.flush()
        ev = read_event(client, sel, buf, 40)
        assert ev["event"] == "after_cut"
        queued, held = ev["queued"], ev["held"]
        limit = HEARTBEAT_PERIOD * HEARTBEAT_MISSES
        assert queued.get("error") == "EngineDiedError", queued
        assert f"engine {h1_engine} died" in queued["message"]
        assert queued["after"] < limit + 3.0, f"declared dead after {queued['after']:.1f}s (limit {limit:.1f}s)"
        assert "result" in held, held  # retried (retries=1) on the engine still reachable
        assert held["result"]["ns"] == ids["h2"]
        assert ev["again"]["ns"] == ids["h2"]
        assert h1_engine not in ev["engines"] and len(ev["engines"]) == 1
        print(f"\nh1 declared dead {queued['after']:.2f}s after the cut (period x misses = {limit:.1f}s); "
              f"held task done on h2 after {held['after']:.2f}s")
        assert client.wait(15) == 0, (tmp_path / "client.log").read_text()

        # cut off, h1's engine stops by itself once the pings stop (its watchdog), and its
        # engine set with it
        rc = engines["h1"].wait(20)
        print(f"h1's engine set exited ({rc}) {time.monotonic() - t_cut:.1f}s after the cut")
        assert engines["h2"].poll() is None
    finally:
        for p in reversed(procs):
            if p.stdin:
                p.stdin.close()
            stop_process(p)
    assert time.monotonic() - t_start < 60
