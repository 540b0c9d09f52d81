"""The feature-distillation loss (paper Sec. 3.1, Eq. 1).

The student's projected features ``pred = g(s)`` regress the whitened teacher features ``target`` with a
smooth-L1 loss of threshold ``beta`` (2.0 in the paper), averaged over every element (batch, tokens and
channels):

    d = pred - target
    l(d) = 0.5 * d**2 / beta      if |d| <= beta
         = |d| - 0.5 * beta       otherwise
    L = mean(l(d))

Quadratic near zero and linear in the tails, so a few very wrong channels cannot dominate the gradient
(|dl/dd| <= 1 everywhere).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def smooth_l1(pred: torch.Tensor, target: torch.Tensor, beta: float = 2.0) -> torch.Tensor:
    """Mean smooth-L1 between ``pred`` and ``target`` (same shape), computed in float32."""
    if pred.shape != target.shape:
        raise ValueError(f"smooth_l1: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    if beta <= 0:
        raise ValueError("smooth_l1: beta must be > 0")
    return F.smooth_l1_loss(pred.float(), target.float(), reduction="mean", beta=beta)
