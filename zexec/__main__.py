"""Command line: ``zexec controller|engine|status|stop|local`` (also ``python -m zexec``).

``controller`` and ``engine`` are the process commands of zexec.commands (which the
processes LocalCluster forks run too); ``status``, ``stop`` and ``local`` are added here,
on top: they use the client and LocalCluster.

Every failure a user can cause (a missing or stale connection file, a directory that
does not exist, a controller that does not answer) is one line on stderr and exit
status 1, never a Python traceback.
"""

from __future__ import annotations

import argparse
import json
import sys

from . import commands
from .commands import CommandError, read_info


def _client(args):
    """A client of the cluster; a controller that does not answer is a one-line error.

    A live controller answers in milliseconds, so the wait is short (--connect-timeout):
    a stale connection file (the controller is gone) is reported at once.
    """
    from .client import Client
    from .errors import ClusterLostError

    info = read_info(args.connection_file)
    try:
        return Client(info, timeout=args.connect_timeout, forward_output=False)
    except ClusterLostError as e:
        raise CommandError(f"{e}; if the controller was stopped, the connection file "
                           f"{args.connection_file} is stale") from None


def _request(c, msg_type: str, timeout: float) -> dict:
    try:
        return c.request(msg_type, timeout=timeout)
    except TimeoutError as e:
        raise CommandError(str(e)) from None


def _status(args) -> int:
    c = _client(args)
    try:
        st = _request(c, "queue_request", args.timeout)
    finally:
        c.close()
    if args.json:
        print(json.dumps(st, indent=1))
        return 0
    print(f"{'id':>4} {'host':<20} {'pid':>8} {'done':>8} {'queued':>7}")
    for e in st["engines"]:
        print(f"{e['id']:>4} {e.get('hostname', '?'):<20} {e.get('pid', '?'):>8} "
              f"{e.get('tasks_done', 0):>8} {e.get('queued', 0):>7}")
    print(f"task scheduler queue: {st.get('task_queue', 0)}")
    print("tasks: " + ", ".join(f"{k} {v}" for k, v in sorted(st.get("tasks", {}).items())))
    return 0


def _stop(args) -> int:
    c = _client(args)
    try:
        engines = c.engines
        c.shutdown_engines(engines)
        _request(c, "shutdown_request", args.timeout)
    finally:
        c.close()
    print(f"stopped the controller and {len(engines)} engines")
    return 0


def _local(args) -> int:
    from .cluster import LocalCluster
    from .errors import ClusterStartError

    try:
        cluster = LocalCluster(args.n, transport="tcp", ip=args.ip)
        ex = cluster.__enter__()
    except ValueError as e:
        raise CommandError(str(e)) from None
    except OSError as e:
        raise CommandError(f"cannot listen on {args.ip}: {e.strerror or e}") from None
    except ClusterStartError as e:
        # its message quotes a log that is gone with the cluster: keep its last line
        lines = [line for line in str(e).splitlines() if line.strip()]
        head = lines[0].split("; the end of")[0].rstrip(":")
        raise CommandError(head + (f": {lines[-1].strip()}" if len(lines) > 1 else "")) from None
    except KeyboardInterrupt:
        return 130
    try:
        print(f"zexec LocalCluster: {len(ex.engines)} engines; connection file: "
              f"{cluster.connection_file}", flush=True)
        print("Ctrl-C to stop", flush=True)
        # until Ctrl-C, or the controller stops (`zexec stop`)
        cluster.procs["controller"].wait()
        print("the controller stopped", flush=True)
    except KeyboardInterrupt:
        print("stopping", flush=True)
    finally:
        cluster.__exit__(None, None, None)
    return 0


def parser() -> argparse.ArgumentParser:
    """The command line's parser (its sub-commands and every option's help)."""
    p, sub = commands.parser()  # controller, engine
    for name, fn, text in (("status", _status, "engines, queues and tasks of a running cluster"),
                           ("stop", _stop, "stop the controller, its engines and the engine sets "
                                           "that run them")):
        s = sub.add_parser(name, help=text, description=text)
        s.add_argument("--connection-file", required=True,
                       help="the controller's connection file (zexec controller writes it)")
        s.add_argument("--connect-timeout", type=float, default=2.0,
                       help="seconds to wait for the controller to answer at all (default "
                            "%(default)s; a live one answers in milliseconds)")
        s.add_argument("--timeout", type=float, default=10.0,
                       help="seconds to wait for the answer to the request (default %(default)s)")
        if name == "status":
            s.add_argument("--json", action="store_true", help="print the raw status as JSON")
        s.set_defaults(func=fn)

    loc = sub.add_parser("local", help="run a LocalCluster in the foreground until Ctrl-C")
    loc.add_argument("-n", type=int, default=None, help="number of engines (default: cores)")
    loc.add_argument("--ip", default="127.0.0.1",
                     help="address to bind (default 127.0.0.1; 0.0.0.0 for all)")
    loc.set_defaults(func=_local)
    return p


def main(argv: list[str] | None = None) -> int:
    return commands.run(parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
