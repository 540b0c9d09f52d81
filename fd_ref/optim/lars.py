"""LARS (You et al., arXiv 1708.03888) in the variant of MoCo v3 that FD's published linear probe uses
(``utils.py``, class LARS, driven by ``main_linear.py``).

For every parameter ``p`` with gradient ``g`` of a group with ``lr``, ``weight_decay``, ``momentum`` and
``trust_coefficient``:

    d = g                                                      if p.ndim <= 1 (biases, norms: no decay, no scaling)
    d = q * (g + weight_decay * p),                            otherwise, with
        q = trust_coefficient * ||p|| / ||g + weight_decay * p||   (q = 1 when ||p|| = 0 or the update is 0)
    mu = momentum * mu + d                                     (mu starts at 0)
    p  = p - lr * mu

timm's ``Lars`` differs in the trust ratio's denominator (``||g|| + weight_decay * ||p|| + eps``), hence this
small class.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from fd_ref.errors import UserError


class Lars(torch.optim.Optimizer):
    """LARS with momentum; matrices get weight decay and the layer-wise trust ratio, 1-D parameters neither."""

    def __init__(self, params: Iterable[Any], lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001) -> None:
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1 or trust_coefficient <= 0:
            raise UserError(f"LARS needs lr >= 0, weight_decay >= 0, momentum in [0, 1) and trust_coefficient > 0; "
                            f"got {lr}, {weight_decay}, {momentum}, {trust_coefficient}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim > 1:
                    d = d.add(p, alpha=group["weight_decay"])
                    p_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    q = torch.where((p_norm > 0) & (d_norm > 0),
                                    group["trust_coefficient"] * p_norm / d_norm, torch.ones_like(p_norm))
                    d = d.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(d)
                p.add_(mu, alpha=-group["lr"])
        return loss
