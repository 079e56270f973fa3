"""LocalCluster: a whole cluster on this machine, started and stopped as one.

It writes a connection file (mode 0600, in a private temporary directory), starts
``zexec controller`` (which forks the hub, heartbeat monitor, MUX, control, IOPub and
task scheduler) and ``zexec engine -n N`` (which forks the engines and replaces any
that die), waits until N engines are registered, and on exit stops every process.
Each child also exits when this process dies, even by SIGKILL.

The two commands run either in processes forked from this one (``start_method="fork"``,
the default on Linux: see zexec.forked), so the engines start with everything this
program has imported, or as fresh interpreters (``"spawn"``: ``python -m zexec ...``),
whose engine set imports the script's modules itself (``preload``).  Both run the same
code, zexec.commands: a forked process calls it directly, never the command line above
this module (``zexec.__main__``, whose ``zexec local`` uses LocalCluster).
"""

from __future__ import annotations

import functools
import glob
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import types
import weakref
from typing import Any, Callable, Sequence

from . import commands
from . import executor as _executor
from . import forked
from ._proc import tail
from .connection import AUTHKEY_ENV, ConnectionInfo, allocate, ipc_fits, new_curve_keys, new_key
from .errors import (ClusterLostError, ClusterStartError, EngineSetDiedError, InitializerError,
                     RemoteTraceback)
from .executor import ZmqExecutor
from .protocol import Signer

#: the first line of a log record (zexec._proc.setup_logging's format)
_LOG_RECORD = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ ")

START_METHODS = ("fork", "spawn")


def default_start_method() -> str:
    """``"fork"`` where it is the safe default of multiprocessing too (POSIX but macOS,
    whose system libraries do not survive a fork), else ``"spawn"``."""
    return "fork" if hasattr(os, "fork") and sys.platform != "darwin" else "spawn"


def main_imports() -> list[str]:
    """The modules the user's script (``__main__``) uses at its top level: those it
    imported, and those of the functions and classes it imported from them; not the
    standard library's nor zexec's.  The engine set preloads them (see
    zexec.engineset.preload), as multiprocessing's forkserver preloads ``__main__``."""
    main = sys.modules.get("__main__")
    names = set()
    for value in list(vars(main).values()) if main is not None else ():
        if isinstance(value, types.ModuleType):
            name = value.__name__
        elif isinstance(value, (type, types.FunctionType, types.BuiltinFunctionType)):
            name = getattr(value, "__module__", None)
        else:
            continue
        if not isinstance(name, str) or name not in sys.modules:
            continue
        top = name.partition(".")[0]
        if top in ("__main__", "zexec", "builtins") or top in sys.stdlib_module_names:
            continue
        names.add(name)
    return sorted(names)


