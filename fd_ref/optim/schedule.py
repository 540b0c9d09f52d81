"""Per-iteration learning-rate schedule: linear warm-up then cosine decay (as in BEiT / FD), and lr scaling.

FD (Wei et al., arXiv 2205.14141, Sec. 4 and appendix) trains with AdamW, a linear warm-up and a cosine
schedule, updated every iteration. Its three learning rates (base, warm-up start, minimum) are given for a
total batch of 512 and ALL scale linearly with the total batch, gradient accumulation included
(:func:`scale_lrs`; published ``main_fd.py`` / ``main_finetune.py``).

Parameter groups with an ``lr_scale`` (layer-wise lr decay, :mod:`fd_ref.optim.groups`) follow the published
schedule (timm 0.4.12's ``CosineLRScheduler`` over groups whose initial lr is ``base_lr * lr_scale``): only
the peak is scaled, the warm-up start and the minimum are shared by every group,

    lr_g(step) = curve(step; peak = base_lr * lr_scale_g, start = warmup_lr, floor = min_lr)

``WarmupCosine(..., scale_whole_curve=True)`` multiplies the whole curve by ``lr_scale_g`` instead (fd-ref's
earlier behaviour; docs/fidelity.md).

Hand-written rather than timm's ``CosineLRScheduler``: timm's keeps each group's base lr as the optimizer held
it when the scheduler was built, while this one recomputes every group's lr from one step count and the
group's ``lr_scale`` (:func:`lr_at`, checked against the formula by the tests), which is all a resumed run
restores.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from fd_ref.errors import UserError

__all__ = ["lr_at", "WarmupCosine", "scale_lr", "scale_lrs"]


def _check_hparams(base_lr: float, total_steps: int, warmup_steps: int, min_lr: float, warmup_lr: float) -> None:
    if total_steps < 1:
        raise UserError(f"total_steps must be >= 1, got {total_steps}; check epochs and the data size")
    if not 0 <= warmup_steps <= total_steps:
        raise UserError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}; "
                        "use fewer warm-up epochs than epochs")
    if not 0.0 <= min_lr <= base_lr:
        raise UserError(f"need 0 <= min_lr <= base_lr, got min_lr={min_lr}, base_lr={base_lr}; fix the lr settings")
    if warmup_lr < 0.0:
        raise UserError(f"warmup_lr must be >= 0, got {warmup_lr}; fix the lr settings")


def lr_at(step: int, *, base_lr: float, total_steps: int, warmup_steps: int, min_lr: float,
          warmup_lr: float = 0.0) -> float:
    """Learning rate at iteration ``step`` (0-based).

    Warm-up, for ``step < warmup_steps``:

        lr = warmup_lr + (base_lr - warmup_lr) * step / warmup_steps

    Cosine, for ``warmup_steps <= step <= total_steps``, with ``t = (step - warmup_steps) / (total_steps -
    warmup_steps)``:

        lr = min_lr + 0.5 * (base_lr - min_lr) * (1 + cos(pi * t))

    and ``lr = min_lr`` for ``step >= total_steps``. So ``lr_at(0) == warmup_lr`` (if there is warm-up),
    ``lr_at(warmup_steps) == base_lr`` (if ``warmup_steps < total_steps``) and ``lr_at(total_steps) == min_lr``.
    """
    _check_hparams(base_lr, total_steps, warmup_steps, min_lr, warmup_lr)
    return _curve(step, base_lr, total_steps, warmup_steps, min_lr, warmup_lr)


def _curve(step: int, base_lr: float, total_steps: int, warmup_steps: int, min_lr: float,
           warmup_lr: float) -> float:
    """The formula of :func:`lr_at` without its checks (a group's peak may sit below ``min_lr``)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step >= total_steps:
        return float(min_lr)
    if step < warmup_steps:
        return warmup_lr + (base_lr - warmup_lr) * step / warmup_steps
    t = (step - warmup_steps) / (total_steps - warmup_steps)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * t))


