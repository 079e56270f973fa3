"""Payloads: cloudpickle (protocol 5) with out-of-band buffers, and exception capture.

A payload is a list of frames: the pickle stream first, then every large buffer it
refers to (numpy arrays, PickleBuffers), sent as its own frame without a copy.  Small
buffers stay in-band: a frame costs more than copying a few kilobytes.

Exceptions travel twice: pickled (with a tblib-rebuilt traceback) for the real object,
and as plain text (type name, message, traceback) in the JSON content, so a client
that cannot unpickle the exception still reports it faithfully as RemoteError.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import sys
import time
import traceback as tb_mod
import types
from typing import Any, Callable, Sequence

import cloudpickle

from .errors import RemoteError, RemoteTraceback

#: buffers smaller than this are pickled in-band
OOB_THRESHOLD = 64 * 1024

PROTOCOL = 5


try:
    from cloudpickle.cloudpickle import _PICKLE_BY_VALUE_MODULES as _BY_VALUE
except ImportError:  # pragma: no cover - older cloudpickle
    _BY_VALUE = {"?"}


_CLOUD_REDUCE_CODE = cloudpickle.Pickler.dispatch_table.get(types.CodeType)


def _reduce_code(code: types.CodeType):
    """cloudpickle's reducer for a code object, keeping the real ``co_filename``.

    cloudpickle writes "<dynamic-code>" for every function it sends by value (those of
    ``__main__``), so an engine's traceback could show neither the file nor its source
    line.  With the real name, ``linecache`` finds the source where the file exists (on
    the engine's host for the text traceback, in the user's process for the rebuilt one).
    """
    ctor, args = _CLOUD_REDUCE_CODE(code)
    return ctor, tuple(code.co_filename if a == "<dynamic-code>" else a for a in args)


class _Pickler(cloudpickle.Pickler):
    dispatch_table = collections.ChainMap(
        {types.CodeType: _reduce_code} if _CLOUD_REDUCE_CODE is not None else {},
        cloudpickle.Pickler.dispatch_table)


class _RefPickler(_Pickler):
    """cloudpickle that writes a function it would send by value as a reference instead:
    ``by_ref(fn)`` names it (the function itself travels once per client, cached)."""

    def __init__(self, file, by_ref: Callable, **kwargs) -> None:
        super().__init__(file, **kwargs)
        self._by_ref = by_ref

    def persistent_id(self, obj: Any):
        if type(obj) is types.FunctionType and by_value(obj):
            return self._by_ref(obj)
        return None


class _CRefPickler(pickle.Pickler):
    """The C pickler with the same references: a partial or a wrapper of an importable
    class around a ``__main__`` function needs no cloudpickle at all."""

    def __init__(self, file, by_ref: Callable, **kwargs) -> None:
        super().__init__(file, **kwargs)
        self._by_ref = by_ref

    persistent_id = _RefPickler.persistent_id


def by_value(fn: types.FunctionType) -> bool:
    """Whether cloudpickle sends this function by value (an engine cannot import it by
    name): a function of ``__main__``, a lambda, a nested function, or one of a module
    registered with cloudpickle.register_pickle_by_value."""
    mod = fn.__module__
    return (mod == "__main__" or mod is None or "<" in fn.__qualname__ or mod in _BY_VALUE
            or mod not in sys.modules)


def _cloud_dumps(obj: Any, buffer_callback, by_ref: Callable | None = None) -> bytes:
    with io.BytesIO() as f:
        if by_ref is None:
            _Pickler(f, protocol=PROTOCOL, buffer_callback=buffer_callback).dump(obj)
        else:
            _RefPickler(f, by_ref, protocol=PROTOCOL, buffer_callback=buffer_callback).dump(obj)
        return f.getvalue()


#: bytes, bytearray and memoryview objects this large travel out-of-band, as arrays do
BIG_BYTES = 1 << 20
#: how deep into tuples, lists and dicts (of at most SCAN_LEN items) they are looked for
SCAN_DEPTH = 3
SCAN_LEN = 64


def _rebuild_bytes(buf) -> bytes:
    return bytes(buf)


def _rebuild_bytearray(buf) -> bytearray:
    return bytearray(buf)


def _rebuild_memoryview(buf) -> memoryview:
    return memoryview(buf)


_REBUILD = {bytes: _rebuild_bytes, bytearray: _rebuild_bytearray, memoryview: _rebuild_memoryview}


class _OutOfBand:
    """Stands for a large bytes-like object in a pickle: its data goes as an
    out-of-band buffer (its own frame, or shared memory), not copied into the stream,
    which pickle does for ``bytes`` and ``bytearray`` (and a memoryview cannot be
    pickled at all)."""

    __slots__ = ("obj",)

    def __init__(self, obj) -> None:
        self.obj = obj

    def __reduce_ex__(self, protocol):
        view = memoryview(self.obj)
        if not view.c_contiguous:
            view = memoryview(view.tobytes())
        return _REBUILD[type(self.obj)], (pickle.PickleBuffer(view.cast("B") if view.format != "B" else view),)


_CONTAINERS = (tuple, list, dict)


def _has_big(obj: Any, depth: int) -> bool:
    t = type(obj)
    if t in _REBUILD:
        # a memoryview of any size: pickle cannot take one at all
        return t is memoryview or len(obj) >= BIG_BYTES
    if depth <= 0 or t not in _CONTAINERS or len(obj) > SCAN_LEN:
        return False
    for v in (obj.values() if t is dict else obj):
        if type(v) in _SCANNED and _has_big(v, depth - 1):
            return True
    return False


_SCANNED = frozenset((*_REBUILD, *_CONTAINERS))


def _big_out_of_band(obj: Any, depth: int = SCAN_DEPTH) -> Any:
    """``obj`` with large bytes-like objects (at its top, or in small tuples, lists and
    dicts near it: a task's arguments or result) wrapped to travel out-of-band."""
    if type(obj) not in _SCANNED or not _has_big(obj, depth):
        return obj
    t = type(obj)
    if t in _REBUILD:
        return _OutOfBand(obj)
    if t is dict:
        return {k: _big_out_of_band(v, depth - 1) for k, v in obj.items()}
    new = [_big_out_of_band(v, depth - 1) for v in obj]
    return tuple(new) if t is tuple else new


#: immutable types that may appear in several items of one payload (see ``shared``)
_SHAREABLE = frozenset((int, float, complex, bool, str, bytes, type(None), type(Ellipsis)))


def shared(objs: Sequence[Any]) -> bool:
    """Whether one mutable object is the top-level value of two items of ``objs``
    (each a tuple of arguments, or a result): pickled together, they would come out
    as one object, which the function of one item could change under the other."""
    seen: set = set()
    for obj in objs:
        for v in (obj if type(obj) is tuple else (obj,)):
            if type(v) in _SHAREABLE:
                continue
            if id(v) in seen:
                return True
            seen.add(id(v))
    return False


def dumps_items(objs: Sequence[Any], by_ref: Callable | None = None) -> list:
    """Pickle the items of a batch (each item's arguments, or results) as one payload.

    One pickle for them all: what they have in common (the globals naming numpy's
    reducers and dtypes, say) is written once, where a pickle per item pays for it
    every time (3 to 5x the cost for small arrays and numpy scalars, each way).
    Callers check ``shared`` first: items must not share a mutable object.
    """
    return dumps([_big_out_of_band(o) for o in objs], by_ref, scan=False)


def dumps(obj: Any, by_ref: Callable | None = None, scan: bool = True) -> list:
    """Pickle ``obj`` to frames: [stream, *out-of-band buffers].

    The C pickler first (plain data: ~10x faster than cloudpickle's reducer hook);
    cloudpickle when that fails (lambdas, closures, local classes) or when the stream
    names ``__main__``, whose functions an engine cannot import and which cloudpickle
    therefore sends by value.  With ``by_ref``, each such function inside ``obj`` (the
    one a ``functools.partial``, a bound method or a wrapper holds) is written as the
    persistent id ``by_ref(fn)`` returns: :func:`loads` needs it back in ``refs``.
    """
    bufs: list = []
    if scan:
        obj = _big_out_of_band(obj)

    def callback(pb: pickle.PickleBuffer) -> bool:
        raw = pb.raw()
        if raw.nbytes < OOB_THRESHOLD:
            return True  # in-band
        bufs.append(raw)
        return False

    if not _BY_VALUE:
        # plain pickle first; with by_ref, the C pickler again with references (a
        # partial of a __main__ function); cloudpickle last (a lambda, a __main__ class)
        for ref in (None, by_ref) if by_ref is not None else (None,):
            try:
                if ref is None:
                    stream = pickle.dumps(obj, protocol=PROTOCOL, buffer_callback=callback)
                else:
                    with io.BytesIO() as f:
                        _CRefPickler(f, ref, protocol=PROTOCOL, buffer_callback=callback).dump(obj)
                        stream = f.getvalue()
                if b"__main__" not in stream:
                    return [stream, *bufs]
            except Exception:  # noqa: BLE001 - cloudpickle below handles it or raises the real error
                pass
            bufs.clear()
    stream = _cloud_dumps(obj, callback, by_ref)
    return [stream, *bufs]


def snapshot(frames: list, start: int = 0) -> list:
    """Copy in place, from ``start``, every frame that still aliases the caller's memory.

    An out-of-band frame is a view of the argument itself (a numpy array's data), and
    zmq sends it later, from its own thread.  The message is signed now: an array
    changed after ``submit()`` returned would go out with bytes its signature does not
    cover, and be dropped as forged.  So the task takes the value at submit time, as
    ProcessPoolExecutor's pickled call does; a memcpy costs a fraction of the SHA-256
    the signature already pays for the same bytes.
    """
    for i in range(start, len(frames)):
        f = frames[i]
        if not isinstance(f, bytes):
            frames[i] = bytes(f)
    return frames


def loads(frames: Sequence[Any], refs: dict | None = None) -> Any:
    """Inverse of :func:`dumps`; out-of-band frames are used without copying.

    ``refs`` maps the persistent ids of a ``dumps(obj, by_ref)`` to their functions.
    """
    first = frames[0]
    if not isinstance(first, bytes):
        first = memoryview(first)
    buffers = [memoryview(f) for f in frames[1:]]
    if not refs:
        return pickle.loads(first, buffers=buffers)
    up = pickle.Unpickler(io.BytesIO(first), buffers=buffers)

    def persistent_load(pid):
        try:
            return refs[pid]
        except (KeyError, TypeError):
            raise pickle.UnpicklingError(f"unknown function reference {pid!r}") from None

    up.persistent_load = persistent_load
    return up.load()


def run_chunk(fn: Callable, chunk: Sequence[tuple]) -> list:
    """Apply ``fn`` to each argument tuple of a chunk (one task of a chunked ``map``)."""
    return [fn(*args) for args in chunk]


def call(fn: Callable, /, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``: the function of a flood's tasks of a callable object,
    which travels in each task's arguments (see ``Client._held_task``)."""
    return fn(*args, **kwargs)


def run_batch(fn: Callable, items: Sequence, frames: Sequence[Any],
              refs: dict | None = None, after: Callable | None = None,
              packed: int = 0) -> tuple[list, list, int]:
    """Run the items of a batch (one map call's items sent together), each on its own.

    ``items`` is ``[[msg_id, number of frames], ...]`` over ``frames`` (each item's
    pickled ``(args, kwargs)``), or with ``packed``, the first ``packed`` frames hold
    every item's ``(args, kwargs)`` as one payload (``dumps_items``).  Returns one
    outcome per item, ``{"status": "ok", "n": frames}`` or an exception's fields, their
    frames in order, and how many frames at the front hold the results of the items
    ``"ok"`` without ``"n"``, as one payload (0: none; they are pickled together
    unless they share an object or one fails to pickle).  An item that raises, or
    whose result cannot be pickled, fails alone, as with one task per item.
    ``after(exception or None)`` is called after each item's call (the engine's guard
    against a process the item forked going on as the engine).
    """
    if packed:
        try:
            arglist = loads(frames[:packed], refs)
            if type(arglist) is not list or len(arglist) != len(items):
                raise ValueError("a batch's arguments do not match its items")
        except BaseException as e:  # noqa: BLE001 - every item fails with it, each at its place
            fields, err = exception_frames(drop_internal_frames(e))
            return [dict(fields, n=len(err)) for _ in items], err * len(items), 0
    outcomes: list = []
    results: list = []
    off = 0
    for i, (_, n) in enumerate(items):
        result = None
        started = time.perf_counter()
        try:
            args = arglist[i] if packed else loads(frames[off:off + n], refs)
            if packed:
                arglist[i] = None  # freed as it goes, as an item's own payload would be
            result = fn(*args[0], **args[1])
            if after is not None:
                after(None)
            fields, item = {"status": "ok"}, result
        except BaseException as e:  # noqa: BLE001 - the item's own exception, for its own future
            if after is not None:
                after(e)
            fields, item = exception_frames(drop_internal_frames(e))
        del result
        off += n
        fields["elapsed"] = time.perf_counter() - started
        outcomes.append(fields)
        results.append(item)
    oks = [r for f, r in zip(outcomes, results) if f["status"] == "ok"]
    head: list = []
    if oks and not shared(oks):
        try:
            head = dumps_items(oks)
        except BaseException:  # noqa: BLE001 - one of them cannot be pickled: each alone, below
            head = []
    out: list = []
    for fields, item in zip(outcomes, results):
        if fields["status"] == "ok":
            if head:
                continue
            try:
                item = dumps(item)
            except BaseException as e:  # noqa: BLE001 - an unpicklable result fails its item only
                if hasattr(e, "add_note"):
                    e.add_note(f"zexec: the result of type {type(item).__name__} could not be pickled")
                error, item = exception_frames(e)
                fields.update(error)
        fields["n"] = len(item)
        out += item
    return outcomes, [*head, *out], len(head)


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def drop_internal_frames(exc: BaseException) -> BaseException:
    """Drop the leading traceback entries of zexec's own code (the engine's task loop).

    What is left starts in the user's function, as ProcessPoolExecutor's traceback does;
    an exception raised by zexec itself (no user frame at all) keeps every frame.
    """
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        tb = tb.tb_next
    if tb is not None:
        exc.__traceback__ = tb
    return exc


def format_exception(exc: BaseException) -> str:
    return "".join(tb_mod.format_exception(type(exc), exc, exc.__traceback__))


def exception_frames(exc: BaseException) -> tuple[dict, list]:
    """The JSON fields and pickled frames that carry ``exc`` back to a client.

    The pickle holds the exception with its traceback (tblib), or nothing when the
    exception cannot be pickled: the client then raises RemoteError from the fields.
    """
    text = format_exception(exc)
    fields = {"status": "error", "ename": type(exc).__qualname__, "evalue": _safe_str(exc),
              "traceback": text}
    try:
        from tblib import Traceback

        tbd = Traceback(exc.__traceback__).to_dict() if exc.__traceback__ else None
        frames = dumps((exc, tbd, text))
    except Exception as e:  # noqa: BLE001 - any pickling failure degrades to text
        fields["pickle_error"] = f"{type(e).__name__}: {e}"
        frames = []
    return fields, frames


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # noqa: BLE001
        return f"<unprintable {type(exc).__name__}>"


def rebuild_exception(fields: dict, frames: Sequence[Any]) -> BaseException:
    """The exception a client raises for an error reply: the original type where possible."""
    text = fields.get("traceback", "")
    if frames:
        try:
            exc, tbd, text = loads(frames)
            if tbd is not None:
                from tblib import Traceback

                try:
                    exc = exc.with_traceback(Traceback.from_dict(tbd).as_traceback())
                except Exception:  # noqa: BLE001 - the text traceback is kept below
                    pass
            exc.__cause__ = RemoteTraceback(text)
            return exc
        except Exception as e:  # noqa: BLE001 - an exception that fails to unpickle
            err = RemoteError(fields.get("ename", "?"), fields.get("evalue", ""), text)
            err.__cause__ = e
            return err
    return RemoteError(fields.get("ename", "?"), fields.get("evalue", ""), text)
