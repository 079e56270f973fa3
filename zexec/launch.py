"""Launchers: start engines on other hosts with ssh, mpiexec or Slurm's srun.

A launcher runs ``python -m zexec engine --connection-file F -n K`` elsewhere through a
tool the user already has, each command a subprocess of this one::

    this process --Popen--> ssh HOST 'exec python3 -m zexec engine ... --parent-pid $PPID'
                            (one per host; the file copied there first with scp -p)
                 --Popen--> mpiexec -n N python -m zexec engine ... -n 1
                 --Popen--> srun --nodes=M --ntasks-per-node=1 python -m zexec engine ... -n K

The engines then register with the controller named in the connection file, like any
others.  A launcher knows nothing of the controller (it imports no controller code): it
starts and stops processes, and can wait, through a client, until its engines joined.

Stopping: each command runs in its own session, so ``stop()`` sends SIGTERM to that whole
process group, waits, then SIGKILLs what remains of it and of the processes it started
in groups of their own (mpiexec's ranks); nothing it started stays on this host.  Remote
engines stop with their launcher: mpiexec and srun stop their tasks; over ssh, the
engine set watches its parent, the sshd session (``--parent-pid $PPID``), and stops its
engines when the connection goes.  Engines also exit by themselves when the
controller's heartbeat stops.
"""

from __future__ import annotations

import atexit
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
import weakref
from typing import Any, Iterable, Mapping, Sequence

from ._proc import tail
from .errors import ClusterStartError

__all__ = ["LaunchError", "Launcher", "SSHLauncher", "MPILauncher", "SlurmLauncher"]

_live: "weakref.WeakSet[Launcher]" = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for launcher in list(_live):
        launcher.stop(timeout=2.0)


class LaunchError(ClusterStartError):
    """A launcher command failed, or its engines did not join; quotes the command's output."""


def _argv(cmd: str | Sequence[str]) -> list[str]:
    return shlex.split(cmd) if isinstance(cmd, str) else list(cmd)


def _proc_table() -> dict[int, tuple[int, int, bool, int]]:
    """Linux: pid -> (ppid, pgid, running, start time) of every process; {} elsewhere.

    A zombie counts as not running: an orphan's zombie may never be reaped (a container
    whose pid 1 does not reap), and no signal can touch it anyway.
    """
    table = {}
    if not sys.platform.startswith("linux"):
        return table
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rpartition(b")")[2].split()
        except OSError:
            continue
        # fields[0] is stat's third field (state); the start time is its 22nd
        table[int(name)] = (int(fields[1]), int(fields[2]), fields[0] not in (b"Z", b"X"), int(fields[19]))
    return table


