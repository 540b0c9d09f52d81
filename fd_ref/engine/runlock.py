"""One run per output folder: an OS lock on ``--output/.lock`` (``filelock``).

Two runs writing the same folder (a re-queued job started while the old one still runs) would interleave
``log.jsonl`` and race on ``checkpoint.pt``. The first run therefore holds ``filelock``'s OS lock on
``.lock`` for as long as it lives, and writes who it is into that file; a second run on the same folder is
refused with one line naming the holder. The kernel drops the lock when its process ends, however it ends
(SIGKILL, OOM kill; on NFS the server's lock manager reclaims it), so a stale ``.lock`` file never blocks a
resume: only a live holder does. ``filelock`` closes the lock's descriptor in forked children (DataLoader
workers), so they never keep a dead run's folder locked. Under torchrun only rank 0 takes the lock; the other
ranks learn the outcome from it.
"""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from filelock import FileLock, Timeout

from fd_ref.errors import UserError

LOCK_NAME = ".lock"


class OutputLock:
    """The lock on ``folder/.lock``; :meth:`acquire` it, :meth:`release` it (or let the process end)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.lock = FileLock(str(self.path))
        self.created_folder = False
        self.created_file = False

    def acquire(self) -> None:
        """Take the lock or raise :class:`UserError` naming the live run that holds it. Writes nothing into
        an existing lock file (see :meth:`mark_owner`)."""
        if not self.folder.exists():
            self.folder.mkdir(parents=True, exist_ok=True)
            self.created_folder = True
        existed = self.path.exists()
        try:
            self.lock.acquire(timeout=0)
        except Timeout:
            holder = _read_holder(self.path)
            self.discard()
            raise UserError(f"another run ({holder}) is using --output {self.folder} right now; wait for "
                            f"it to end or stop it, or pass another --output") from None
        self.created_file = self.created_file or not existed

    def mark_owner(self) -> None:
        """Record who holds the lock (pid, host, start time) for the refusal message of a second run."""
        if not self.lock.is_locked:
            return
        with open(self.path, "r+") as f:  # another descriptor of the file: the lock stays held
            f.truncate(0)
            f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")

    def release(self) -> None:
        if self.lock.is_locked:
            self.lock.release()

    def discard(self) -> None:
        """Undo what :meth:`acquire` created (the lock file, the folder if it is then empty) and release:
        for a run that stops before writing anything."""
        if self.created_file and self.lock.is_locked:
            self.path.unlink(missing_ok=True)  # while still locked: a waiting opener sees the inode is gone
        self.release()
        if self.created_folder:
            try:
                self.folder.rmdir()
            except OSError:  # not empty: something else lives there now
                pass


def _read_holder(path: Path) -> str:
    try:
        text = path.read_text(errors="replace").strip()
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