class WarmupCosine:
    """Sets every optimizer param group's lr for the current iteration (module docstring):

        group["lr"] = curve(step; peak = base_lr * s, start = warmup_lr, floor = min_lr)   (published)
        group["lr"] = s * lr_at(step, ...)                                 (scale_whole_curve=True)

    with ``s = group.get("lr_scale", 1.0)``; both agree for ``s == 1``. The learning rate of step 0 is
    applied on construction; each :meth:`step` advances by one iteration. ``last_lr`` is the unscaled
    (``s == 1``, head) value. Usage per iteration: ``optimizer.step(); scheduler.step()``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, base_lr: float, total_steps: int, warmup_steps: int,
                 min_lr: float, warmup_lr: float = 0.0, scale_whole_curve: bool = False) -> None:
        _check_hparams(base_lr, total_steps, warmup_steps, min_lr, warmup_lr)
        self.scale_whole_curve = bool(scale_whole_curve)
        self.optimizer = optimizer
        self.base_lr = float(base_lr)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.min_lr = float(min_lr)
        self.warmup_lr = float(warmup_lr)
        self.step_count = 0
        self.last_lr = self._apply()

    def _apply(self) -> float:
        """Write the current lr into the optimizer; return the unscaled value."""
        lr = lr_at(self.step_count, base_lr=self.base_lr, total_steps=self.total_steps,
                   warmup_steps=self.warmup_steps, min_lr=self.min_lr, warmup_lr=self.warmup_lr)
        for group in self.optimizer.param_groups:
            scale = group.get("lr_scale", 1.0)
            if self.scale_whole_curve or scale == 1.0:
                group["lr"] = lr * scale
            else:
                group["lr"] = _curve(self.step_count, self.base_lr * scale, self.total_steps, self.warmup_steps,
                                     self.min_lr, self.warmup_lr)
        return lr

    def step(self) -> float:
        """Advance one iteration, set the new lr on the optimizer and return it (before ``lr_scale``)."""
        self.step_count += 1
        self.last_lr = self._apply()
        return self.last_lr

    def state_dict(self) -> dict[str, Any]:
        """The step counter and the hyper-parameters."""
        return {"step_count": self.step_count, "base_lr": self.base_lr, "total_steps": self.total_steps,
                "warmup_steps": self.warmup_steps, "min_lr": self.min_lr, "warmup_lr": self.warmup_lr,
                "scale_whole_curve": self.scale_whole_curve}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the counter and hyper-parameters and re-apply the lr of that step to the optimizer."""
        _check_hparams(state["base_lr"], state["total_steps"], state["warmup_steps"], state["min_lr"],
                       state["warmup_lr"])
        self.step_count = int(state["step_count"])
        self.base_lr = float(state["base_lr"])
        self.total_steps = int(state["total_steps"])
        self.warmup_steps = int(state["warmup_steps"])
        self.min_lr = float(state["min_lr"])
        self.warmup_lr = float(state["warmup_lr"])
        self.scale_whole_curve = bool(state.get("scale_whole_curve", True))  # older checkpoints: True
        self.last_lr = self._apply()


def scale_lr(base_lr_per_512: float, total_batch: int) -> float:
    """Linear scaling rule: ``lr = base_lr_per_512 * total_batch / 512`` (FD / BEiT convention)."""
    if total_batch < 1:
        raise UserError(f"total batch size must be >= 1, got {total_batch}; check batch size and GPU count")
    return base_lr_per_512 * total_batch / 512


def scale_lrs(lr: float, warmup_lr: float, min_lr: float, total_batch: int) -> dict[str, float]:
    """All three learning rates of a recipe, given per 512 images, scaled to ``total_batch`` (published
    ``main_fd.py`` / ``main_finetune.py``):

        base_lr   = lr        * total_batch / 512
        warmup_lr = warmup_lr * total_batch / 512
        min_lr    = min_lr    * total_batch / 512

    with ``total_batch = batch_size * accum_steps * world_size``. Returns the keyword arguments of
    :class:`WarmupCosine` (``base_lr``, ``warmup_lr``, ``min_lr``)."""
    return {"base_lr": scale_lr(lr, total_batch), "warmup_lr": scale_lr(warmup_lr, total_batch),
            "min_lr": scale_lr(min_lr, total_batch)}