def _descendants(table: dict, roots: Iterable[int]) -> dict[int, int]:
    """pid -> start time of every descendant of ``roots`` (the start time tells a pid
    reused later from the process we saw)."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, *_rest) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = {}, list(roots)
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found[child] = table[child][3]
                todo.append(child)
    return found


def _remaining(pgids: Iterable[int], procs: dict[int, int]) -> tuple[list[int], list[int]]:
    """Of the process groups ``pgids`` and the processes ``procs`` (pid -> start time),
    those still running."""
    if not pgids and not procs:
        return [], []
    table = _proc_table()
    if not table:  # not Linux: ask the groups themselves
        live = []
        for pgid in pgids:
            try:
                os.killpg(pgid, 0)
                live.append(pgid)
            except (ProcessLookupError, PermissionError):
                pass
        return live, []
    groups = {pgid for (_, pgid, running, _) in table.values() if running}
    return ([g for g in pgids if g in groups],
            [pid for pid, start in procs.items()
             if pid in table and table[pid][2] and table[pid][3] == start])


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class Launcher:
    """Starts engine processes through some command; the base of the launchers below.

    Subclasses say which commands to run (:meth:`commands`) and how many engines they
    start (:attr:`n_engines`).  ``env`` adds variables to the commands' environment,
    ``engine_args`` extra ``zexec engine`` options (``["--replace"]``), ``log_dir`` keeps
    each command's output (default: a private temporary directory, removed by ``stop``).
    ``start`` raises :class:`LaunchError`, quoting the output, if a command exits within
    ``startup_grace`` seconds.
    """

    def __init__(self, connection_file: str | os.PathLike, *, python: str | Sequence[str] | None = None,
                 env: Mapping[str, str] | None = None, engine_args: Iterable[str] = (),
                 log_dir: str | None = None, startup_grace: float = 0.5) -> None:
        self.connection_file = os.path.abspath(os.fspath(connection_file))
        if not os.path.isfile(self.connection_file):
            raise FileNotFoundError(f"no connection file {self.connection_file}: start the controller first "
                                    "(zexec controller --ip ADDRESS --connection-file FILE)")
        self.python = [sys.executable] if python is None else _argv(python)
        self.env = dict(env or {})
        self.engine_args = list(engine_args)
        self.startup_grace = startup_grace
        self.id = uuid.uuid4().hex[:8]
        self._log_dir_arg = log_dir
        self.log_dir: str | None = None
        self.procs: list[subprocess.Popen] = []
        self.logs: list[str] = []
        self.labels: list[str] = []

    # -- what to run (subclasses) --------------------------------------------------------
    @property
    def n_engines(self) -> int:
        """How many engines this launcher starts in all."""
        raise NotImplementedError

    def commands(self) -> list[tuple[str, list[str]]]:
        """``(label, argv)`` of each command to run; ``label`` names it in errors."""
        raise NotImplementedError

    def engine_command(self, n: int, connection_file: str | None = None) -> list[str]:
        """``python -m zexec engine --connection-file F -n n`` and the extra engine args."""
        return [*self.python, "-m", "zexec", "engine",
                "--connection-file", connection_file or self.connection_file,
                "-n", str(n), *self.engine_args]

    def _prepare(self) -> None:
        """Runs before the commands start (e.g. copy the connection file)."""

    def _cleanup(self) -> None:
        """Runs after the commands stopped (e.g. remove the copied connection file)."""

    # -- processes -----------------------------------------------------------------------
    def start(self) -> "Launcher":
        """Run the commands; raise LaunchError if one fails at once. Returns self."""
        if self.procs:
            return self
        self.log_dir = self._log_dir_arg or tempfile.mkdtemp(prefix="zexec-launch-")
        os.makedirs(self.log_dir, exist_ok=True)
        _live.add(self)
        try:
            self._prepare()
            env = {**os.environ, **self.env}
            env.setdefault("PYTHONUNBUFFERED", "1")
            for label, argv in self.commands():
                self._spawn(label, argv, env)
            self._check_startup()
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, label: str, argv: list[str], env: dict) -> None:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)
        log_path = os.path.join(self.log_dir, f"{len(self.procs)}-{safe}.log")
        with open(log_path, "ab") as logf:
            try:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf,
                                        stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True, close_fds=True)
            except FileNotFoundError:
                raise LaunchError(f"{label}: {argv[0]!r} not found (is it installed and on PATH?)") from None
        self.procs.append(proc)
        self.logs.append(log_path)
        self.labels.append(label)

    def _exit_error(self, i: int, rc: int) -> LaunchError:
        how = f"signal {signal.Signals(-rc).name}" if rc < 0 and -rc in signal.valid_signals() else f"exit code {rc}"
        cmd = shlex.join(self.procs[i].args)
        return LaunchError(f"{self.labels[i]}: `{cmd}` ended with {how}; its output:\n"
                           + (tail(self.logs[i]) or "(none)\n"))

    def _check_startup(self) -> None:
        # a command that fails at once (not found remotely, refused, bad option) says so
        # within moments; poll for that, no longer than the grace period
        deadline = time.monotonic() + self.startup_grace
        while True:
            self.check()
            if time.monotonic() >= deadline:
                return
            time.sleep(min(0.02, max(0.0, deadline - time.monotonic())))

    def check(self) -> None:
        """Raise LaunchError, quoting its output, if a command has exited."""
        for i, proc in enumerate(self.procs):
            rc = proc.poll()
            if rc is not None:
                raise self._exit_error(i, rc)

    def poll(self) -> list[int | None]:
        """Each command's exit code, None while it runs."""
        return [p.poll() for p in self.procs]

    def wait_for_engines(self, executor_or_client: Any, n: int | None = None,
                         timeout: float = 60.0) -> None:
        """Block until the cluster has ``n`` live engines (default: as many as this
        launcher starts); raise LaunchError at once if a command exits meanwhile, or when
        ``timeout`` passes, quoting the commands' output.

        Takes a ``ZmqExecutor`` or its ``Client``.
        """
        client = getattr(executor_or_client, "client", executor_or_client)
        n = self.n_engines if n is None else n
        deadline = time.monotonic() + timeout
        # watch the client's engine list, which the hub's notifications and beats keep
        # current, rather than Client.wait_for_engines: the connection_request snapshots
        # it applies can arrive after a newer registration and drop that engine
        while len(client.engines) < n:
            client.check()
            self.check()
            if time.monotonic() > deadline:
                out = "".join(f"--- {label} ({path}):\n{tail(path)}"
                              for label, path in zip(self.labels, self.logs))
                raise LaunchError(f"{len(client.engines)} of {n} engines joined within {timeout:g}s; "
                                  f"launcher output:\n{out}")
            time.sleep(0.05)  # polling the client's view, with a deadline

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the commands and every process they started here: SIGTERM to each
        command's process group, then SIGKILL to whatever remains after ``timeout``."""
        procs, self.procs = self.procs, []
        pgids = [p.pid for p in procs]  # start_new_session: each command leads its group
        # mpiexec puts its ranks in groups of their own: note them while we know them
        others = _descendants(_proc_table(), pgids) if procs else {}
        for pgid in pgids:
            _killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        # a command may be gone while what it started still stops (engines): wait for that
        while any(_remaining(pgids, others)) and time.monotonic() < deadline:
            time.sleep(0.02)
        groups, pids = _remaining(pgids, others)
        for pgid in groups:
            _killpg(pgid, signal.SIGKILL)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for p in procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:  # pragma: no cover - unkillable (D state)
                pass
        # SIGKILL is delivered asynchronously: return once the killed are really gone
        killed = {pid: others[pid] for pid in pids}
        settle = time.monotonic() + 2.0
        while any(_remaining(groups, killed)) and time.monotonic() < settle:
            time.sleep(0.01)
        try:
            self._cleanup()
        finally:
            _live.discard(self)
            if self.log_dir and not self._log_dir_arg:
                shutil.rmtree(self.log_dir, ignore_errors=True)
                self.log_dir = None

    def __enter__(self) -> "Launcher":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.procs else "stopped"
        return f"<{type(self).__name__} {self.n_engines} engines, {state}>"


