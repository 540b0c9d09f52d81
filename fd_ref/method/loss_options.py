"""The distillation loss as a setting (``loss``; train.py's ``--loss``). ``pred`` and ``target`` are [..., C] token
maps of the same shape (the projected student tokens and the normalised teacher tokens), d = pred - target:

    smooth_l1  mean over every element of  0.5 d^2 / beta  (|d| <= beta),  |d| - 0.5 beta  (otherwise)
               the paper's loss (Sec. 3.1, Eq. 1), beta = 2.0: the default, as published (fd_ref.method.loss)
    mse        mean over every element of  d^2
    cosine     mean over tokens of  1 - <pred, target> / (|pred| |target|)     (one value per token)

All three are computed in float32. ``cosine`` ignores the length of each token (the same for any positive
rescaling of ``pred`` or ``target``, token by token); its gradient is perpendicular to ``pred``.

Imports torch only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fd_ref.method.loss import smooth_l1

LOSSES = ("smooth_l1", "mse", "cosine")
COSINE_EPS = 1e-8  # floor of |pred| |target| in the cosine (F.cosine_similarity's eps)


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every element, in float32."""
    if pred.shape != target.shape:
        raise ValueError(f"mse: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    return F.mse_loss(pred.float(), target.float(), reduction="mean")


def cosine(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of 1 - cosine similarity over the last (channel) dimension, in float32."""
    if pred.shape != target.shape:
        raise ValueError(f"cosine: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    return (1 - F.cosine_similarity(pred.float(), target.float(), dim=-1, eps=COSINE_EPS)).mean()


def distill_loss(name: str, pred: torch.Tensor, target: torch.Tensor, beta: float = 2.0) -> torch.Tensor:
    """The loss ``name`` (one of ``LOSSES``); ``beta`` applies to smooth_l1 only."""
    if name == "smooth_l1":
        return smooth_l1(pred, target, beta)
    if name == "mse":
        return mse(pred, target)
    if name == "cosine":
        return cosine(pred, target)
    raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {name!r}")
