"""One run per output folder: an OS lock on ``--output/.lock``.

Two runs writing the same folder (a re-queued job started while the old one still runs) would interleave
``log.jsonl`` and race on ``checkpoint.pt``. The first run therefore holds a POSIX record lock
(``fcntl.lockf``) on ``.lock`` for as long as it lives; a second run on the same folder is refused with one
line naming the holder. The kernel drops the lock when its process ends, however it ends (SIGKILL, OOM
kill, power loss of a node that mounts the folder over NFS: the server's lock manager reclaims it), so a
stale ``.lock`` file never blocks a resume: only a live holder does.

POSIX locks belong to the process (DataLoader workers forked from it do not inherit them) and are
released as soon as the process closes *any* descriptor of the file, so this module keeps at most one
descriptor per folder per process (:data:`_HELD`). Under torchrun only
rank 0 takes the lock; the other ranks learn the outcome from it.

Hand-written rather than ``filelock``: that library locks with ``flock``, whose lock a forked DataLoader
worker inherits, so after a SIGKILL of the main process its still-exiting workers would keep the folder locked
and refuse the re-queued run; ``lockf`` locks belong to the process alone.
"""
from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path
from typing import Optional

from fd_ref.errors import UserError

LOCK_NAME = ".lock"


class OutputLock:
    """The lock on ``folder/.lock``; :meth:`acquire` it, :meth:`release` it (or let the process end)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.fd: Optional[int] = None
        self.created_folder = False
        self.created_file = False

    def acquire(self) -> None:
        """Take the lock or raise :class:`UserError` naming the live run that holds it. Writes nothing into
        an existing lock file (see :meth:`mark_owner`)."""
        if not self.folder.exists():
            self.folder.mkdir(parents=True, exist_ok=True)
            self.created_folder = True
        while True:
            existed = self.path.exists()
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _read_holder(fd)
                os.close(fd)
                self.discard()
                raise UserError(f"another run ({holder}) is using --output {self.folder} right now; wait for "
                                f"it to end or stop it, or pass another --output") from None
            # the file may have been unlinked (by a holder that gave up) between open and lock: retry
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                self.created_file = self.created_file or not existed
                return
            os.close(fd)

    def mark_owner(self) -> None:
        """Record who holds the lock (pid, host, start time) for the refusal message of a second run."""
        if self.fd is None:
            return
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                           f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def discard(self) -> None:
        """Undo what :meth:`acquire` created (the lock file, the folder if it is then empty) and release:
        for a run that stops before writing anything."""
        if self.created_file and self.fd is not None:
            self.path.unlink(missing_ok=True)  # while still locked: a waiting opener re-checks the inode
        self.release()
        if self.created_folder:
            try:
                self.folder.rmdir()
            except OSError:  # not empty: something else lives there now
                pass


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text.splitlines()[0] if text else "pid unknown"


_HELD: dict[str, OutputLock] = {}  # "pid:folder" -> the lock this process holds on that folder


def lock_output(folder: str | os.PathLike) -> OutputLock:
    """Take the lock on ``folder`` for this process. A lock this process still holds there (an earlier
    in-process run, e.g. ``train.main`` called twice) is handed over: released and taken afresh."""
    key = f"{os.getpid()}:{os.path.realpath(folder)}"  # a forked child holds none of its parent's locks
    old = _HELD.pop(key, None)
    if old is not None:
        old.release()
    lock = OutputLock(folder)
    lock.acquire()
    _HELD[key] = lock
    return lock


def unlock_output(lock: OutputLock, discard: bool = False) -> None:
    """Release ``lock`` (and with ``discard``, remove what acquiring it created)."""
    _HELD.pop(f"{os.getpid()}:{os.path.realpath(lock.folder)}", None)
    if discard:
        lock.discard()
    else:
        lock.release()


def release_all() -> None:
    """Release every output lock this process holds (the scripts call it on their way out)."""
    for lock in list(_HELD.values()):
        lock.release()
    _HELD.clear()
