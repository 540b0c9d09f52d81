"""Stochastic depth ("drop path") and the asymmetric schedule of FD (paper Sec. 3.1).

In training, each sample's residual branch is kept with probability 1 - p and rescaled so its
expectation is unchanged:

    DropPath(x)[b] = x[b] * m_b / (1 - p),   m_b ~ Bernoulli(1 - p)

and it is the identity in eval mode. FD applies it asymmetrically: the teacher runs in eval mode (no drop
path), the student with rates growing linearly over depth,

    rate_i = max_rate * i / (depth - 1),   i = 0 .. depth-1,

with max_rate 0.1-0.3 depending on the recipe, computed as the published code computes it: ``torch.linspace``
in float32, so every rate is the published one bit for bit (a float64 formula differs in the last bits,
e.g. 0.1 / 3 against float32's 0.033333335).

Where the asymmetry lives in the code: the teacher's side is :meth:`fd_ref.models.teachers.Teacher.train`, which keeps
the wrapped teacher in eval mode whatever its parent module does (so its blocks drop nothing); the student's
side is :func:`drop_path_rates` (the schedule above, passed as ``drop_path_rate`` to the student's
constructor: ``--drop-path`` of train.py) and :func:`add_branch` (the per-sample drop in each residual branch
of ``fd_ref.models.vit.Block``, fused with layer scale and the residual add; each block's :class:`DropPath` modules
hold its rates).

Hand-written rather than timm's ``DropPath``: timm's module multiplies by its mask as a step of its own, while
:func:`add_branch` fuses layer scale, the drop and the residual add into one ``addcmul`` from the same draw.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn


def _keep_mask(x: torch.Tensor, dtype: torch.dtype, keep: float) -> torch.Tensor:
    """m_b ~ Bernoulli(keep), one per sample of ``x``, shaped [B, 1, ..., 1] to broadcast over it. The one
    random draw of drop path, shared by :func:`drop_path` and :func:`add_branch` so both drop the same samples
    from the same seed."""
    return torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), dtype=dtype, device=x.device).bernoulli_(keep)


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Zero whole samples of ``x`` with probability ``p`` and rescale the rest by 1/(1-p)."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    return x * _keep_mask(x, x.dtype, keep) / keep


def add_branch(x: torch.Tensor, branch: torch.Tensor, gamma: Optional[torch.Tensor], p: float,
               training: bool) -> torch.Tensor:
    """One residual update of a pre-norm block, ``x + DropPath(gamma * branch)``, as one fused op:

        out[b] = x[b] + branch[b] * (gamma * m_b / (1 - p)),   m_b ~ Bernoulli(1 - p)   (training, p > 0)
        out    = x + branch * gamma                                                      (otherwise)

    ``torch.addcmul`` with the per-sample scale ``gamma * m_b / (1 - p)`` (shape [B, 1, .., C]) does in one
    pass over the activations what layer scale, drop path and the residual add did in three (forward and
    backward); ``gamma=None`` (no layer scale) is ``gamma = 1``. The same mask as :func:`drop_path` on
    ``gamma * branch`` (the same draw, of the same dtype); the result equals ``x + drop_path(gamma * branch)``
    up to float rounding (the product is associated differently)."""
    scale = gamma
    if p > 0.0 and training:
        keep = 1.0 - p
        # the dtype of gamma * branch; promote_types, not result_type, which torch.compile cannot trace
        dtype = branch.dtype if gamma is None else torch.promote_types(branch.dtype, gamma.dtype)
        mask = _keep_mask(branch, dtype, keep).div_(keep)
        scale = mask if gamma is None else gamma * mask
    if scale is None:
        return x + branch
    return torch.addcmul(x, branch, scale)


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
    """Linear stochastic-depth schedule: 0 for the first block, ``max_rate`` for the last (float32
    ``linspace``, as published)."""
    return torch.linspace(0.0, max_rate, depth, device="cpu").tolist()  # cpu: also under torch.device("meta")
