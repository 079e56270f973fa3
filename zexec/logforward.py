"""Log records of a task, forwarded to the client that submitted it.

With a process pool, a task's ``logging.getLogger(__name__).warning(...)`` reaches the
user's terminal: a forked worker inherits the handlers of its parent, and without any
configuration ``logging.lastResort`` writes it to stderr.  An engine's root handler
writes to the engine's log instead, so while a task runs the engine collects the
records of every logger outside ``zexec`` (``TaskLogs``) and sends them, as plain
fields, in the task's reply (on IOPub, every FLUSH_AFTER, while a task that logs much
runs).  The client rebuilds each one
(``handle_records``) and hands it to its own logger of the same name, whose level,
filters and handlers decide, as if it had been logged there.

Nothing is pickled: the message is formatted on the engine (``getMessage()``), the
exception and stack as text.  Records of zexec's own loggers, and those logged outside
a task (the initializer, imports at start-up), stay in the engine's log.
"""

from __future__ import annotations

import logging
import os
import threading

#: the fields of a record that travel, as the types protocol.LOG_RECORD accepts
_TEXT = ("name", "levelname", "pathname", "filename", "module", "funcName", "processName",
         "threadName")
_INT = ("levelno", "lineno", "process", "thread")
_FLOAT = ("created", "msecs")
FIELDS = _TEXT + _INT + _FLOAT
#: records a task's main thread may have collected before they go out mid-task
FLUSH_AFTER = 500

_call_handlers = logging.Logger.callHandlers


def _ours(name: str) -> bool:
    return name == "zexec" or name.startswith("zexec.")


def record_fields(record: logging.LogRecord) -> dict:
    """The plain fields of ``record``, its message formatted, its exception as text."""
    d = {}
    for fields, kind in ((_TEXT, str), (_INT, int), (_FLOAT, float)):
        for f in fields:
            v = getattr(record, f, None)
            if v is not None:
                d[f] = v if type(v) is kind else kind(v)
    d["name"] = str(record.name)
    d["levelno"] = int(record.levelno)
    d["msg"] = record.getMessage()
    exc_text = record.exc_text
    if record.exc_info and not exc_text:
        exc_text = logging.Formatter().formatException(record.exc_info)
    if exc_text:
        d["exc_text"] = exc_text
    if record.stack_info:
        d["stack_info"] = record.stack_info
    return d


class TaskLogs:
    """The engine's side: while ``active``, records of non-zexec loggers are collected.

    ``install`` wraps ``logging.Logger.callHandlers`` in this process (an engine's own):
    a record is taken after its logger's level and filters let it through and before
    any handler of the engine sees it, so it is handled once, by the client, and never
    also written to the engine's log (nor by a handler the engine inherited in a fork).
    A task that logs nothing costs the engine ~75 ns (``active`` set and cleared, a
    look at ``records``), and its client ~25 ns (a look for ``log`` in its reply).

    Records logged from other threads while the task runs are collected too.  The engine
    puts them in the task's reply (``take``), so the client handles them before the
    future resolves; a task that logs FLUSH_AFTER records sends them (``send``, on
    IOPub) as it runs, from its main thread, and then its last ones the same way
    (``flushed``): records on two paths could be handled out of order.  A process the
    task forks logs as before (to the engine's log).
    """

    def __init__(self, send) -> None:
        self.active = False
        #: records were sent while the task ran: the rest go the same way
        self.flushed = False
        self.records: list = []
        self._send = send
        self._pid = os.getpid()
        self._main = threading.main_thread()

    def install(self) -> None:
        logs = self

        def callHandlers(logger: logging.Logger, record: logging.LogRecord) -> None:
            if not (logs.active and logs._take(logger, record)):
                _call_handlers(logger, record)

        logging.Logger.callHandlers = callHandlers

    @staticmethod
    def uninstall() -> None:
        logging.Logger.callHandlers = _call_handlers

    def _take(self, logger: logging.Logger, record: logging.LogRecord) -> bool:
        if _ours(logger.name) or os.getpid() != self._pid:
            return False
        try:
            fields = record_fields(record)
        except Exception:  # noqa: BLE001 - a bad format string: the handlers report it
            return False
        self.records.append(fields)
        if len(self.records) >= FLUSH_AFTER and threading.current_thread() is self._main:
            self.flushed = True
            self.flush()
        return True

    def take(self) -> list:
        """The records collected so far, for the task's reply."""
        records, self.records = self.records, []
        return records

    def flush(self) -> None:
        """Send the records collected so far (main thread only: it owns the socket)."""
        records = self.take()
        if records:
            try:
                self._send(records)
            except Exception:  # noqa: BLE001 - never into the task's logging call
                pass


def handle_records(records: list, engine) -> None:
    """The client's side: each record, rebuilt, handled by this process's logger.

    It carries the engine's id as ``record.engine`` and ``processName``
    ``"zexec-engine-N"``.  The message is already formatted (``args`` stay empty).
    ``records`` was schema-checked (protocol.check_content): only known fields are read.
    """
    for r in records:
        name = r["name"]
        if _ours(name):
            continue  # never sent by an engine: not for the user's handlers
        logger = logging.getLogger(name) if name != "root" else logging.getLogger()
        if not logger.isEnabledFor(r["levelno"]):
            continue
        d = {f: r[f] for f in FIELDS if f in r}
        d["msg"] = r["msg"]
        d["exc_text"] = r.get("exc_text")
        d["stack_info"] = r.get("stack_info")
        d["engine"] = engine
        d["processName"] = f"zexec-engine-{engine}"
        logger.handle(logging.makeLogRecord(d))
