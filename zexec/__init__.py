"""zexec: a ZeroMQ compute cluster behind the ``concurrent.futures.Executor`` interface.

The public names load on first use, so the controller and engine processes
(``python -m zexec ...``) import only their own layers, not the client's.
"""

from __future__ import annotations

import importlib

__all__ = ["LocalCluster", "ZmqExecutor", "DirectView", "EngineDiedError", "EngineSetDiedError",
           "RemoteError",
           "ClusterLostError", "ClusterStartError", "NoEnginesError", "ProtocolError", "ZexecError",
           "TaskInterrupted", "DependencyError", "progress"]
__version__ = "0.1.0"

_WHERE = {"LocalCluster": "cluster", "ZmqExecutor": "cluster", "DirectView": "cluster",
          "progress": "progressbar"}


def __getattr__(name: str):
    if name in _WHERE:
        # the executors come with zexec.cluster, which gives ZmqExecutor its LocalCluster
        module = importlib.import_module(f".{_WHERE[name]}", __name__)
        value = getattr(module, name) if hasattr(module, name) else getattr(
            importlib.import_module(".executor", __name__), name)
    elif name in __all__:
        value = getattr(importlib.import_module(".errors", __name__), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list:
    return sorted(list(globals()) + __all__)
