"""Connection information: where the registrar listens, the key, the transport.

One small frozen dataclass, written to and read from a JSON connection file that only
its owner may read (mode 0600): the file holds the cluster key.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import sys
from dataclasses import asdict, dataclass, field, replace
from typing import Any

#: the environment variable through which LocalCluster hands its process's
#: multiprocessing authkey to its engines (see zexec.engineset)
AUTHKEY_ENV = "ZEXEC_MP_AUTHKEY"
#: the controller's sockets, in the order they are allocated
CHANNELS = ("registration", "notification", "monitor", "mux_client", "mux_engine",
            "control_client", "control_engine", "task_client", "task_engine",
            "iopub_engine", "iopub_client", "hb_ping", "hb_pong")


@dataclass(frozen=True)
class ConnectionInfo:
    """Everything a client or engine needs to join a cluster."""

    key: str
    transport: str = "tcp"
    ip: str = "127.0.0.1"
    #: channel name -> port (tcp) or socket path (ipc)
    addresses: dict = field(default_factory=dict)
    signature_scheme: str = "hmac-sha256"
    heartbeat_period: float = 0.5
    heartbeat_misses: int = 6
    curve: dict | None = None
    #: the address clients and engines connect to, when ``ip`` is a wildcard
    location: str | None = None
    #: a private tmpfs directory for large buffers, when every process shares this host
    shm_dir: str | None = None

    def shm_store(self):
        """The ShmStore for this cluster, or None where buffers go through the sockets."""
        if self.transport != "ipc" or not self.shm_dir or not os.path.isdir(self.shm_dir):
            return None
        from .shm import ShmStore

        return ShmStore(self.shm_dir)

    @property
    def key_bytes(self) -> bytes:
        return self.key.encode()

    def url(self, channel: str, host: str | None = None) -> str:
        """The zmq endpoint of ``channel``; ``host`` overrides the ip for connecting."""
        where = self.addresses.get(channel)
        if where is None:
            raise ValueError(f"this connection information has no {channel!r} address (it has: "
                             f"{', '.join(sorted(self.addresses)) or 'none'}); is it a zexec "
                             f"connection file written by 'zexec controller'?")
        if self.transport == "ipc":
            return f"ipc://{where}"
        if channel == "monitor":
            return f"tcp://127.0.0.1:{where}"  # the hub binds its monitor on loopback only
        ip = host or self.ip
        if ip in ("0.0.0.0", "*", ""):
            ip = self.location or "127.0.0.1"
        if ":" in ip and not ip.startswith("["):
            ip = f"[{ip}]"
        return f"{self.transport}://{ip}:{where}"

    def bind_url(self, channel: str) -> str:
        where = self.addresses[channel]
        if self.transport == "ipc":
            return f"ipc://{where}"
        ip = self.ip if self.ip not in ("", "0.0.0.0") else "*"
        if ":" in ip and not ip.startswith("["):
            ip = f"[{ip}]"
        return f"{self.transport}://{ip}:{where}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ConnectionInfo":
        known = {f for f in cls.__dataclass_fields__}
        info = cls(**{k: v for k, v in d.items() if k in known})
        if not info.key:
            # an empty key would sign nothing, and pickles would be unpickled unchecked
            raise ValueError("the connection file has no key: refusing to run unsigned")
        return info

    def write(self, path: str) -> str:
        """Write the file with mode 0600 (created so; never world-readable even briefly).

        The temporary file has a random name and is created with O_EXCL (and without
        following a symlink): in a shared sticky directory another user could otherwise
        create it first, keep it open, and read the key we write into their file.
        """
        path = os.path.abspath(path)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        for _ in range(100):
            tmp = f"{path}.{secrets.token_hex(8)}.tmp"
            try:
                fd = os.open(tmp, flags, 0o600)
                break
            except FileExistsError:
                continue
        else:  # pragma: no cover - 100 collisions of 64 random bits
            raise FileExistsError(f"could not create a temporary file next to {path}")
        try:
            with os.fdopen(fd, "w") as f:
                os.fchmod(f.fileno(), 0o600)  # whatever the umask did
                json.dump(self.to_dict(), f, indent=1)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        return path

    @classmethod
    def read(cls, path: str) -> "ConnectionInfo":
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def with_(self, **changes: Any) -> "ConnectionInfo":
        return replace(self, **changes)


def new_curve_keys() -> dict:
    """A CurveZMQ key pair for the controller and one shared by its engines and clients."""
    import zmq

    server_public, server_secret = zmq.curve_keypair()
    client_public, client_secret = zmq.curve_keypair()
    return {"server_public": server_public.decode(), "server_secret": server_secret.decode(),
            "client_public": client_public.decode(), "client_secret": client_secret.decode()}


#: a socket that connects before its peer has bound (a cluster's processes come up in
#: any order) tries again after RECONNECT_FIRST ms, doubling up to RECONNECT_MAX ms:
#: libzmq's fixed 100 ms retry held each starting cluster up for up to a tenth of a
#: second per hop (client to hub, engine to device, device to the hub's monitor)
RECONNECT_FIRST = 10
RECONNECT_MAX = 100


def context():
    """A zmq context whose sockets retry a connection soon at first (RECONNECT_FIRST)."""
    import zmq

    ctx = zmq.Context()
    ctx.setsockopt(zmq.RECONNECT_IVL, RECONNECT_FIRST)
    ctx.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_MAX)
    return ctx


def secure(sock, info: ConnectionInfo, server: bool) -> None:
    """Turn on CurveZMQ for ``sock`` when the cluster has keys: encrypted, and only
    peers holding the cluster's server public key can complete a handshake."""
    keys = info.curve
    if not keys:
        return
    if server:
        sock.curve_secretkey = keys["server_secret"].encode()
        sock.curve_publickey = keys["server_public"].encode()
        sock.curve_server = True
    else:
        sock.curve_serverkey = keys["server_public"].encode()
        sock.curve_publickey = keys["client_public"].encode()
        sock.curve_secretkey = keys["client_secret"].encode()


