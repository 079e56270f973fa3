"""Functions run on engines by the tests (importable there through the client's sys.path)."""

import os
import time


def mul(x, y=1):
    return x * y


def identity(x):
    return x


def getpid():
    return os.getpid()


def raise_value_error(msg):
    raise ValueError(msg)


def wait_for_file(path, timeout=30.0, value=None):
    """Block until ``path`` exists (a test creates it to release the task)."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.005)
    return value


def touch(path, value=None):
    with open(path, "w") as f:
        f.write("ran")
    return value


def touch_then_wait(started, release, value=None):
    touch(started)
    return wait_for_file(release, value=value)


def sleep_then_touch(t, path):
    time.sleep(t)
    return touch(path)


def hard_exit(code=7):
    os._exit(code)


def sleep(t):
    time.sleep(t)
    return t


def printer(text):
    print(text)
    return len(text)


class Unpicklable:
    def __reduce__(self):
        raise TypeError("Unpicklable cannot be pickled")


def return_unpicklable():
    return Unpicklable()


def unpicklable_if_negative(x):
    return Unpicklable() if x < 0 else x


class UnpicklableError(Exception):
    def __init__(self, a, b):
        super().__init__(a)
        self.lock = __import__("threading").Lock()


def raise_unpicklable_error():
    raise UnpicklableError("x", "y")


class FailsToUnpickleError(Exception):
    """Pickles fine on the engine, fails when the client rebuilds it."""

    def __reduce__(self):
        return (_broken_rebuild, ("boom",))


def _broken_rebuild(arg):
    if os.environ.get("ZEXEC_ENGINE_SIDE") == "1":
        return FailsToUnpickleError()
    raise RuntimeError("cannot rebuild this exception here")


def raise_fails_to_unpickle():
    raise FailsToUnpickleError("on the engine")


class Box:
    """A weak-referenceable value."""

    def __init__(self, v):
        self.v = v


def append_line(path, then_sleep=0.0):
    with open(path, "a") as f:
        f.write("ran\n")
    time.sleep(then_sleep)


def spin(seconds):
    """Pure-Python CPU work for ``seconds`` (holds the GIL in bytecode, not C)."""
    end = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < end:
        n += 1
    return n


def double(a):
    return a * 2


def add_one_inplace(a):
    a += 1
    return a


def init_fail():
    raise ValueError("error in initializer")


def init_log_to_file_then_fail(path):
    """An initializer that sends the 'concurrent.futures' logger's records to ``path``
    (where a pool's worker reports its initializer's failure), then fails."""
    import logging

    logger = logging.getLogger("concurrent.futures")
    logger.addHandler(logging.FileHandler(path))
    logger.propagate = False
    raise ValueError("error in initializer")


class Counter:
    """A callable object with state."""

    def __init__(self):
        self.n = 0

    def __call__(self):
        self.n += 1
        return self.n


def module_attr(module, name):
    import importlib

    return getattr(importlib.import_module(module), name)


def getenv(name):
    return os.environ.get(name)


class Scaled:
    """A callable object around a function, as emcee's and scipy's wrappers are."""

    def __init__(self, fn, k):
        self.fn = fn
        self.k = k

    def __call__(self, x):
        return self.fn(x, self.k)


def fork_and_return(how="return"):
    """Fork; the child leaves the task by ``how``; the parent returns the child's pid."""
    import sys

    pid = os.fork()
    if pid:
        return pid
    if how == "exit":
        sys.exit(3)
    if how == "raise":
        raise ValueError("in the forked child")
    return "child"


def pid_then_wait(started, release):
    """Write this engine's pid into ``started``, then block until ``release`` exists."""
    with open(started + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(started + ".tmp", started)
    return wait_for_file(release, timeout=60, value=os.getpid())


def positive(x):
    if x < 0:
        raise ValueError(f"negative: {x}")
    return x


def die_writing_shm(shm_dir):
    """Be killed (SIGKILL) while writing a shared-memory file, as the OOM killer would."""
    import signal
    import uuid

    from zexec.shm import ShmStore

    data = memoryview(b"x" * (2 << 20))
    os.rename = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)  # before the file is complete
    ShmStore(shm_dir)._write(uuid.uuid4().hex, data, data.nbytes)
    os.kill(os.getpid(), signal.SIGKILL)


def is_loaded(name):
    import sys

    return name in sys.modules


def main_attr(name):
    """An attribute of the engine's ``__main__`` (None if it has none)."""
    import sys

    return getattr(sys.modules["__main__"], name, None)


def exit_at(x, at, code=7):
    """``x``; the engine exits (os._exit) instead when ``x == at``: one bad item of a flood."""
    if x == at:
        os._exit(code)
    return x


_init_queue = None


def init_put_pid(q):
    """An initializer given a multiprocessing.Queue: says which engine ran it, and keeps
    the queue for the tasks (as a pool's worker initializer does)."""
    global _init_queue
    _init_queue = q
    q.put(("init", os.getpid()))


def put_on_init_queue(x):
    _init_queue.put(("task", x))
    return os.getpid()


def init_queue_log_then_fail(q):
    """An initializer that sends the 'concurrent.futures' logger's records to the parent
    through ``q`` (a QueueHandler, as CPython's test does), then fails."""
    import logging.handlers

    logger = logging.getLogger("concurrent.futures")
    logger.addHandler(logging.handlers.QueueHandler(q))
    logger.propagate = False
    raise ValueError("error in initializer")


def close_init_queue():
    """Close this engine's side of the initializer's queue, once its feeder thread has
    written everything (it then holds no lock of the queue's): this engine can then be
    killed without leaving the queue locked for the other writers."""
    _init_queue.close()
    _init_queue.join_thread()
    return os.getpid()