class LocalCluster:
    """Hub, schedulers, heartbeat and ``n`` engines as subprocesses of this one.

    ``with LocalCluster(4) as ex:`` yields a :class:`ZmqExecutor`; ``replace`` keeps
    ``n`` engines alive (new ids) when some die; ``retries`` resubmits load-balanced
    tasks of a dead engine; ``scheme`` picks how the executor balances (see
    :class:`ZmqExecutor`); ``heartbeat_period × heartbeat_misses`` bounds how long a
    hung engine may stay silent before it is declared dead.

    ``start_method``: ``"fork"`` (the default on Linux, see :func:`default_start_method`)
    forks the controller and the engine set from this process, as multiprocessing's fork
    method starts workers: the engines, replacements and recycled ones included, start
    with every module this program had imported when the cluster started, and
    ``__main__`` as it was.  ``"spawn"`` starts them as fresh interpreters
    (``python -m zexec ...``), for a process that must not be forked (one that holds
    a CUDA context, say); ``preload`` then names the modules the engine set imports
    before it forks the engines, so each engine starts with them loaded (True, the
    default: what this script's ``__main__`` imported, see :func:`main_imports`; or a
    list of module names; or False).  With fork, a ``preload`` list is imported too.

    ``initializer(*initargs)`` runs in every engine before its first task.  Forked, the
    engines inherit both in memory, as a forked pool's workers do (a
    ``multiprocessing.Queue`` or a lock in ``initargs`` works); spawned, they are
    pickled once into a signed file the engine set reads, so they must pickle.
    """

    def __init__(self, n: int | None = None, *, transport: str | None = None,
                 ip: str = "127.0.0.1", heartbeat_period: float = 0.5, heartbeat_misses: int = 6,
                 replace: bool = True, retries: int = 0, initializer: Callable | None = None,
                 initargs: tuple = (), max_tasks_per_child: int | None = None,
                 startup_timeout: float = 60.0, hwm: int | None = None,
                 forward_output: bool = True, curve: bool = False,
                 no_engine_timeout: float = 30.0, scheme: str = "leastload",
                 preload: Sequence[str] | bool = True, start_method: str | None = None) -> None:
        if start_method is None:
            start_method = default_start_method()
        elif start_method not in START_METHODS:
            raise ValueError(f"start_method must be one of {START_METHODS}, not {start_method!r}")
        elif start_method == "fork" and not hasattr(os, "fork"):
            raise ValueError("start_method='fork' needs os.fork (POSIX)")
        if n is None:
            n = os.cpu_count() or 1
        elif n <= 0:
            # as ProcessPoolExecutor(max_workers=0): a cluster that can run nothing
            raise ValueError(f"n must be greater than 0 (or None for one engine per core), not {n}")
        self.n = n
        self.scheme = scheme
        self.transport = transport or ("ipc" if os.name == "posix" else "tcp")
        self.ip = ip
        self.heartbeat_period = heartbeat_period
        self.heartbeat_misses = heartbeat_misses
        self.replace = replace
        self.retries = retries
        self.initializer = initializer
        self.initargs = initargs
        self.max_tasks_per_child = max_tasks_per_child
        self.startup_timeout = startup_timeout
        self.hwm = hwm
        self.forward_output = forward_output
        self.curve = curve
        self.no_engine_timeout = no_engine_timeout
        self.preload = preload
        self.start_method = start_method
        self.dir: str | None = None
        self.shm_dir: str | None = None
        self.ipc_dir: str | None = None  # the sockets' own directory, when self.dir is too deep
        self.connection_file: str | None = None
        self.procs: dict[str, subprocess.Popen | forked.ForkedProcess] = {}
        self.logs: dict[str, str] = {}
        self._executor: ZmqExecutor | None = None

    # -- processes -----------------------------------------------------------------------
    def start(self) -> "LocalCluster":
        if self.procs:
            return self
        self.dir = tempfile.mkdtemp(prefix="zexec-")
        try:
            info = ConnectionInfo(key=new_key(), transport=self.transport, ip=self.ip,
                                  heartbeat_period=self.heartbeat_period,
                                  heartbeat_misses=self.heartbeat_misses,
                                  curve=new_curve_keys() if self.curve else None)
            if self.transport == "ipc" and os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
                # big buffers go through memory, not four socket copies (see zexec.shm)
                self.shm_dir = tempfile.mkdtemp(prefix="zexec-", dir="/dev/shm")
                info = info.with_(shm_dir=self.shm_dir)
            ipc_dir = self.dir
            if self.transport == "ipc" and not ipc_fits(self.dir):
                # a unix socket's path is short (~107 bytes): under a long TMPDIR the
                # sockets get a private directory of their own in /tmp
                self.ipc_dir = ipc_dir = tempfile.mkdtemp(prefix="zexec-", dir="/tmp")
            info = allocate(info, ipc_dir=ipc_dir)
            self.connection_file = info.write(os.path.join(self.dir, "cluster.json"))
            common = ["--connection-file", self.connection_file, "--parent-pid", str(os.getpid())]
            ctl = ["controller", "--reuse", *common, "--cleanup", self.dir]
            for extra in (self.shm_dir, self.ipc_dir):
                if extra:
                    ctl += ["--cleanup", extra]
            if self.hwm:
                ctl += ["--hwm", str(self.hwm)]
            ctl += ["--no-engine-timeout", str(self.no_engine_timeout)]
            eng = ["engine", "-n", str(self.n), "--log-dir", self.dir, *common]
            if self.replace:
                eng.append("--replace")
            if self.max_tasks_per_child:
                eng += ["--max-tasks", str(self.max_tasks_per_child)]
            # forked, the engine set has this program's modules already: only a list
            # given by name is imported (what it names may not be imported here yet)
            if self.preload is True:
                modules = main_imports() if self.start_method == "spawn" else []
            else:
                modules = list(self.preload or ())
            if modules:
                eng += ["--preload", ",".join(modules)]
            if self.start_method == "fork":
                # the controller first: its start (six parts to fork, every socket to
                # bind) is the longer one, and the engines wait for it to register
                self._fork("controller", ctl)
                # the initializer and initargs are inherited in memory, never pickled, as
                # a forked pool's workers inherit theirs: a multiprocessing.Queue, a lock
                # or an open file in initargs reaches the engines (through two forks)
                init = None if self.initializer is None else (self.initializer, tuple(self.initargs))
                self._fork("engines", eng, init=init)
            else:
                if self.initializer is not None:
                    eng += ["--init-file", self._write_init(info)]
                self._spawn_both(ctl, eng)
        except BaseException:
            # nothing half-made is left: not the processes, nor the directory that holds
            # the key (an initializer that cannot be pickled fails here, for one)
            self.stop()
            raise
        return self

    def _write_init(self, info: ConnectionInfo) -> str:
        from . import serialize

        try:
            payload = serialize.dumps((self.initializer, tuple(self.initargs)))
        except Exception as e:
            if hasattr(e, "add_note"):  # 3.11+
                e.add_note("zexec: with start_method='spawn' the initializer and initargs are "
                           "pickled for the engines; use start_method='fork' (they are then "
                           "inherited) or a multiprocessing.Manager().Queue()")
            raise
        if len(payload) > 1:
            payload = [b"".join(bytes(p) for p in payload[:1])]  # initargs are small: in-band
        data = payload[0]
        path = os.path.join(self.dir, "initializer.pkl")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(Signer(info.key_bytes).sign([data]) + b"\n" + data)
        return path

    def _spawn_both(self, ctl: list, eng: list) -> None:
        env = dict(os.environ)
        # engines import what this process can: the same sys.path, as a spawned worker would
        paths = [p or os.getcwd() for p in sys.path]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
        env.setdefault("PYTHONUNBUFFERED", "1")
        # -P: ``-m`` would put the working directory first on their path, ahead of ours,
        # and a module there would shadow the one this process imported (3.11+)
        py = [sys.executable, *(("-P",) if sys.version_info >= (3, 11) else ()), "-m", "zexec"]
        self._spawn("controller", [*py, *ctl], env)
        # the engines take this process's multiprocessing authkey, as a process
        # pool's workers do (only the engine set's environment carries it; a forked
        # engine set has it in memory)
        eng_env = dict(env, **{AUTHKEY_ENV: bytes(multiprocessing.current_process().authkey).hex()})
        self._spawn("engines", [*py, *eng], eng_env)

    def _fork(self, name: str, argv: list, init: tuple | None = None) -> None:
        log_path = os.path.join(self.dir, f"{name}.log")
        self.logs[name] = log_path
        self.procs[name] = forked.start(functools.partial(commands.main, argv, init=init),
                                        log_path, args=["zexec", *argv])

    def _spawn(self, name: str, cmd: list, env: dict) -> None:
        log_path = os.path.join(self.dir, f"{name}.log")
        self.logs[name] = log_path
        with open(log_path, "ab") as logf:
            self.procs[name] = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                env=env, start_new_session=True, close_fds=True)

    def check(self) -> None:
        """Raise ClusterStartError, quoting its log, if a cluster process has exited."""
        for name, p in self.procs.items():
            rc = p.poll()
            if rc is not None:
                text = tail(self.logs[name], 200)
                if "initializer failed" in text:
                    tb = self._initializer_traceback()
                    if not tb:
                        raise InitializerError(
                            f"the engines' initializer failed; the end of {self.logs[name]}:\n"
                            + "\n".join(text.splitlines()[-20:]))
                    # as ProcessPoolExecutor's worker prints it (see Client._fail_engine_tasks)
                    print(f"Exception in initializer:\n{tb}", file=sys.stderr, flush=True)
                    err = InitializerError(f"the engines' initializer failed: {tb.splitlines()[-1]}")
                    err.__cause__ = RemoteTraceback(tb)
                    raise err
                raise ClusterStartError(
                    f"the {name} process exited with {rc}; the end of {self.logs[name]}:\n"
                    + tail(self.logs[name]))

    def _initializer_traceback(self) -> str | None:
        """The traceback a failed initializer left in an engine's log, if one did."""
        marker = "Exception in initializer:\n"
        for path in sorted(glob.glob(os.path.join(self.dir, "engine-*.log"))):
            text = tail(path, 400)
            if marker not in text:
                continue
            lines = []
            for line in text.rpartition(marker)[2].splitlines():
                if _LOG_RECORD.match(line):
                    break  # the next log record
                lines.append(line)
            return "\n".join(lines).rstrip()
        return None

    def lost(self) -> BaseException | None:
        """Why this cluster can no longer serve, once one of its processes has died
        (its executors' clients ask every 0.2 s: see ``Client.watch``); else None.

        The engine set ending normally (status 0: it stopped replacing, or had no more
        engines to keep) is not a loss; the controller ending in any way is.
        """
        for name, p in list(self.procs.items()):
            rc = p.poll()
            if rc is None or (name == "engines" and rc == 0):
                continue
            how = _how_it_ended(rc)
            if name == "engines":
                return EngineSetDiedError(
                    f"the engine set of this LocalCluster (pid {p.pid}, the process that "
                    f"forks and replaces its engines) {how}: its engines are gone and no new "
                    f"one can start; its log: {self.logs.get(name)}")
            return ClusterLostError(f"the controller of this LocalCluster (pid {p.pid}) {how}; "
                                    f"its log: {self.logs.get(name)}")
        return None

    def watch(self, client) -> None:
        """Have ``client`` fail its futures as soon as a process of this cluster dies."""
        ref = weakref.WeakMethod(self.lost)  # the client does not keep the cluster alive

        def look() -> BaseException | None:
            lost = ref()
            return lost() if lost is not None else None

        client.watch = look

    def wait_for_engines(self, client, timeout: float | None = None) -> None:
        try:
            client.wait_for_engines(self.n, timeout or self.startup_timeout, check=self.check)
        except TimeoutError as e:
            tails = "\n".join(f"--- {n}:\n{tail(p)}" for n, p in self.logs.items())
            raise ClusterStartError(f"{e}; logs in {self.dir}:\n{tails}") from None

    def stop(self, timeout: float = 5.0) -> None:
        """Stop every process of the cluster (TERM, then KILL) and remove its files."""
        procs, self.procs = self.procs, {}
        deadline = time.monotonic() + timeout
        # engines first: stopped while their hub still answers, they exit at once
        for name in ("engines", "controller"):
            p = procs.get(name)
            if p is None:
                continue
            if p.poll() is None:
                try:
                    p.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        for d in (self.dir, self.shm_dir, self.ipc_dir):
            if d and os.path.isdir(d):
                shutil.rmtree(d, ignore_errors=True)

    # -- context manager -----------------------------------------------------------------
    def executor(self, **kwargs: Any) -> ZmqExecutor:
        """A new ZmqExecutor (client) on this cluster."""
        kwargs.setdefault("retries", self.retries)
        kwargs.setdefault("scheme", self.scheme)
        kwargs.setdefault("forward_output", self.forward_output)
        ex = ZmqExecutor(connection=self.connection_file, **kwargs)
        ex._made_by = self
        self.watch(ex.client)
        return ex

    def __enter__(self) -> ZmqExecutor:
        self.start()
        try:
            ex = self.executor()
            self.wait_for_engines(ex.client)
        except BaseException:
            self.stop()
            raise
        self._executor = ex
        return ex

    def __exit__(self, *exc: Any) -> None:
        try:
            if self._executor is not None:
                if exc[0] is None:
                    self._executor.shutdown(wait=True)
                else:
                    self._executor._abandon()
        finally:
            self._executor = None
            self.stop()

    def __del__(self) -> None:
        if getattr(self, "procs", None):  # None: __init__ refused its arguments
            self.stop(timeout=1.0)


def _how_it_ended(rc: int) -> str:
    if rc < 0:
        try:
            return f"was killed by signal {signal.Signals(-rc).name}"
        except ValueError:
            return f"was killed by signal {-rc}"
    return f"exited with status {rc}"


_executor._cluster_factory = LocalCluster