class SSHLauncher(Launcher):
    """``engines_per_host`` engines on each host, started over ssh.

    ``hosts`` is a list of ssh destinations (``host``, ``user@host``, aliases from
    ``~/.ssh/config``) or a mapping host -> engines on it.  The connection file holds
    the cluster key: by default it is copied with ``scp -p`` (mode 0600 kept) to
    ``remote_connection_file`` (default ``~/.zexec-<id>-<name>`` on each host) and removed
    again by ``stop``.  With ``copy=False`` the engines read ``remote_connection_file``
    (default: this same path), e.g. on a shared filesystem.

    The remote command is ``exec PYTHON -m zexec engine ... --parent-pid $PPID``: it needs
    a POSIX login shell on the hosts (bash, zsh, dash) and zexec installed for ``python``
    there.  ``ssh_args`` go to ssh and scp alike (use ``-o`` options, e.g.
    ``-o Port=2222``); the default ``BatchMode=yes`` makes a missing key fail at once
    instead of prompting.
    """

    def __init__(self, hosts: Sequence[str] | Mapping[str, int], connection_file: str | os.PathLike,
                 engines_per_host: int = 1, python: str | Sequence[str] = "python3",
                 ssh: str | Sequence[str] = "ssh", remote_connection_file: str | None = None, *,
                 copy: bool = True, scp: str | Sequence[str] = "scp",
                 ssh_args: Sequence[str] = ("-o", "BatchMode=yes"),
                 remote_env: Mapping[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(connection_file, python=python, **kwargs)
        if isinstance(hosts, str):
            raise TypeError("hosts must be a list of hosts, not one string")
        counts = dict(hosts) if isinstance(hosts, Mapping) else {h: engines_per_host for h in hosts}
        if not counts:
            raise ValueError("no hosts")
        self.hosts = counts
        self.ssh = _argv(ssh)
        self.scp = _argv(scp)
        self.ssh_args = list(ssh_args)
        self.copy = copy
        self.remote_env = dict(remote_env or {})
        if remote_connection_file is None:
            remote_connection_file = (f".zexec-{self.id}-{os.path.basename(self.connection_file)}"
                                      if copy else self.connection_file)
        self.remote_connection_file = remote_connection_file
        self._copied: list[str] = []

    @property
    def n_engines(self) -> int:
        return sum(self.hosts.values())

    def remote_command(self, n: int) -> str:
        """The shell command run on a host: the engine set replaces the login shell, so
        its parent is the sshd session, which goes away with the connection."""
        env = [f"{k}={v}" for k, v in self.remote_env.items()]
        words = (["env", *env] if env else []) + self.engine_command(n, self.remote_connection_file)
        return "exec " + " ".join(shlex.quote(w) for w in words) + " --parent-pid $PPID"

    def commands(self) -> list[tuple[str, list[str]]]:
        return [(f"ssh {host}", [*self.ssh, *self.ssh_args, host, self.remote_command(n)])
                for host, n in self.hosts.items()]

    def _scp_target(self, host: str) -> str:
        user, at, name = host.rpartition("@")
        if ":" in name and not name.startswith("["):
            name = f"[{name}]"  # IPv6 literal
        return f"{user}{at}{name}:{self.remote_connection_file}"

    def _run_on_hosts(self, what: str, argvs: dict[str, list[str]], timeout: float) -> dict[str, str]:
        """Run one short command per host, in parallel; the error text of each failure."""
        procs = {}
        for host, argv in argvs.items():
            try:
                procs[host] = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                               stderr=subprocess.STDOUT, start_new_session=True)
            except FileNotFoundError:
                return {host: f"{argv[0]!r} not found (is it installed and on PATH?)"}
        failed = {}
        deadline = time.monotonic() + timeout
        for host, p in procs.items():
            try:
                out, _ = p.communicate(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _killpg(p.pid, signal.SIGKILL)
                out, _ = p.communicate()
                failed[host] = f"{what} timed out after {timeout:.0f}s"
                continue
            if p.returncode != 0:
                failed[host] = (f"`{shlex.join(p.args)}` ended with exit code {p.returncode}:\n"
                                + out.decode(errors="replace"))
        return failed

    def _prepare(self) -> None:
        if not self.copy:
            return
        argvs = {h: [*self.scp, "-p", "-q", *self.ssh_args, self.connection_file, self._scp_target(h)]
                 for h in self.hosts}
        failed = self._run_on_hosts("scp", argvs, timeout=60.0)
        self._copied = [h for h in self.hosts if h not in failed]
        if failed:
            raise LaunchError("could not copy the connection file:\n"
                              + "\n".join(f"{h}: {text}" for h, text in failed.items()))

    def _cleanup(self) -> None:
        hosts, self._copied = self._copied, []
        if hosts:
            rm = "rm -f -- " + shlex.quote(self.remote_connection_file)
            self._run_on_hosts("rm", {h: [*self.ssh, *self.ssh_args, h, rm] for h in hosts}, timeout=15.0)


class MPILauncher(Launcher):
    """``n`` engines as the ranks of one ``mpiexec -n N python -m zexec engine ... -n 1``.

    Where the ranks run is mpiexec's business: pass ``extra_args`` such as
    ``["--hostfile", "hosts"]`` (or run inside a batch allocation).  The connection file
    must be readable at the same path on every host (a shared filesystem), or
    ``remote_connection_file`` names where it is.  ``python`` defaults to this
    interpreter.  OpenMPI refuses to run as root unless ``--allow-run-as-root`` is given.
    """

    def __init__(self, n: int, connection_file: str | os.PathLike, mpiexec: str | Sequence[str] = "mpiexec",
                 extra_args: Sequence[str] = (), *, remote_connection_file: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(connection_file, **kwargs)
        if n < 1:
            raise ValueError("n must be >= 1")
        self.n = n
        self.mpiexec = _argv(mpiexec)
        self.extra_args = list(extra_args)
        self.remote_connection_file = remote_connection_file

    @property
    def n_engines(self) -> int:
        return self.n

    def commands(self) -> list[tuple[str, list[str]]]:
        return [("mpiexec", [*self.mpiexec, "-n", str(self.n), *self.extra_args,
                             *self.engine_command(1, self.remote_connection_file)])]


class SlurmLauncher(Launcher):
    """``engines_per_node`` engines on each of ``nodes`` nodes, through Slurm.

    :meth:`start` runs one ``srun --nodes=M --ntasks=M --ntasks-per-node=1 python -m zexec
    engine ... -n K`` (one engine set per node, forking K engines): inside an allocation
    (``salloc``, or a batch script) it uses the allocation's nodes; outside one, srun asks
    Slurm for an allocation itself and waits for it.  :meth:`write_sbatch` writes the
    same as a batch script instead.  The connection file must be readable at the same
    path on the nodes (a shared filesystem), or ``remote_connection_file`` names where it
    is.  ``cpus_per_task`` (``--cpus-per-task``) gives each engine set its CPUs.
    """

    def __init__(self, nodes: int, connection_file: str | os.PathLike, engines_per_node: int = 1,
                 srun: str | Sequence[str] = "srun", extra_args: Sequence[str] = (), *,
                 cpus_per_task: int | None = None, remote_connection_file: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(connection_file, **kwargs)
        if nodes < 1 or engines_per_node < 1:
            raise ValueError("nodes and engines_per_node must be >= 1")
        self.nodes = nodes
        self.engines_per_node = engines_per_node
        self.srun = _argv(srun)
        self.extra_args = list(extra_args)
        self.cpus_per_task = cpus_per_task
        self.remote_connection_file = remote_connection_file

    @property
    def n_engines(self) -> int:
        return self.nodes * self.engines_per_node

    def srun_command(self, cpus_per_task: int | None = None) -> list[str]:
        cpus = cpus_per_task or self.cpus_per_task
        return [*self.srun, f"--nodes={self.nodes}", f"--ntasks={self.nodes}", "--ntasks-per-node=1",
                *([f"--cpus-per-task={cpus}"] if cpus else []), *self.extra_args,
                *self.engine_command(self.engines_per_node, self.remote_connection_file)]

    def commands(self) -> list[tuple[str, list[str]]]:
        return [("srun", self.srun_command())]

    def write_sbatch(self, path: str | os.PathLike, time: str = "01:00:00", partition: str | None = None, *,
                     job_name: str = "zexec-engines", account: str | None = None,
                     output: str | None = None, directives: Iterable[str] = (),
                     setup: Iterable[str] = ()) -> str:
        """Write a batch script that runs these engines; submit it with ``sbatch PATH``.

        The engines join the running controller of the connection file, so the
        controller must listen on an address the compute nodes reach.  ``directives`` are
        extra ``#SBATCH`` options (``"--mem=8G"``), ``setup`` shell lines run first
        (``"module load python"``, ``"source ~/venv/bin/activate"``).  Each node is asked
        for ``cpus_per_task`` CPUs (default: ``engines_per_node``).  Returns the path.
        """
        cpus = self.cpus_per_task or self.engines_per_node
        opts = [f"--job-name={job_name}", f"--nodes={self.nodes}", "--ntasks-per-node=1",
                f"--cpus-per-task={cpus}", f"--time={time}"]
        if partition:
            opts.append(f"--partition={partition}")
        if account:
            opts.append(f"--account={account}")
        opts.append(f"--output={output or job_name + '-%j.out'}")
        opts += list(directives)
        lines = ["#!/bin/bash", *(f"#SBATCH {o}" for o in opts),
                 f"# {self.n_engines} zexec engines ({self.engines_per_node} on each of {self.nodes} nodes)",
                 f"# that join the controller of {self.remote_connection_file or self.connection_file}",
                 "# (written by zexec.launch.SlurmLauncher; stop them with scancel JOBID)",
                 "set -e", *setup,
                 "exec " + shlex.join(self.srun_command(cpus)), ""]
        path = os.fspath(path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o755)
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines))
        return path
