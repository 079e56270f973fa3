"""Large buffers through shared memory, between processes of one host.

On a cluster whose processes share a host (ipc transport), a buffer of 1 MiB or more
does not travel through the sockets (client -> task scheduler -> engine and back is
four copies through the kernel): the sender writes it once to a file in the
cluster's private tmpfs directory and the message carries its name, size and SHA-256
tree digest instead.  The receiver maps the file copy-on-write (no copy; the array
it unpickles is writable) and checks the digest before anything is unpickled, so the
data stays covered by the message's HMAC through the signed digest.
"""

from __future__ import annotations

import logging
import mmap
import os
import re
import uuid
from typing import Any, Sequence

from .errors import ProtocolError
from .protocol import BIG_FRAME, big_digest

THRESHOLD = BIG_FRAME
log = logging.getLogger("zexec.shm")
_NAME = re.compile(r"^[0-9a-f]{32}$")


def _partial(pid: int, name: str) -> str:
    return f"part-{pid}-{name}"


def _nbytes(f: Any) -> int:
    return len(f) if isinstance(f, bytes) else memoryview(f).nbytes


class ShmStore:
    """Writes and maps buffer files in one directory (mode 0700, owned by the cluster)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def export(self, frames: list, start: int = 0, reuse: dict | None = None) -> list:
        """Move big frames (from ``start``) into files; returns refs for the content.

        Each ref is ``[index, name, size, digest]``; the frame at ``index`` becomes empty.
        ``reuse`` maps digests of files already there (a task's own input) to their
        names: a buffer that comes back unchanged is not written again.  When the
        directory is full, nothing is moved and [] comes back: the frames then travel
        through the sockets as usual.
        """
        refs, created, originals = [], [], {}
        try:
            for i in range(start, len(frames)):
                f = frames[i]
                n = _nbytes(f)
                if n < THRESHOLD:
                    continue
                view = memoryview(f).cast("B") if not isinstance(f, bytes) else memoryview(f)
                digest = big_digest(view).hex()
                same = reuse.get(digest) if reuse else None
                if same is not None and same[1] == n:
                    name = same[0]
                else:
                    name = uuid.uuid4().hex
                    self._write(name, view, n)
                    created.append(name)
                refs.append([i, name, n, digest])
                originals[i] = f
                frames[i] = b""
        except OSError as e:
            for i, f in originals.items():
                frames[i] = f
            self.unlink(created)
            log.warning("shared memory unavailable (%s): sending buffers through the sockets", e)
            return []
        return refs

    def _write(self, name: str, view: memoryview, n: int) -> None:
        # written under a name that says whose it is, then renamed: a writer killed
        # midway (the OOM killer, SIGKILL) leaves a partial file that its parent, which
        # reaps it, can find and remove (see remove_partial)
        part = _partial(os.getpid(), name)
        path = os.path.join(self.directory, part)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb", buffering=0) as out:
                written = 0
                while written < n:
                    written += out.write(view[written:])
            os.rename(path, os.path.join(self.directory, name))
        except BaseException:
            self.unlink([part])
            raise

    def remove_partial(self, pid: int) -> int:
        """Remove the files process ``pid`` was writing when it died; returns how many."""
        prefix = _partial(pid, "")
        removed = 0
        try:
            names = [n for n in os.listdir(self.directory) if n.startswith(prefix)]
        except OSError:
            return 0
        for name in names:
            try:
                os.unlink(os.path.join(self.directory, name))
                removed += 1
            except OSError:
                pass
        return removed

    def open(self, frames: list, refs: Sequence, unlink: bool = False,
             trusted: dict | None = None) -> list:
        """Put the mapped files back in place of their frames, digests checked.

        ``trusted`` maps names of files this process wrote itself to their digests:
        those need no second hashing when a reply hands them back unchanged.
        """
        frames = list(frames)
        for ref in refs:
            try:
                i, name, n, digest = ref
                if not (isinstance(name, str) and _NAME.match(name) and 0 <= int(i) < len(frames)):
                    raise ValueError
            except (TypeError, ValueError):
                raise ProtocolError("malformed shared-memory reference") from None
            path = os.path.join(self.directory, name)
            try:
                with open(path, "rb") as f:
                    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            except (OSError, ValueError) as e:
                raise ProtocolError(f"shared-memory buffer {name} unavailable: {e}") from None
            finally:
                if unlink:
                    self.unlink([name])
            view = memoryview(mm)
            own = trusted is not None and trusted.get(name) == digest
            if view.nbytes != n or (not own and big_digest(view).hex() != digest):
                raise ProtocolError(f"shared-memory buffer {name} does not match its signed digest")
            frames[i] = view
        return frames

    def unlink(self, names: Sequence[str]) -> None:
        for name in names:
            try:
                os.unlink(os.path.join(self.directory, name))
            except OSError:
                pass
