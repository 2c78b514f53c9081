"""The ``--output`` folder of ``degrade`` and ``restore``: checked before any work, and held by
one run at a time.

``prepare`` creates the folder and writes (and removes) a real temporary file in it, so an
uncreatable or unwritable folder is a one-line error before the model loads or a batch runs,
not an ``OSError`` after minutes of work.

``OutputLock`` is an advisory lock (``fcntl.flock``, non-blocking) on ``.p2l-jax.lock`` in the
folder, holding the holder's pid. A second run on the same folder refuses at once with a
message naming the folder and that pid, before it reads anything the first one writes (such
as its in-flight checkpoint). The kernel drops the lock when the holder exits, however it
exits, so a killed run never blocks the next one. In a multi-process (``jax.distributed``)
run each process locks its own ``.p2l-jax.<process>.lock``. flock is per host: two hosts
sharing a network folder outside one ``jax.distributed`` run are not excluded.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from p2l_jax.errors import P2LError


def prepare(folder: Path) -> bool:
    """Create ``folder`` (and parents) and check a file can be written in it.

    Returns whether the folder was created now (a caller that fails before writing
    anything may remove it again). Raises :class:`P2LError` naming ``--output``.
    """
    if folder.exists() and not folder.is_dir():
        raise P2LError(f"--output {folder} exists and is not a folder")
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise P2LError(f"--output {folder}: cannot create the folder "
                       f"({err.strerror or err})") from None
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".p2l-jax-write-test.")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise P2LError(f"--output {folder}: cannot write there ({err.strerror or err})") from None
    return created


def check_targets(folder: Path, names: list[str], inputs: list[Path]) -> None:
    """Refuse output ``names`` in ``folder`` that would replace one of ``inputs`` (data the
    user cares about) or that are taken by a folder or special file."""
    targets = {(folder / name).resolve() for name in names}
    clash = [path for path in inputs if path.resolve() in targets]
    if clash:
        raise P2LError(f"{clash[0]}: would be overwritten by an output; use another --output")
    for name in names:
        target = folder / name
        if target.is_dir() or (target.exists() and not target.is_file()):
            raise P2LError(f"--output {folder}: {name} is a folder or special file; an output "
                           "needs that name")


class OutputLock:
    """Advisory lock of ``folder`` for one run (see the module docstring)."""

    def __init__(self, folder: Path, process: int | None = None):
        name = ".p2l-jax.lock" if process is None else f".p2l-jax.{process}.lock"
        self.folder, self.path, self.fd = folder, folder / name, None

    def acquire(self) -> OutputLock:
        import fcntl

        for _ in range(10):  # the file may be removed between open and flock: retry
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise P2LError(f"--output {self.folder}: cannot lock {self.path.name} "
                                   f"({err.strerror})") from None
                raise P2LError(f"--output {self.folder} is in use by another p2l-jax run "
                               f"(pid {holder}); wait for it to finish or use another "
                               "--output") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                self.fd = fd
                return self
            os.close(fd)
        raise P2LError(f"--output {self.folder}: cannot lock {self.path.name} (it keeps "
                       "being replaced)")

    def release(self) -> None:
        """Remove the lock file and drop the lock (removal first: no one else holds it)."""
        if self.fd is None:
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
