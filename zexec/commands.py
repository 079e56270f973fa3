"""The process commands: ``zexec controller`` and ``zexec engine``.

They start a cluster's processes, and run the same code however they are started: from
the user's command line (``zexec.__main__``, which adds ``status``, ``stop`` and ``local``
beside them), as ``python -m zexec ...`` subprocesses, or in processes LocalCluster forks
(``main``).  This module sits below ``zexec.cluster``, so the forked processes never load
the command line above it.

A failure a user can cause (a missing or stale connection file, a directory that does not
exist) is a CommandError: one line on stderr (``zexec CMD: error: ...``), exit status 1.
"""

from __future__ import annotations

import argparse
import os
import sys

DEFAULT_CONNECTION_FILE = "zexec-cluster.json"


class CommandError(Exception):
    """A failure to report as one line (``zexec CMD: error: ...``), with exit status 1."""


def read_info(path: str):
    """The connection file, or a CommandError that says what is wrong with it."""
    from .connection import ConnectionInfo

    try:
        return ConnectionInfo.read(path)
    except FileNotFoundError:
        raise CommandError(f"no connection file {path} (a controller writes it: "
                           "zexec controller --connection-file PATH)") from None
    except IsADirectoryError:
        raise CommandError(f"{path} is a directory, not a connection file") from None
    except OSError as e:
        raise CommandError(f"cannot read the connection file {path}: {e.strerror}") from None
    except (ValueError, TypeError, KeyError) as e:
        raise CommandError(f"{path} is not a zexec connection file ({e})") from None


def _port_range(text: str) -> tuple[int, int]:
    try:
        a, b = (int(x) for x in text.split("-"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port range like 20000-20100") from None
    if not 0 < a <= b < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port range like 20000-20100")
    return a, b


def _controller(args) -> int:
    from .connection import ConnectionInfo, allocate, new_curve_keys, new_key
    from .controller import supervisor

    if args.reuse:
        info = read_info(args.connection_file)
    else:
        rng = args.port_range
        location = args.location
        if location is None and args.ip in ("0.0.0.0", "*"):
            import socket

            location = socket.gethostbyname(socket.gethostname())
        info = ConnectionInfo(key=new_key(), transport="tcp", ip=args.ip,
                              heartbeat_period=args.heartbeat_period,
                              heartbeat_misses=args.heartbeat_misses, location=location,
                              curve=new_curve_keys() if args.curve else None)
        try:
            info = allocate(info, port_range=rng)
        except OSError as e:
            raise CommandError(f"cannot listen on {args.ip}: {e.strerror or e}") from None
        folder = os.path.dirname(os.path.abspath(args.connection_file))
        if not os.path.isdir(folder):
            raise CommandError(f"cannot write the connection file {args.connection_file}: "
                               f"no directory {folder}")
        try:
            info.write(args.connection_file)
        except OSError as e:
            raise CommandError(f"cannot write the connection file {args.connection_file}: "
                               f"{e.strerror}") from None
    path = os.path.abspath(args.connection_file)
    return supervisor.run(info, hwm=args.hwm, parent_pid=args.parent_pid,
                          no_engine_timeout=args.no_engine_timeout, cleanup=tuple(args.cleanup),
                          ready_message=f"zexec controller running; connection file: {path}")


def _engine(args) -> int:
    from .engineset import main

    info = read_info(args.connection_file)
    return main(info, args.n, parent_pid=args.parent_pid, replace=args.replace,
                log_dir=args.log_dir, max_tasks=args.max_tasks, init_file=args.init_file,
                init=getattr(args, "init", None),
                preload=[m for arg in args.preload for m in arg.split(",") if m])


def parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """The ``zexec`` parser with the process commands, and its sub-parsers, to which the
    command line adds its own commands."""
    p = argparse.ArgumentParser(prog="zexec", description="A ZeroMQ compute cluster behind concurrent.futures.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("controller", help="start the hub, schedulers and heartbeat; write the connection file")
    c.add_argument("--ip", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for all)")
    c.add_argument("--location", default=None,
                   help="address engines and clients connect to, when --ip is 0.0.0.0 (default: this host's address)")
    c.add_argument("--port-range", type=_port_range, help="ports to use, e.g. 20000-20100 (default: any free)")
    c.add_argument("--connection-file", default=DEFAULT_CONNECTION_FILE,
                   help="where to write the connection file (default %(default)s)")
    c.add_argument("--heartbeat-period", type=float, default=0.5, help="seconds between pings (default 0.5)")
    c.add_argument("--heartbeat-misses", type=int, default=6,
                   help="missed pings before an engine is declared dead (default 6)")
    c.add_argument("--curve", action="store_true",
                   help="encrypt all traffic with CurveZMQ (keys generated now, kept in the connection file)")
    c.add_argument("--hwm", type=int, default=None, help="fixed bound on tasks outstanding per engine (default adaptive)")
    c.add_argument("--no-engine-timeout", type=float, default=30.0,
                   help="fail queued load-balanced tasks after this many seconds without any engine (default 30)")
    c.add_argument("--reuse", action="store_true", help="use the connection file as it is (key and addresses)")
    c.add_argument("--parent-pid", type=int, default=0, help=argparse.SUPPRESS)
    c.add_argument("--cleanup", action="append", default=[], help=argparse.SUPPRESS)
    c.set_defaults(func=_controller)

    e = sub.add_parser("engine", help="start engines that join a controller")
    e.add_argument("--connection-file", required=True, help="the controller's connection file")
    e.add_argument("-n", type=int, default=1, help="number of engines (default 1)")
    e.add_argument("--replace", action="store_true", help="replace engines that die, keeping n alive")
    e.add_argument("--max-tasks", type=int, default=None, help="recycle an engine after this many tasks")
    e.add_argument("--log-dir", default=None, help="one log file per engine in this directory")
    e.add_argument("--preload", action="append", default=[], metavar="MODULES",
                   help="modules (comma-separated; repeatable) to import before the engines are "
                        "forked, so each starts with them loaded; one that fails is skipped")
    e.add_argument("--init-file", default=None, help=argparse.SUPPRESS)
    e.add_argument("--parent-pid", type=int, default=0, help=argparse.SUPPRESS)
    e.set_defaults(func=_engine)
    return p, sub


def run(args: argparse.Namespace) -> int:
    """Run a parsed command: its exit status, a CommandError as one line and status 1."""
    try:
        return args.func(args) or 0
    except CommandError as e:
        print(f"zexec {args.command}: error: {e}", file=sys.stderr)
        return 1


def main(argv: list[str], init: tuple | None = None) -> int:
    """``zexec controller|engine ARGV`` in a process LocalCluster forked: what
    ``python -m zexec ARGV`` runs.

    ``init``: the engines' ``(initializer, initargs)``, inherited in memory from the
    process that forked this one (never on a command line nor in a file: they may not
    pickle, e.g. a ``multiprocessing.Queue``)."""
    args = parser()[0].parse_args(argv)
    args.init = init
    return run(args)
