"""Stopping the training loop (fd_ref.engine.Trainer) gracefully on SIGTERM / SIGUSR1 with every rank agreeing
on the step, and ending the survivors with one line when a peer rank died or hung."""
from __future__ import annotations

import os
import signal
import threading

from .distributed import all_reduce_ints_start, roll_call
from .errors import RunStopped

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # pre-emption: SIGUSR1 is what several schedulers send first
STOP_EXIT_CODE = 143                              # 128 + SIGTERM, whichever signal stopped the run


def shield_loader_worker(worker_id: int) -> None:  # noqa: ARG001 - DataLoader's worker_init_fn signature
    """Leave the stop to the main process. Schedulers (SLURM, ``kill -- -PGID``) often signal the whole
    process group, DataLoader workers included. A worker ended by that SIGTERM, or by SIGUSR1 (whose default
    action also ends a process), makes the main process fail at its next batch ("DataLoader worker ... is
    killed by signal") instead of finishing its step and saving.

    So a worker ignores SIGUSR1 and obeys a SIGTERM only from its parent (the DataLoader's shutdown of a
    worker that does not join in time, and multiprocessing's clean-up at exit, both send one): SIGTERM is
    blocked in the worker and a small thread takes each one with its sender (``sigwaitinfo``). On its
    parent's SIGTERM the worker exits with status 0: ended by the signal itself, it would make the
    DataLoader's watch in the main process print a traceback at exit after a clean stop. Workers still end
    with the main process: the DataLoader stops them, and they watch their parent. Where the platform has no
    ``sigwaitinfo`` (macOS), only SIGUSR1 is shielded."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):
        return
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def obey_only_the_parent() -> None:
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
            pass
        os._exit(0)

    threading.Thread(target=obey_only_the_parent, name="sigterm-from-parent", daemon=True).start()


class GracefulStop:
    """The Trainer's stop methods (a mixin: the attributes are set by ``Trainer.__init__``)."""

    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002
        self._stop_signal = signum

    def _peer_failure(self, error: RuntimeError) -> RunStopped:
        """One line for a collective that failed because a peer died or hung (see ``roll_call``)."""
        text = str(error).lower()
        how = "timed out" if "timed out" in text or "timeout" in text else "lost its connection"
        failed = roll_call()
        if failed:
            who = f"rank{'s' if len(failed) > 1 else ''} {', '.join(map(str, failed))}"
        else:
            who = "a peer rank (which one could not be told)"
        return RunStopped(f"rank {self.info.rank}: {who} failed ({how}) during step {self.step + 1}; this rank "
                          f"stops too; last complete checkpoint: {self._last_checkpoint()}; run the same "
                          f"command again to resume")

    def _check_stop(self) -> None:
        """After every optimiser step: did a stop signal reach any rank? Every rank contributes the signal it
        received (0: none) to a small all-reduce started after step k and read after step k + 1 (by then
        it has long finished, so nobody waits), so all ranks see the same answer after the same step and
        stop there; then :meth:`_stop` saves and exits. A single process stops at once."""
        if self.info.world_size == 1:
            if self._stop_signal:
                self._stop({0: self._stop_signal})
            return
        received = self._stop_votes() if self._stop_votes is not None else []
        self._stop_votes = None
        if any(received):
            self._stop({r: sig for r, sig in enumerate(received) if sig})
        mine = [0] * self.info.world_size
        mine[self.info.rank] = self._stop_signal
        self._stop_votes = all_reduce_ints_start(mine)

    def _finish_stop_check(self) -> None:
        """The run ended normally: complete the agreement under way (a signal during the last step no
        longer matters)."""
        if self._stop_votes is not None:
            self._stop_votes()
            self._stop_votes = None

    def _stop(self, received: dict[int, int]) -> None:
        """Save one checkpoint (rank 0 writes, every rank's random state in it), print one line on every rank
        and exit with :data:`STOP_EXIT_CODE` on every rank."""
        self._stopping = True
        self.save()
        names = sorted({signal.Signals(sig).name for sig in received.values()})
        what = " and ".join(names)
        if self.info.world_size == 1:
            self._print(f"received {what}: saved {self.ckpt_path} at step {self.step}; run the same command "
                        f"again to resume")
        else:
            on = f"rank{'s' if len(received) > 1 else ''} {', '.join(map(str, sorted(received)))}"
            if self.info.is_main:
                self._print(f"received {what} on {on}: saved {self.ckpt_path} at step {self.step}, where all "
                            f"{self.info.world_size} ranks stopped; run the same command again to resume")
            else:
                print(f"rank {self.info.rank}: stopped after step {self.step} ({what} on {on}); rank 0 saved "
                      f"{self.ckpt_path}", flush=True)
        raise SystemExit(STOP_EXIT_CODE)


def _in_main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()
