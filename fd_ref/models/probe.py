"""Linear probing (paper Sec. 4): a frozen backbone, a BatchNorm without affine parameters and a linear
classifier, as the published ``main_linear.py`` builds it.

    f      = features(x)                                    frozen backbone, in eval mode
    logits = head( (f - mean_B f) / sqrt(var_B f + 1e-6) )  BatchNorm1d(affine=False, eps=1e-6), then Linear

The head's weight starts from N(0, 0.01^2) (MoCo v3's probe init; truncated at +-2, i.e. not in effect), its bias at 0; training uses
:class:`fd_ref.optim.lars.Lars` and plain cross-entropy. ``features`` is what the published model's
``forward_features`` returns for its configuration (``USE_MEAN_POOLING`` in its ``config.py``):

* ``pool="avg"`` (its fine-tuning configs, ``USE_MEAN_POOLING: True``): the mean of the last block's patch
  tokens, then a LayerNorm (eps 1e-6) whose weight and bias stay at their initial 1 and 0 (it is frozen
  with the backbone and absent from the pretrained file), i.e. a LayerNorm without affine parameters;
  the pretrained final norm is not used.
* ``pool="cls"`` (its ``config.py`` default, ``USE_MEAN_POOLING: False``): the class token after the
  pretrained final norm.

Deliberate difference: the published loop calls ``model.train()`` on the whole network, so the frozen
backbone runs with drop path (stochastic depth) while the probe trains. We keep the backbone in eval mode
(what a frozen feature extractor is meant to be); only the BatchNorm is in training mode.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from fd_ref.models.vit import VisionTransformer

PROBE_POOLS: tuple[str, ...] = ("avg", "cls")
BN_EPS = 1e-6
LN_EPS = 1e-6
HEAD_INIT_STD = 0.01


class LinearProbe(nn.Module):
    """Frozen ``backbone`` (built with ``global_pool="cls"``, i.e. with its final norm) + BatchNorm1d(affine
    False) + Linear. Only ``head`` has trainable parameters."""

    def __init__(self, backbone: VisionTransformer, num_classes: int, pool: Literal["avg", "cls"] = "avg") -> None:
        super().__init__()
        if pool not in PROBE_POOLS:
            raise ValueError(f"probe pool must be one of {PROBE_POOLS}, got {pool!r}")
        self.pool = pool
        if pool == "avg" and isinstance(backbone, VisionTransformer):  # the published mean-pooling model has
            backbone.norm = nn.Identity()                                  # no final norm over the tokens
        self.backbone = backbone.requires_grad_(False)
        self.bn = nn.BatchNorm1d(backbone.embed_dim, affine=False, eps=BN_EPS)
        self.head = nn.Linear(backbone.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=HEAD_INIT_STD)  # cut at +-2: in effect untruncated
        nn.init.zeros_(self.head.bias)
        self.config = {**backbone.config, "linear_probe": True, "probe_pool": pool}

    def train(self, mode: bool = True) -> "LinearProbe":
        super().train(mode)
        self.backbone.eval()  # a frozen backbone: no drop path, no dropout
        return self

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] -> the probed features [B, C]."""
        tokens = self.backbone.forward_features(x)
        if self.pool == "cls":
            return tokens[:, 0]
        pooled = tokens[:, self.backbone.num_prefix_tokens:].mean(1)
        return F.layer_norm(pooled, pooled.shape[-1:], eps=LN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(self.features(x)))
