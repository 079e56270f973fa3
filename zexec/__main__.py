"""Command line: ``zexec controller|engine|status|stop|local`` (also ``python -m zexec``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _controller(args) -> int:
    from .connection import ConnectionInfo, allocate, new_curve_keys, new_key
    from .controller import supervisor

    if args.reuse:
        info = ConnectionInfo.read(args.connection_file)
    else:
        rng = None
        if args.port_range:
            a, b = args.port_range.split("-")
            rng = (int(a), int(b))
        location = args.location
        if location is None and args.ip in ("0.0.0.0", "*"):
            import socket

            location = socket.gethostbyname(socket.gethostname())
        info = ConnectionInfo(key=new_key(), transport="tcp", ip=args.ip,
                              heartbeat_period=args.heartbeat_period,
                              heartbeat_misses=args.heartbeat_misses, location=location,
                              curve=new_curve_keys() if args.curve else None)
        info = allocate(info, port_range=rng)
        info.write(args.connection_file)
    path = os.path.abspath(args.connection_file)
    return supervisor.run(info, hwm=args.hwm, parent_pid=args.parent_pid,
                          no_engine_timeout=args.no_engine_timeout, cleanup=tuple(args.cleanup),
                          ready_message=f"zexec controller running; connection file: {path}")


def _engine(args) -> int:
    from .connection import ConnectionInfo
    from .engineset import main

    info = ConnectionInfo.read(args.connection_file)
    return main(info, args.n, parent_pid=args.parent_pid, replace=args.replace,
                log_dir=args.log_dir, max_tasks=args.max_tasks, init_file=args.init_file)


def _client(args):
    from .client import Client

    return Client(args.connection_file, timeout=args.timeout, forward_output=False)


def _status(args) -> int:
    c = _client(args)
    try:
        st = c.request("queue_request", timeout=args.timeout)
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
        c.request("shutdown_request", timeout=args.timeout)
    finally:
        c.close()
    print(f"stopped the controller and {len(engines)} engines")
    return 0


def _local(args) -> int:
    from .cluster import LocalCluster

    cluster = LocalCluster(args.n, transport="tcp", ip=args.ip)
    with cluster as ex:
        print(f"zexec LocalCluster: {len(ex.engines)} engines; connection file: "
              f"{cluster.connection_file}", flush=True)
        print("Ctrl-C to stop", flush=True)
        try:
            while True:
                time.sleep(3600)  # the foreground process just waits for Ctrl-C
        except KeyboardInterrupt:
            print("stopping", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="zexec", description="A ZeroMQ compute cluster behind concurrent.futures.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("controller", help="start the hub, schedulers and heartbeat; write the connection file")
    c.add_argument("--ip", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for all)")
    c.add_argument("--location", default=None,
                   help="address engines and clients connect to, when --ip is 0.0.0.0 (default: this host's address)")
    c.add_argument("--port-range", help="ports to use, e.g. 20000-20100 (default: any free)")
    c.add_argument("--connection-file", default="zexec-cluster.json", help="where to write the connection file")
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
    e.add_argument("--init-file", default=None, help=argparse.SUPPRESS)
    e.add_argument("--parent-pid", type=int, default=0, help=argparse.SUPPRESS)
    e.set_defaults(func=_engine)

    for name, fn, text in (("status", _status, "engines, queues and tasks of a running cluster"),
                           ("stop", _stop, "stop the engines and the controller cleanly")):
        s = sub.add_parser(name, help=text)
        s.add_argument("--connection-file", required=True)
        s.add_argument("--timeout", type=float, default=10.0)
        if name == "status":
            s.add_argument("--json", action="store_true", help="print the raw status as JSON")
        s.set_defaults(func=fn)

    loc = sub.add_parser("local", help="run a LocalCluster in the foreground until Ctrl-C")
    loc.add_argument("-n", type=int, default=None, help="number of engines (default: cores)")
    loc.add_argument("--ip", default="127.0.0.1")
    loc.set_defaults(func=_local)

    args = p.parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
