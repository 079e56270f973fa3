"""Hostile and careless input (issue 12, findings 9-15): no hang, no crash, no leak.

Protocol and policy cases on plain frames and plain data; the rest against real
clusters, some over tcp (where any local user can reach the ports without the key).
"""

from __future__ import annotations

import json
import os
import stat

from zexec import connection
from zexec.connection import ConnectionInfo, new_key


def test_connection_file_temp_is_exclusive_and_private(tmp_path, monkeypatch):
    """Another user who pre-creates the temporary file must not receive the key (15)."""
    path = tmp_path / "cluster.json"
    info = ConnectionInfo(key=new_key())
    # the names the writer may pick: the old fixed one, and a "random" one we predict
    names = iter(["aaaa", "bbbb"])
    monkeypatch.setattr(connection.secrets, "token_hex", lambda n: next(names))
    traps = [f"{path}.{os.getpid()}.tmp", f"{path}.aaaa.tmp"]
    readers = []
    for t in traps:
        with open(t, "w"):
            pass
        os.chmod(t, 0o644)
        readers.append(open(t))
    try:
        info.write(str(path))
        for r in readers:
            assert info.key not in r.read(), "the key went into a file someone else created"
    finally:
        for r in readers:
            r.close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert json.loads(path.read_text())["key"] == info.key
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["cluster.json", *(os.path.basename(t) for t in traps)])
