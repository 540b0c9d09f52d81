"""A fault hook for the training loop: tests simulate crashes, hangs, signals and non-finite losses with one
(tests/fault_injection.py); none is installed in a normal run."""
from __future__ import annotations

from typing import Optional, Protocol

import torch


class FaultHook(Protocol):
    """What the loop calls when a hook is installed."""

    def corrupt_loss(self, attempt: int, loss: torch.Tensor) -> torch.Tensor:
        """Every micro-batch loss; ``attempt``: the 1-based optimiser step attempt, skipped steps included."""

    def after_step(self, step: int, rank: int) -> None:
        """After every optimiser step (and its checkpoint, if one is due)."""


_installed: Optional[FaultHook] = None


def install_fault_hook(hook: Optional[FaultHook]) -> None:
    """Install ``hook`` for every Trainer built from now on; ``None`` removes it."""
    global _installed
    _installed = hook


class NoFaults:
    """The hook of a normal run: it changes nothing, so the loop calls a hook without asking whether one is
    installed."""

    def corrupt_loss(self, attempt: int, loss: torch.Tensor) -> torch.Tensor:  # noqa: ARG002
        return loss

    def after_step(self, step: int, rank: int) -> None:
        pass


def installed_fault_hook() -> FaultHook:
    """The hook a Trainer built now takes (:class:`NoFaults` in a normal run)."""
    return _installed if _installed is not None else NoFaults()
