"""Stochastic depth ("drop path") and the asymmetric schedule of FD (paper Sec. 3.1).

In training, each sample's residual branch is kept with probability 1 - p and rescaled so its
expectation is unchanged:

    DropPath(x)[b] = x[b] * m_b / (1 - p),   m_b ~ Bernoulli(1 - p)

and it is the identity in eval mode. FD applies it asymmetrically: the teacher runs in eval mode (no drop
path), the student with rates growing linearly over depth,

    rate_i = max_rate * i / (depth - 1),   i = 0 .. depth-1,

with max_rate 0.1-0.3 depending on the recipe.

Where the asymmetry lives in the code: the teacher's side is :meth:`fd_ref.teachers.Teacher.train`, which keeps
the wrapped teacher in eval mode whatever its parent module does (so its DropPath layers are identities); the
student's side is :func:`drop_path_rates` (the schedule above, passed as ``drop_path_rate`` to the student's
constructor: ``--drop-path`` of train.py) and :class:`DropPath` (the per-sample drop in each residual branch).
"""
from __future__ import annotations

import torch
import torch.nn as nn


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Zero whole samples of ``x`` with probability ``p`` and rescale the rest by 1/(1-p)."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask / keep


class DropPath(nn.Module):
    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop path rate must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def drop_path_rates(max_rate: float, depth: int) -> list[float]:
    """Linear stochastic-depth schedule: 0 for the first block, ``max_rate`` for the last."""
    if depth == 1:
        return [0.0]
    return [max_rate * i / (depth - 1) for i in range(depth)]
