"""Launchers against a real controller: mpiexec for real, ssh/scp/srun faked on PATH.

Each test starts ``python -m zexec controller`` as a subprocess, launches engines through
a launcher, checks that tasks run on exactly those engines, stops everything and checks
that no process is left: none of this process's children, and no ``zexec`` process
carrying this test's token in its environment (orphans included).
"""

from __future__ import annotations

import os
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
import uuid

import cloudpickle
import psutil
import pytest

from conftest import wait_until

from zexec import ZmqExecutor
from zexec.connection import ConnectionInfo, new_key
from zexec.launch import LaunchError, MPILauncher, SlurmLauncher, SSHLauncher

# engines cannot import this test module: send its functions by value
cloudpickle.register_pickle_by_value(sys.modules[__name__])

PY = sys.executable
TOKEN_VAR = "ZEXEC_TEST_TOKEN"


def whoami() -> dict:
    return {"pid": os.getpid(), "ppid": os.getppid(),
            **{k: os.environ.get(k) for k in ("FAKE_SSH_HOST", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK")}}


def square(x: int) -> int:
    return x * x


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def engine_report(ex: ZmqExecutor) -> dict[int, dict]:
    """Run ``whoami`` on every engine through its DirectView; check the hub agrees."""
    report = {i: ex.engine(i).submit(whoami).result(timeout=30) for i in ex.engines}
    for i, r in report.items():
        assert ex.client.engine_info(i)["pid"] == r["pid"]
    return report


# -- leak check and controller ----------------------------------------------------------------
@pytest.fixture
def no_leaks(no_leaks, monkeypatch):
    """conftest's check (no child process, no zexec thread left), and more: every process
    started here is tagged through its environment, and after the test none may run,
    orphans (reparented away from us) included."""
    token = uuid.uuid4().hex
    monkeypatch.setenv(TOKEN_VAR, token)
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    yield token

    def leftovers() -> list[str]:
        left = []
        for p in me.children(recursive=True):
            if p.pid not in before:
                try:
                    left.append(f"child {p.pid} {p.status()} {' '.join(p.cmdline())}")
                except psutil.Error:
                    pass
        for p in psutil.process_iter():
            if p.pid == me.pid:
                continue
            try:
                if p.status() != psutil.STATUS_ZOMBIE and p.environ().get(TOKEN_VAR) == token:
                    left.append(f"tagged {p.pid} {' '.join(p.cmdline())}")
            except psutil.Error:
                pass
        return left

    # everything was stopped already; this only lets the kernel finish the last exits
    deadline = time.monotonic() + 3
    while (left := leftovers()) and time.monotonic() < deadline:
        time.sleep(0.05)  # polling with a deadline
    assert not left, "processes left behind:\n" + "\n".join(left)


def start_controller(path, *args: str, prefix: list[str] = (), timeout: float = 30.0):
    """``zexec controller`` as a subprocess; returns it once its ready line is printed."""
    path = str(path)
    log = open(path + ".log", "wb")
    proc = subprocess.Popen([*prefix, PY, "-m", "zexec", "controller", "--connection-file", path, *args],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log)
    log.close()
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    line = b""
    try:
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                raise AssertionError(f"controller not ready in {timeout}s:\n"
                                     + open(path + ".log", errors="replace").read())
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                raise AssertionError(f"controller exited ({proc.wait(5)}):\n"
                                     + open(path + ".log", errors="replace").read())
            line += chunk
    except BaseException:
        stop_process(proc)
        raise
    finally:
        sel.close()
    assert b"zexec controller running" in line, line
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    return proc


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    if proc.stdout:
        proc.stdout.close()


@pytest.fixture
def controller(tmp_path, no_leaks):
    path = tmp_path / "cluster.json"
    proc = start_controller(path)
    yield str(path)
    stop_process(proc)


# -- fake ssh, scp and srun ---------------------------------------------------------------------
FAKE_SSH = f"""#!{PY}
# ssh HOST COMMAND...: runs COMMAND with /bin/sh in $FAKE_REMOTE_ROOT/HOST, like sshd: in a
# session of its own, so that killing this "client" leaves the "remote" side running
import os, subprocess, sys
with_value = set("BbcDEeFIiJLlmOopQRSWw")
args, i = sys.argv[1:], 0
while args[i].startswith("-"):
    i += 2 if len(args[i]) == 2 and args[i][1] in with_value else 1
host, command = args[i], " ".join(args[i + 1:])
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write("ssh " + repr(sys.argv[1:]) + "\\n")
if os.environ.get("FAKE_SSH_FAIL"):
    sys.exit(print(f"{{host}}: Permission denied (publickey).", file=sys.stderr) or 255)
home = os.path.join(os.environ["FAKE_REMOTE_ROOT"], host)
os.makedirs(home, exist_ok=True)
env = dict(os.environ, FAKE_SSH_HOST=host)
sys.exit(subprocess.Popen(["/bin/sh", "-c", command], cwd=home, env=env, start_new_session=True).wait())
"""

FAKE_SCP = f"""#!{PY}
# scp [-p] [-q] [-o OPT]... SRC HOST:DST -> $FAKE_REMOTE_ROOT/HOST/DST (mode kept with -p)
import os, shutil, sys
args, i, files = sys.argv[1:], 0, []
while i < len(args):
    if args[i] in ("-o", "-P", "-i", "-F"):
        i += 2
        continue
    if not args[i].startswith("-"):
        files.append(args[i])
    i += 1
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write("scp " + repr(sys.argv[1:]) + "\\n")
if os.environ.get("FAKE_SSH_FAIL"):
    sys.exit(print("Permission denied (publickey).", file=sys.stderr) or 255)
src, dst = files
host, _, path = dst.rpartition(":")
home = os.path.join(os.environ["FAKE_REMOTE_ROOT"], host)
os.makedirs(home, exist_ok=True)
(shutil.copy2 if "-p" in args else shutil.copyfile)(src, os.path.join(home, path))
"""

FAKE_SRUN = f"""#!{PY}
# srun --nodes=M --ntasks=T [--opt=value]... COMMAND...: T local copies of COMMAND,
# with SLURM_PROCID / SLURM_NODEID; SIGTERM is forwarded to the tasks, as srun does
import os, signal, subprocess, sys
args, i, opts = sys.argv[1:], 0, {{}}
while args[i].startswith("-"):
    key, eq, value = args[i].partition("=")
    if not eq and key in ("-N", "-n", "-c", "-p", "-t", "-J", "-A"):
        value, i = args[i + 1], i + 1
    opts[key] = value
    i += 1
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write("srun " + repr(sys.argv[1:]) + "\\n")
nodes = int(opts.get("--nodes", opts.get("-N", 1)))
ntasks = int(opts.get("--ntasks", opts.get("-n", nodes)))
tasks = [subprocess.Popen(args[i:], env=dict(os.environ, SLURM_PROCID=str(t), SLURM_NODEID=str(t % nodes)))
         for t in range(ntasks)]
def forward(signum, frame):
    for t in tasks:
        t.send_signal(signum)
signal.signal(signal.SIGTERM, forward)
sys.exit(max(t.wait() for t in tasks))
"""


def write_script(path, text: str) -> str:
    path.write_text(text)
    path.chmod(0o755)
    return str(path)


@pytest.fixture
def fake_bin(tmp_path, monkeypatch):
    """A bin directory first on PATH with ssh, scp and srun that run everything here."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name, text in (("ssh", FAKE_SSH), ("scp", FAKE_SCP), ("srun", FAKE_SRUN)):
        write_script(bindir / name, text)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "fake.log"))
    monkeypatch.setenv("FAKE_REMOTE_ROOT", str(tmp_path / "remote"))
    return bindir


def fake_log(tmp_path) -> list[str]:
    path = tmp_path / "fake.log"
    return path.read_text().splitlines() if path.exists() else []


# -- ssh ---------------------------------------------------------------------------------------
def test_ssh_launcher(controller, fake_bin, tmp_path):
    launcher = SSHLauncher(["alpha", "bravo"], controller, engines_per_host=2, python=PY)
    remote = {h: tmp_path / "remote" / h / launcher.remote_connection_file for h in ("alpha", "bravo")}
    with launcher:
        for path in remote.values():  # copied with its mode: it holds the key
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
        with ZmqExecutor(connection=controller) as ex:
            launcher.wait_for_engines(ex, timeout=30)
            report = engine_report(ex)
            assert len(report) == 4 and len({r["pid"] for r in report.values()}) == 4
            hosts = sorted(r["FAKE_SSH_HOST"] for r in report.values())
            assert hosts == ["alpha", "alpha", "bravo", "bravo"]
            assert len({ex.client.engine_info(i)["launcher"] for i in report}) == 2  # one engine set per host
            assert list(ex.map(square, range(40))) == [x * x for x in range(40)]
    # stop() killed only the ssh clients (the "remote" engine sets run in sessions of their
    # own, as on a real host): each engine set saw its parent go and stopped its engines
    pids = [r["pid"] for r in report.values()]
    wait_until(lambda: not any(map(running, pids)), 15, what="the remote engines to exit")
    assert not any(p.exists() for p in remote.values()), "the copied connection file was not removed"
    log = fake_log(tmp_path)
    assert sum(line.startswith("scp ") for line in log) == 2
    ssh_cmds = [line for line in log if line.startswith("ssh ") and "zexec engine" in line]
    assert len(ssh_cmds) == 2 and all("BatchMode=yes" in c and "--parent-pid $PPID" in c for c in ssh_cmds)
    assert sum(line.startswith("ssh ") and "rm -f" in line for line in log) == 2


def test_ssh_launcher_shared_filesystem(controller, fake_bin, tmp_path):
    launcher = SSHLauncher({"alpha": 1, "bravo": 2}, controller, python=PY, copy=False)
    assert launcher.n_engines == 3
    with launcher, ZmqExecutor(connection=controller) as ex:
        launcher.wait_for_engines(ex, timeout=30)
        assert sorted(r["FAKE_SSH_HOST"] for r in engine_report(ex).values()) == ["alpha", "bravo", "bravo"]
    assert not any(line.startswith("scp ") for line in fake_log(tmp_path))
    assert not list((tmp_path / "remote").glob("*/.zexec-*"))


def test_ssh_failure_quotes_stderr(fake_bin, tmp_path, monkeypatch, no_leaks):
    cf = ConnectionInfo(key=new_key()).write(str(tmp_path / "c.json"))
    monkeypatch.setenv("FAKE_SSH_FAIL", "1")
    with pytest.raises(LaunchError, match=r"could not copy(.|\n)*Permission denied \(publickey\)"):
        SSHLauncher(["alpha"], cf, python=PY).start()
    t0 = time.monotonic()
    with pytest.raises(LaunchError, match=r"ssh alpha(.|\n)*exit code 255(.|\n)*Permission denied"):
        SSHLauncher(["alpha"], cf, python=PY, copy=False).start()
    assert time.monotonic() - t0 < 5
    with pytest.raises(LaunchError, match="'no-such-ssh-zexec' not found"):
        SSHLauncher(["alpha"], cf, ssh="no-such-ssh-zexec", copy=False).start()


# -- mpiexec -----------------------------------------------------------------------------------
def _open_mpi() -> bool:
    try:
        out = subprocess.run(["mpiexec", "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "Open MPI" in out or "OpenRTE" in out


HAVE_MPIEXEC = shutil.which("mpiexec") is not None
OPEN_MPI = HAVE_MPIEXEC and _open_mpi()


@pytest.mark.skipif(not HAVE_MPIEXEC,
                    reason="mpiexec not found: install an MPI (apt-get install openmpi-bin) to test MPILauncher")
def test_mpi_launcher(controller):
    env, args = {}, []
    if OPEN_MPI:  # 3 ranks on fewer cores; and as root, Open MPI wants to be told
        args.append("--oversubscribe")
        if os.geteuid() == 0:
            env = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    launcher = MPILauncher(3, controller, extra_args=args, env=env)
    with launcher, ZmqExecutor(connection=controller) as ex:
        launcher.wait_for_engines(ex, timeout=60)
        report = engine_report(ex)
        assert len({r["pid"] for r in report.values()}) == 3
        if OPEN_MPI:
            assert sorted(r["OMPI_COMM_WORLD_RANK"] for r in report.values()) == ["0", "1", "2"]
        assert list(ex.map(square, range(30), chunksize=4)) == [x * x for x in range(30)]
        mpiexec_pid = launcher.procs[0].pid
    assert not running(mpiexec_pid)


@pytest.mark.skipif(not OPEN_MPI or os.geteuid() != 0,
                    reason="needs root and Open MPI's mpiexec: its refusal to run as root is the failure tested")
def test_mpi_failure_quotes_stderr(tmp_path, no_leaks, monkeypatch):
    monkeypatch.delenv("OMPI_ALLOW_RUN_AS_ROOT", raising=False)
    monkeypatch.delenv("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", raising=False)
    cf = ConnectionInfo(key=new_key()).write(str(tmp_path / "c.json"))
    with pytest.raises(LaunchError, match=r"mpiexec(.|\n)*ended with exit code(.|\n)*root"):
        MPILauncher(2, cf, startup_grace=5.0).start()


# -- srun and sbatch ---------------------------------------------------------------------------
def test_slurm_launcher(controller, fake_bin, tmp_path):
    launcher = SlurmLauncher(2, controller, engines_per_node=2, extra_args=["--exclusive"])
    with launcher, ZmqExecutor(connection=controller) as ex:
        launcher.wait_for_engines(ex, timeout=30)
        report = engine_report(ex)
        assert len({r["pid"] for r in report.values()}) == 4
        assert sorted(r["SLURM_PROCID"] for r in report.values()) == ["0", "0", "1", "1"]
        assert list(ex.map(square, range(20))) == [x * x for x in range(20)]
    (srun,) = [line for line in fake_log(tmp_path) if line.startswith("srun ")]
    for opt in ("--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--exclusive"):
        assert repr(opt) in srun


def test_slurm_sbatch_script(controller, fake_bin, tmp_path):
    launcher = SlurmLauncher(2, controller, engines_per_node=2)
    script = launcher.write_sbatch(tmp_path / "engines.sbatch", time="00:10:00", partition="debug",
                                   directives=["--mem=1G"], setup=["echo setup ran"])
    text = open(script).read()
    for line in ("#!/bin/bash", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --cpus-per-task=2", "#SBATCH --time=00:10:00", "#SBATCH --partition=debug",
                 "#SBATCH --mem=1G", "echo setup ran"):
        assert line + "\n" in text
    assert "exec srun --nodes=2" in text and f"--connection-file {controller}" in text
    # run it as sbatch would on the first node (the #SBATCH lines are comments to bash)
    with open(tmp_path / "job.out", "wb") as out:
        job = subprocess.Popen(["bash", script], stdin=subprocess.DEVNULL, stdout=out,
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with ZmqExecutor(connection=controller) as ex:
            wait_until(lambda: len(ex.engines) >= 4, 30, what="the batch job's engines")
            report = engine_report(ex)
            assert sorted(r["SLURM_PROCID"] for r in report.values()) == ["0", "0", "1", "1"]
    finally:
        os.killpg(job.pid, signal.SIGTERM)  # what scancel does
        job.wait(15)
    assert "setup ran" in (tmp_path / "job.out").read_text()


# -- failures and stopping ---------------------------------------------------------------------
def test_late_failure_raised_by_wait_for_engines(controller, tmp_path, no_leaks):
    srun = write_script(tmp_path / "srun-dies", "#!/bin/sh\nsleep 0.5\necho 'srun: error: node003: task 0: Killed' >&2\nexit 3\n")
    launcher = SlurmLauncher(1, controller, srun=srun, startup_grace=0.0)
    with launcher, ZmqExecutor(connection=controller) as ex:
        t0 = time.monotonic()
        with pytest.raises(LaunchError, match=r"exit code 3(.|\n)*node003: task 0: Killed"):
            launcher.wait_for_engines(ex, timeout=60)
        assert time.monotonic() - t0 < 10  # told at once, not at the timeout


def test_stop_kills_what_ignores_sigterm(tmp_path, no_leaks):
    """stop() SIGKILLs, after its timeout, a command and a grandchild in a process
    group of its own (as mpiexec's ranks are) that both ignore SIGTERM."""
    cf = ConnectionInfo(key=new_key()).write(str(tmp_path / "c.json"))
    pidfile = tmp_path / "grandchild.pid"
    grandchild = write_script(tmp_path / "rank", textwrap.dedent(f"""\
        #!{PY}
        import os, signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        with open("{pidfile}.tmp", "w") as f:
            f.write(str(os.getpid()))
        os.rename("{pidfile}.tmp", "{pidfile}")
        time.sleep(600)
        """))
    stubborn = write_script(tmp_path / "mpiexec-stubborn", textwrap.dedent(f"""\
        #!{PY}
        import signal, subprocess
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        subprocess.Popen(["{grandchild}"], start_new_session=True).wait()
        """))
    launcher = MPILauncher(1, cf, mpiexec=stubborn, startup_grace=0.0).start()
    grandchild = int(wait_until(lambda: pidfile.exists() and pidfile.read_text(), 15, what="the grandchild"))
    assert os.getpgid(grandchild) != launcher.procs[0].pid
    t0 = time.monotonic()
    launcher.stop(timeout=0.5)
    assert time.monotonic() - t0 < 3
    assert not running(grandchild)


def test_connection_file_must_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="start the controller first"):
        MPILauncher(1, tmp_path / "missing.json")


def test_connection_file_without_addresses_is_a_clear_error(tmp_path):
    from zexec import ZmqExecutor

    path = tmp_path / "noaddr.json"
    path.write_text('{"key": "abc"}')
    with pytest.raises(ValueError, match="no 'registration' address"):
        ZmqExecutor(connection=str(path))


@pytest.mark.skipif(sys.version_info < (3, 11), reason="python -P is 3.11+")
def test_local_engines_import_from_the_clients_path(tmp_path, monkeypatch, no_leaks):
    """LocalCluster's processes see the client's sys.path, not their working directory
    first (``python -m`` alone would put it there, and a module of the same name in the
    working directory would shadow the one the client imported)."""
    import tasks
    from zexec import LocalCluster

    lib, cwd = tmp_path / "lib", tmp_path / "cwd"
    lib.mkdir()
    cwd.mkdir()
    (lib / "zexec_shadowed.py").write_text("WHERE = 'lib'\n")
    (cwd / "zexec_shadowed.py").write_text("WHERE = 'cwd'\n")
    monkeypatch.syspath_prepend(str(lib))
    monkeypatch.chdir(cwd)
    with LocalCluster(1) as ex:
        assert ex.submit(tasks.module_attr, "zexec_shadowed", "WHERE").result(30) == "lib"


def test_local_engines_share_the_clients_multiprocessing_authkey(no_leaks):
    """A Manager proxy made in the client works in a task, as in a process pool's workers
    (they inherit the parent's authkey); and the key is not left in the engines' environment."""
    import multiprocessing

    import tasks
    from zexec import LocalCluster

    with multiprocessing.Manager() as mgr, LocalCluster(1) as ex:
        ev = mgr.Event()
        ex.submit(ev.set).result(30)
        assert ev.is_set()
        assert ex.submit(tasks.getenv, "ZEXEC_MP_AUTHKEY").result(30) is None


def test_local_cluster_that_fails_to_start_leaves_nothing(no_leaks):
    """An initializer argument that cannot be pickled (for spawned engines: forked ones
    inherit it) fails the start at once, and the half-made cluster goes: its directory
    (which holds the key) and its shared memory."""
    import threading

    from zexec import LocalCluster

    c = LocalCluster(1, initializer=print, initargs=(threading.Lock(),), start_method="spawn")
    with pytest.raises(TypeError, match="pickle"):
        c.__enter__()
    assert c.dir and not os.path.exists(c.dir)
    assert not c.shm_dir or not os.path.exists(c.shm_dir)
    assert not c.procs
