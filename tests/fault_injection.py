"""Simulated failures for the tests that run train.py / finetune.py as processes (test_user_errors.py,
test_interruption.py, test_reliability.py). The library knows nothing of them: this module builds a hook from
environment variables and installs it with :func:`fd_ref.engine.faults.install_fault_hook`; ``run_with_faults.py``
(the entry the tests start instead of ``python train.py``) and the launcher's forked children
(robustness_helpers.py) call :func:`install_from_env` before running the script. Unset or empty, the variables
install nothing.

    FD_TEST_DIE_AT_STEP=k     the process exits abruptly (os._exit(1): no cleanup, like a crash or an OOM kill)
                              right after optimiser step k (and its checkpoint, if one is due) ...
    FD_TEST_DIE_RANK=r        ... on rank r only (default: every rank); also for the two below
    FD_TEST_HANG_AT_STEP=k    the process stops answering (sleeps for good, alive) after step k
    FD_TEST_SIGNAL_AT_STEP=k:SIG  the process sends itself signal SIG (e.g. SIGTERM) after step k
    FD_TEST_DIE_IN_WRITE_AFTER_STEP=k  SIGKILL inside the first atomic file write after step k (its bytes
                              written, before its fsync and rename: with --save-every 1, step k+1's checkpoint)
    FD_TEST_NAN_AT_STEPS=a,b  the loss of the a-th, b-th, ... optimiser step attempt (1-based, skipped steps
                              included: step + skipped + 1) is replaced by NaN
    FD_TEST_KILL_IN_EVAL=k:start|end  the process SIGKILLs itself in its k-th evaluation (finetune.py's
                              fd_ref.eval.evaluate.evaluate), before the first batch or after the last one
                              (the metrics computed, not yet logged or saved); FD_TEST_DIE_RANK picks the rank
"""
from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch

VARIABLES = ("FD_TEST_DIE_AT_STEP", "FD_TEST_DIE_RANK", "FD_TEST_HANG_AT_STEP", "FD_TEST_SIGNAL_AT_STEP",
             "FD_TEST_NAN_AT_STEPS", "FD_TEST_DIE_IN_WRITE_AFTER_STEP", "FD_TEST_KILL_IN_EVAL")


@dataclass(frozen=True)
class FaultInjection:
    die_at_step: int = 0
    die_rank: Optional[int] = None
    nan_at_steps: frozenset = frozenset()
    hang_at_step: int = 0
    signal_at_step: int = 0
    signal_name: str = ""
    die_in_write_after_step: int = 0

    @classmethod
    def from_env(cls) -> "FaultInjection":
        def text(key: str) -> str:
            return os.environ.get(key, "").strip()
        try:
            at, _, name = text("FD_TEST_SIGNAL_AT_STEP").partition(":")
            if name and not hasattr(signal, name):
                raise ValueError
            return cls(die_at_step=int(text("FD_TEST_DIE_AT_STEP") or 0),
                       die_rank=int(text("FD_TEST_DIE_RANK")) if text("FD_TEST_DIE_RANK") else None,
                       nan_at_steps=frozenset(int(x) for x in text("FD_TEST_NAN_AT_STEPS").split(",") if x),
                       hang_at_step=int(text("FD_TEST_HANG_AT_STEP") or 0),
                       signal_at_step=int(at or 0), signal_name=name or "SIGTERM",
                       die_in_write_after_step=int(text("FD_TEST_DIE_IN_WRITE_AFTER_STEP") or 0))
        except ValueError:
            raise SystemExit(f"{', '.join(VARIABLES)} (test fault injection) must be integers (k:SIGNAME for "
                             f"the signal); unset them") from None

    # -- the hook the loop calls (fd_ref.engine.faults.install_fault_hook) ------------------------------------
    def corrupt_loss(self, attempt: int, loss: torch.Tensor) -> torch.Tensor:
        return loss * float("nan") if attempt in self.nan_at_steps else loss

    def after_step(self, step: int, rank: int) -> None:
        if self.die_rank not in (None, rank):
            return
        if step == self.die_at_step:
            print(f"fault injection: rank {rank} exits abruptly after step {step}", file=sys.stderr, flush=True)
            os._exit(1)
        if step == self.hang_at_step:
            print(f"fault injection: rank {rank} hangs after step {step}", file=sys.stderr, flush=True)
            while True:
                time.sleep(3600)
        if step == self.signal_at_step:
            os.kill(os.getpid(), getattr(signal, self.signal_name))
        if step == self.die_in_write_after_step:
            _die_in_the_next_write(step, rank)


def _die_in_the_next_write(step: int, rank: int) -> None:
    """The next ``os.fsync`` (an atomic write's, after its bytes and before its rename) is a SIGKILL."""
    def fsync(fd: int) -> None:  # noqa: ARG001
        print(f"fault injection: rank {rank} killed inside the first file write after step {step}",
              file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    os.fsync = fsync


def kill_in_evaluation(spec: str, die_rank: Optional[int]) -> None:
    """Replace ``fd_ref.eval.evaluate.evaluate`` (before the script imports it) by one that SIGKILLs this
    process in its k-th call, at its start or at its end (``spec`` "k:start" / "k:end")."""
    import fd_ref.eval.evaluate as module
    at, _, where = spec.partition(":")
    original, calls = module.evaluate, [0]

    def evaluate(model, loader, device):
        calls[0] += 1
        rank = int(os.environ.get("RANK", "0"))
        doomed = calls[0] == int(at) and die_rank in (None, rank)
        if doomed and where == "start":
            os.kill(os.getpid(), signal.SIGKILL)
        metrics = original(model, loader, device)
        if doomed:
            os.kill(os.getpid(), signal.SIGKILL)
        return metrics

    module.evaluate = evaluate


def install_from_env() -> None:
    """Install the faults the FD_TEST_* variables ask for (none set: nothing is installed)."""
    from fd_ref.engine.faults import install_fault_hook
    if any(os.environ.get(key, "").strip() for key in VARIABLES):
        faults = FaultInjection.from_env()
        install_fault_hook(faults)
        if os.environ.get("FD_TEST_KILL_IN_EVAL", "").strip():
            kill_in_evaluation(os.environ["FD_TEST_KILL_IN_EVAL"].strip(), faults.die_rank)
