"""zexec: a ZeroMQ compute cluster behind the ``concurrent.futures.Executor`` interface."""

from .cluster import LocalCluster
from .errors import (ClusterLostError, ClusterStartError, EngineDiedError, NoEnginesError,
                     ProtocolError, RemoteError, ZexecError)
from .executor import DirectView, ZmqExecutor

__all__ = ["LocalCluster", "ZmqExecutor", "DirectView", "EngineDiedError", "RemoteError",
           "ClusterLostError", "ClusterStartError", "NoEnginesError", "ProtocolError", "ZexecError"]
__version__ = "0.1.0"
