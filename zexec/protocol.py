"""Message framing, signing and verification: plain frames in, plain frames out.

A message on the wire is one multipart frame list::

    [routing identities...] DELIM signature header parent content buffers...

``header``, ``parent`` and ``content`` are JSON; ``buffers`` are opaque bytes (pickles and
their out-of-band buffers).  ``signature`` is HMAC-SHA256 with the cluster key over every
frame after it, each preceded by its length so frame boundaries are signed too.  A frame
of 1 MiB or more enters the HMAC as the SHA-256 of its 4 MiB chunks, hashed by a few
threads at once (hashlib releases the GIL; it pays where cores are real, and costs nothing
measurable on this project's 2-vCPU machine, where it does not help).  A message with
such a frame also carries ``:`` and an HMAC of its header alone, which is all the task
scheduler checks: it routes the payload without reading it.

Receivers verify before they parse anything else, so a bad message is dropped before a
byte of it is unpickled; a signature seen before is rejected as a replay.  This module
owns no socket.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import logging
import os
import threading
import time
import uuid
from typing import Any, Iterable, NamedTuple, Sequence

from .errors import ProtocolError

DELIM = b"<IDS|MSG>"
PROTOCOL_VERSION = "1"

#: frames at least this long are signed through their chunked SHA-256 digest
BIG_FRAME = 1 << 20
_CHUNK = 4 << 20

log = logging.getLogger("zexec.protocol")

_EMPTY = b"{}"


def _not_serializable(obj: Any) -> Any:
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def _json_encoder():
    """Compact JSON (no spaces, UTF-8 as is), through the C encoder built once.

    ``json.dumps`` builds that C encoder anew on every call, behind two Python frames:
    a third of the time of a header (3.3 -> 2.3 us; a small content 1.4 -> 0.6 us).
    Every message is encoded and parsed in two or three processes, so it adds up.
    """
    from json import encoder as jenc

    c_make, esc = getattr(jenc, "c_make_encoder", None), getattr(jenc, "c_encode_basestring", None)
    if c_make is None or esc is None:  # pragma: no cover - a Python without _json
        encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
        return lambda obj: encode(obj).encode()
    # no circular-reference check (like check_circular=False): our messages are trees
    c = c_make(None, _not_serializable, esc, None, ":", ",", False, False, True)
    join = "".join
    return lambda obj: join(c(obj, 0)).encode()


dumps = _json_encoder()
dumps.__doc__ = "Compact JSON as bytes (the encoding of header, parent and content)."

_scan = json.JSONDecoder().scan_once  # the C scanner json.loads ends in
_SPACE = " \t\n\r"


def loads(data: Any) -> Any:
    """Parse a JSON frame (bytes, memoryview or zmq.Frame): one JSON value, UTF-8.

    The C scanner called directly, without ``json.loads``'s encoding detection and
    Python wrappers (3.3 -> 1.6 us for a header).  Raises ValueError (or its subclass
    UnicodeDecodeError) on anything malformed, as ``json.loads`` does.
    """
    if not isinstance(data, str):
        data = (data if isinstance(data, bytes) else bytes(data)).decode()
    start = 0
    if data[:1] in _SPACE:
        start = len(data) - len(data.lstrip(_SPACE))
    try:
        obj, end = _scan(data, start)
    except StopIteration as e:
        raise ValueError(f"malformed JSON at character {e.value}") from None
    except RecursionError:
        # a RuntimeError, which no receiver expects from parsing: one message of
        # "[[[[..." would otherwise take down whoever reads it
        raise ValueError("JSON nested too deeply") from None
    if end != len(data) and data[end:].strip(_SPACE):
        raise ValueError(f"extra data after JSON value at character {end}")
    if "\\u" in data and _lone_surrogate(obj):
        raise ValueError("a lone surrogate in a JSON string (it cannot be encoded again)")
    return obj


def _lone_surrogate(obj: Any) -> bool:
    """True if ``obj`` holds a string with a lone surrogate.

    JSON can escape half of a UTF-16 pair (``"\\ud800"``); Python keeps it as a lone
    surrogate, which no UTF-8 encoder accepts, so a process that stored it would fail
    later, where it publishes or answers.  Our encoder never escapes non-ASCII text,
    so only the rare message with an escape at all is encoded again to find out.
    """
    try:
        dumps(obj)
    except UnicodeEncodeError:
        return True
    return False


#: threads hashing one big frame's chunks, the calling thread included
HASH_THREADS = max(2, os.cpu_count() or 2)


def big_digest(view: memoryview) -> bytes:
    """SHA-256 over the SHA-256 digests of 4 MiB chunks of ``view``, chunks in parallel.

    The helper threads live only for this call (starting one costs far less than
    hashing a chunk), so nothing of ours outlives a client or survives a fork.
    """
    n = view.nbytes
    chunks = [view[i:i + _CHUNK] for i in range(0, n, _CHUNK)]
    digests: list = [None] * len(chunks)
    k = min(len(chunks), HASH_THREADS)

    def work(first: int) -> None:
        for i in range(first, len(chunks), k):
            digests[i] = hashlib.sha256(chunks[i]).digest()

    helpers = [threading.Thread(target=work, args=(j,), name="zexec-hash", daemon=True)
               for j in range(1, k)]
    for t in helpers:
        t.start()
    work(0)
    for t in helpers:
        t.join()
    h = hashlib.sha256()
    for d in digests:
        if d is None:  # a helper failed (it cannot, short of memory): no valid signature
            raise ProtocolError("a chunk of a big frame could not be hashed")
        h.update(d)
    return h.digest()


def _view(frame: Any) -> memoryview:
    view = memoryview(frame)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


class Signer:
    """HMAC-SHA256 over a list of frames with one key; an empty key signs nothing.

    Each frame enters as its 8-byte length, then its bytes (or, from BIG_FRAME up,
    ``b"T"`` and its chunked digest).  Small messages are joined and hashed in one
    C call: per-frame ``update`` calls cost more than the copy.
    """

    def __init__(self, key: bytes) -> None:
        self.key = key
        self._template = hmac.new(key, digestmod=hashlib.sha256) if key else None

    def sign(self, frames: Iterable[Any]) -> bytes:
        return self.sign_sized(frames)[0]

    def sign_sized(self, frames: Iterable[Any]) -> tuple[bytes, bool]:
        """The signature, and whether a frame was big (sized once, for ``Session.pack``)."""
        if self._template is None:
            return b"", False
        parts = []
        big = False
        for f in frames:
            n = len(f) if isinstance(f, bytes) else _view(f).nbytes
            parts.append(_LEN[n] if n < 256 else n.to_bytes(8, "little"))
            if n < BIG_FRAME:
                parts.append(f)
            else:
                big = True
                parts.append(b"T" + big_digest(_view(f)))
        h = self._template.copy()  # copying a keyed state skips OpenSSL's per-call digest lookup
        h.update(b"".join(parts))
        return h.hexdigest().encode(), big

    def sign_head(self, header: bytes) -> bytes:
        h = self._template.copy()
        h.update(b"head:" + header)
        return h.hexdigest().encode()


_LEN = [n.to_bytes(8, "little") for n in range(256)]


def _bytes(f: Any) -> bytes:
    return f if isinstance(f, bytes) else bytes(f)


class ReplayGuard:
    """Remembers the most recent ``size`` signatures and rejects one seen again."""

    def __init__(self, size: int = 1 << 16) -> None:
        self.size = size
        self._seen: dict[bytes, None] = {}

    def check(self, sig: bytes) -> bool:
        """Record ``sig``; False if it was already recorded (a replay)."""
        seen = self._seen
        if sig in seen:
            return False
        seen[sig] = None
        if len(seen) > self.size:
            # dicts keep insertion order: drop the oldest tenth in one sweep
            for old in list(itertools.islice(seen, self.size // 10)):
                del seen[old]
        return True

    def forget(self, sig: bytes) -> None:
        """Accept ``sig`` once more: its message was handed back unused, to come again."""
        self._seen.pop(sig, None)


class Message(NamedTuple):
    idents: list
    header: dict
    parent: dict
    content: dict
    buffers: list
    signature: bytes


# -- what receivers read, and the types they accept -------------------------------------
# A signed message may still come from a buggy or hostile key holder.  Every process
# checks a message against these once, where it parses it, so no handler further in
# meets a list where it reads a string (a dict key, an identity) or a string where it
# counts.  Fields not listed are not read by anyone; absent ones are fine unless required.

#: longest id accepted (zmq routing identities are at most 255 bytes)
MAX_ID = 255


def _id(v: Any) -> bool:
    return type(v) is str and 0 < len(v) <= MAX_ID


def _text(v: Any) -> bool:
    return type(v) is str


def _int(v: Any) -> bool:
    return isinstance(v, int) and -(1 << 63) <= v < 1 << 63


def _num(v: Any) -> bool:
    return type(v) is float or _int(v)


def _bool(v: Any) -> bool:
    return type(v) is bool


def _ids(v: Any) -> bool:
    return type(v) is list and all(type(x) is str and len(x) <= MAX_ID for x in v)


def _dict(v: Any) -> bool:
    return type(v) is dict


def _list(v: Any) -> bool:
    return type(v) is list


def _opt(pred):
    return lambda v: v is None or pred(v)


#: field -> (check, required)
HEADER = {"msg_id": (_id, True), "msg_type": (_id, True), "session": (_text, False),
          "date": (_num, False), "reply_to": (_id, False), "retries": (_opt(_int), False),
          "parent_id": (_id, False), "status": (_id, False), "engine": (_opt(_int), False),
          "started": (_num, False), "completed": (_num, False), "elapsed": (_num, False),
          "shm": (_bool, False), "forward": (_bool, False)}
#: one log record of a task (see zexec.logforward): plain fields, the message formatted
LOG_RECORD = {"name": (_text, True), "levelno": (_int, True), "msg": (_text, True),
              "levelname": (_opt(_text), False), "pathname": (_opt(_text), False),
              "filename": (_opt(_text), False), "module": (_opt(_text), False),
              "lineno": (_opt(_int), False), "funcName": (_opt(_text), False),
              "created": (_num, False), "msecs": (_num, False), "process": (_opt(_int), False),
              "processName": (_opt(_text), False), "thread": (_opt(_int), False),
              "threadName": (_opt(_text), False), "exc_text": (_opt(_text), False),
              "stack_info": (_opt(_text), False)}


def _records(v: Any) -> bool:
    return type(v) is list and all(type(r) is dict and _fields_ok(r, LOG_RECORD) for r in v)


_ENGINE_REPORT = {"uuid": (_id, True)}
CONTENT = {
    "apply_request": {"fn": (_text, False), "nfn": (_int, False), "chunk": (_bool, False),
                      "shm": (_list, False), "refs": (_list, False), "batch": (_list, False),
                      "packed": (_int, False)},
    "abort_request": {"msg_ids": (_ids, True), "give_back": (_bool, False)},
    "resend_request": {"msg_ids": (_ids, True)},
    "abort_reply": {"aborted": (_ids, False), "not_found": (_ids, False)},
    "resend_reply": {"missing": (_ids, False)},
    "apply_reply": {"status": (_id, False), "ename": (_opt(_text), False),
                    "evalue": (_opt(_text), False), "engine": (_opt(_dict), False),
                    "shm": (_list, False), "batch": (_list, False), "packed": (_int, False),
                    "log": (_records, False), "stdout": (_text, False), "stderr": (_text, False)},
    "status": {"state": (_text, False), "msg_id": (_id, False)},
    "stream": {"name": (_text, False), "text": (_text, False)},
    "log": {"records": (_records, True), "msg_id": (_id, False), "engine": (_opt(_int), False)},
    "registration_request": {"uuid": (_id, True), "hostname": (_opt(_text), False),
                             "pid": (_opt(_int), False), "log": (_opt(_text), False),
                             "launcher": (_opt(_text), False), "max_tasks": (_opt(_int), False)},
    "registration_complete": _ENGINE_REPORT,
    "heart_beating": _ENGINE_REPORT,
    "heart_failure": {"uuid": (_id, True), "reason": (_text, False)},
    "unregistration_notification": {"uuid": (_id, True), "reason": (_text, False),
                                    "exitcode": (_opt(_int), False), "fatal": (_opt(_bool), False)},
    "engine_exit": {"launcher": (_text, True), "pid": (_int, True), "exitcode": (_opt(_int), False)},
    "lost_message": {"msg_id": (_id, True), "device": (_id, True)},
    "give_back": {"msg_id": (_id, True), "nidents": (_int, True)},
    "give_back_reply": {"msg_id": (_id, True)},
    "interrupt_request": {"msg_id": (_id, True), "reason": (_text, False), "grace": (_num, False)},
    "hub_beat": {"engines": (_dict, False), "pending": (_list, False), "next_id": (_opt(_int), False),
                 "launchers": (_opt(_int), False)},
    "launcher_beat": {"launcher": (_id, True), "pid": (_opt(_int), False),
                      "hostname": (_opt(_text), False)},
    "launcher_exit": {"launcher": (_id, True), "reason": (_opt(_text), False)},
    "launcher_gone": {"launcher": (_id, True), "pid": (_opt(_int), False),
                      "hostname": (_opt(_text), False), "reason": (_opt(_text), False),
                      "left": (_opt(_int), False)},
}


def _fields_ok(d: dict, spec: dict) -> bool:
    return all(ok(d[name]) if name in d else not required for name, (ok, required) in spec.items())


def _check_fields(what: str, d: Any, spec: dict) -> None:
    if type(d) is not dict:
        raise ProtocolError(f"{what} is not an object")
    for name, (ok, required) in spec.items():
        if name in d:
            if not ok(d[name]):
                raise ProtocolError(f"{what} field {name!r} has a wrong type or size")
        elif required:
            raise ProtocolError(f"{what} lacks {name!r}")


def check_header(header: Any) -> dict:
    """``header`` if it is an object whose known fields have the accepted types; else
    ProtocolError."""
    _check_fields("header", header, HEADER)
    return header


def check_content(msg_type: str, content: Any) -> dict:
    """``content`` if its known fields (for ``msg_type``) have the accepted types."""
    _check_fields(f"{msg_type} content", content, CONTENT.get(msg_type, {}))
    return content


def split_idents(frames: Sequence[Any]) -> tuple[list, list]:
    """Split a frame list at DELIM into (identities, rest); ProtocolError if absent."""
    for i, f in enumerate(frames):
        b = f if isinstance(f, bytes) else getattr(f, "bytes", None) or bytes(f)
        if b == DELIM:
            return list(frames[:i]), list(frames[i + 1:])
        if i >= 16:
            break
    raise ProtocolError("no message delimiter")


class Session:
    """Builds and checks messages for one process: its key, session id and replay guard.

    ``pack`` returns frames ready for ``send_multipart``; ``unpack`` verifies the
    signature (and the replay guard) before parsing, and raises ProtocolError on any
    defect, so callers drop and log in one place.
    """

    def __init__(self, key: bytes, session: str | None = None, *, check_replay: bool = True) -> None:
        self.signer = Signer(key)
        self.key = key
        self.session = session or uuid.uuid4().hex
        self._counter = itertools.count()
        self._prefix = self.session[:12] + "-"
        self.guard = ReplayGuard() if check_replay else None

    #: header fields every message of this session carries (Client: ``forward``)
    fixed: dict | None = None

    def new_id(self) -> str:
        return self._prefix + str(next(self._counter))

    def header(self, msg_type: str, msg_id: str | None = None, **extra: Any) -> dict:
        h = {"msg_id": msg_id or self.new_id(), "msg_type": msg_type, "session": self.session,
             "date": time.time(), "version": PROTOCOL_VERSION}
        if extra:
            h.update(extra)
        if self.fixed:
            h.update(self.fixed)
        return h

    def pack(self, msg_type: str, content: dict | None = None, *, parent: Any = None,
             buffers: Sequence[Any] = (), idents: Sequence[bytes] = (),
             header: dict | None = None, **header_extra: Any) -> list:
        """Frames for a message. ``parent`` may be a dict or an already-encoded header frame."""
        if header is None:
            header = self.header(msg_type, **header_extra)
        hb = dumps(header)
        if parent is None:
            pb = _EMPTY
        elif isinstance(parent, dict):
            pb = dumps(parent)
        else:
            pb = parent if isinstance(parent, bytes) else bytes(parent)
        cb = _EMPTY if not content else dumps(content)
        body = [hb, pb, cb, *buffers]
        sig, big = self.signer.sign_sized(body)
        if big:
            # a routing signature over the header alone, for the task scheduler, which
            # forwards the payload without reading it; unpicklers check the full one
            sig += b":" + self.signer.sign_head(hb)
        return [*idents, DELIM, sig, *body]

    def verify(self, rest: Sequence[Any], *, routing: bool = False) -> bytes:
        """Check the signature of frames after DELIM; returns it, or raises ProtocolError.

        With ``routing``, a message that carries a routing signature (big payloads) is
        checked on its header alone: enough to route it, never enough to unpickle it.
        """
        if len(rest) < 4:
            raise ProtocolError(f"truncated message ({len(rest)} frames after delimiter)")
        sig = rest[0]
        sig = sig if isinstance(sig, bytes) else bytes(sig)
        if self.signer._template is not None:
            if not sig:
                raise ProtocolError("unsigned message")
            full, _, head = sig.partition(b":")
            if routing and head:
                ok = hmac.compare_digest(head, self.signer.sign_head(_bytes(rest[1])))
                sig = head
            else:
                ok = hmac.compare_digest(full, self.signer.sign(rest[1:]))
                sig = full  # the replay guard keys on what was checked, not on extra bytes
            if not ok:
                raise ProtocolError("bad signature")
            if self.guard is not None and not self.guard.check(sig):
                raise ProtocolError("replayed message (signature seen before)")
        return sig

    def forget(self, rest: Sequence[Any]) -> None:
        """Let a message ``verify`` accepted pass the replay guard once more.

        For a request handed back unused (the task scheduler's ``give_back``): it may
        come again to this same receiver, and must then run, not be dropped as a replay.
        """
        if self.guard is not None and rest:
            self.guard.forget(_bytes(rest[0]).partition(b":")[0])

    def header_only(self, rest: Sequence[Any]) -> dict | None:
        """The header of a message whose full signature failed, if its routing signature
        (over the header alone) holds and was not seen before; else None.

        Such a message was sent by a key holder but its payload changed on the way:
        its sender can be told (by msg_id) without a byte of the payload being trusted.
        """
        if self.signer._template is None or len(rest) < 4:
            return None
        _, _, head = _bytes(rest[0]).partition(b":")
        if not head or not hmac.compare_digest(head, self.signer.sign_head(_bytes(rest[1]))):
            return None
        if self.guard is not None and not self.guard.check(b"head:" + head):
            return None
        try:
            header = loads(rest[1])
        except ValueError:
            return None
        return header if isinstance(header, dict) else None

    def unpack(self, frames: Sequence[Any], *, content: bool = True) -> Message:
        """Verify and parse a whole frame list (identities included)."""
        idents, rest = split_idents(frames)
        return self.unpack_rest(idents, rest, content=content)

    def unpack_rest(self, idents: list, rest: Sequence[Any], *, content: bool = True) -> Message:
        sig = self.verify(rest)
        try:
            header = loads(rest[1])
            parent = loads(rest[2]) if content else {}
            body = loads(rest[3]) if content else {}
        except (ValueError, UnicodeDecodeError) as e:
            raise ProtocolError(f"malformed JSON: {e}") from None
        check_header(header)
        if content:
            if not isinstance(parent, dict):
                raise ProtocolError("parent is not an object")
            check_content(header["msg_type"], body)
        return Message(idents, header, parent, body, list(rest[4:]), sig)


class RateLimitedLog:
    """Logs each kind of bad message at most once per ``interval`` seconds, with a count."""

    def __init__(self, logger: logging.Logger, interval: float = 5.0) -> None:
        self.logger = logger
        self.interval = interval
        self._last: dict[str, float] = {}
        self._count: dict[str, int] = {}

    def __call__(self, kind: str, detail: str = "") -> None:
        now = time.monotonic()
        self._count[kind] = self._count.get(kind, 0) + 1
        if now - self._last.get(kind, -1e9) >= self.interval:
            self._last[kind] = now
            n = self._count.pop(kind)
            self.logger.warning("dropped bad message (%s)%s%s", kind,
                                f": {detail}" if detail else "",
                                f" [{n} of this kind since last report]" if n > 1 else "")
