"""What a graceful stop of the training loop (fd_ref.engine.trainer.Trainer) is made of: the signals that ask
for it, the exit code it ends with, and the one line for survivors of a peer rank that died or hung."""
from __future__ import annotations

import signal

from fd_ref.engine.distributed import roll_call
from fd_ref.errors import RunStopped

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # pre-emption: SIGUSR1 is what several schedulers send first
STOP_EXIT_CODE = 143                              # 128 + SIGTERM, whichever signal stopped the run


def in_main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def peer_failure(error: RuntimeError, rank: int, step: int, last_checkpoint: str) -> RunStopped:
    """One line for a collective that failed during ``step`` because a peer died or hung (``roll_call``
    names it)."""
    text = str(error).lower()
    how = "timed out" if "timed out" in text or "timeout" in text else "lost its connection"
    failed = roll_call()
    if failed:
        who = f"rank{'s' if len(failed) > 1 else ''} {', '.join(map(str, failed))}"
    else:
        who = "a peer rank (which one could not be told)"
    return RunStopped(f"rank {rank}: {who} failed ({how}) during step {step}; this rank stops too; last "
                      f"complete checkpoint: {last_checkpoint}; run the same command again to resume")
