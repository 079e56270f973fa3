"""Tasks for test_features (importable on engines through the client's sys.path)."""

import os
import time


def mark_then_sleep(started, interrupted, seconds=60.0):
    """Write our pid to ``started``, sleep; on KeyboardInterrupt write ``interrupted``."""
    with open(started + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(started + ".tmp", started)
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(0.01)
    except KeyboardInterrupt:
        with open(interrupted, "w") as f:
            f.write("interrupted")
        raise
    return "slept"


def stubborn(started, seconds=60.0):
    """Ignore every KeyboardInterrupt (a task that will not stop)."""
    with open(started, "w") as f:
        f.write(str(os.getpid()))
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            time.sleep(0.01)
        except KeyboardInterrupt:
            pass
    return "done"


def block(directory, release, timeout=60.0):
    """Mark this engine busy (``directory/<pid>``), then wait for ``release`` to exist."""
    open(os.path.join(directory, str(os.getpid())), "w").close()
    deadline = time.monotonic() + timeout
    while not os.path.exists(release):
        if time.monotonic() > deadline:
            raise TimeoutError(release)
        time.sleep(0.005)