#: largest message a subscriber may send to the controller's XPUBs: a handshake and a
#: subscription to one of our short topics fit; a stranger's long topics do not
SUBSCRIBER_MAX_MSG = 64


def guard_xpub(sock, info: ConnectionInfo) -> None:
    """Bound what strangers' subscriptions can cost an XPUB (notification, hb_ping).

    Anyone who can connect can subscribe, as fast as they can send.  With a receive
    high-water mark of 1 the XPUB takes in a peer's next subscription only once we
    have read the last, so a flood waits in the flooder's own queues, not in ours
    (an XPUB otherwise moves all it receives into an unbounded list on every call).
    Long topics disconnect their sender; each distinct topic still costs a few bytes
    for as long as its subscriber stays connected (see security.md).  With Curve,
    strangers cannot connect, and the handshake is larger than the limit.
    """
    import zmq

    sock.rcvhwm = 1
    if not info.curve:
        sock.setsockopt(zmq.MAXMSGSIZE, SUBSCRIBER_MAX_MSG)


def new_key() -> str:
    return secrets.token_hex(32)


def free_ports(n: int, ip: str = "127.0.0.1", port_range: tuple[int, int] | None = None) -> list[int]:
    """``n`` distinct ports free at this moment (bound, then released, all at once)."""
    socks, ports = [], []
    try:
        candidates = iter(range(port_range[0], port_range[1] + 1)) if port_range else None
        while len(ports) < n:
            s = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET)
            port = 0
            if candidates is not None:
                port = next(candidates, None)
                if port is None:
                    raise OSError(f"not enough free ports in {port_range[0]}-{port_range[1]}")
            try:
                s.bind((ip if ip not in ("*",) else "", port))
            except OSError:
                s.close()
                if candidates is None:
                    raise
                continue
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


#: the longest path of a unix socket (sun_path: 108 bytes on Linux, 104 on BSD and
#: macOS, with its terminating NUL)
IPC_PATH_MAX = 103 if sys.platform == "darwin" or "bsd" in sys.platform else 107


def ipc_fits(directory: str) -> bool:
    """Whether every channel's socket path under ``directory`` fits a unix socket."""
    longest = max(CHANNELS, key=len)
    return len(os.fsencode(os.path.join(os.path.abspath(directory), longest))) <= IPC_PATH_MAX


def allocate(info: ConnectionInfo, ipc_dir: str | None = None,
             port_range: tuple[int, int] | None = None) -> ConnectionInfo:
    """Fill in an address for every controller channel."""
    if info.transport == "ipc":
        if ipc_dir is None:
            raise ValueError("ipc transport needs a directory for its sockets")
        if not ipc_fits(ipc_dir):
            # zmq would say only "File name too long", in whichever process binds first
            longest = os.path.join(os.path.abspath(ipc_dir), max(CHANNELS, key=len))
            raise ValueError(
                f"ipc socket paths in {ipc_dir!r} are too long for a unix socket "
                f"({len(os.fsencode(longest))} bytes, at most {IPC_PATH_MAX}): use a shorter "
                f"directory (e.g. TMPDIR=/tmp) or transport='tcp'")
        addrs = {c: os.path.join(ipc_dir, c) for c in CHANNELS}
    else:
        addrs = dict(zip(CHANNELS, free_ports(len(CHANNELS), info.ip, port_range)))
    return info.with_(addresses=addrs)
