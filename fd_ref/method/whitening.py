"""Feature whitening of the distillation target (paper Sec. 3.1, "feature whitening").

Teachers produce features of very different magnitudes (a CLIP ViT's tokens are far larger than a DINO
ViT's), so FD normalises the target before regressing it. The paper uses a LayerNorm with neither scale
nor bias, i.e. each token is standardised over its channels:

    whiten(t)[..., c] = (t[..., c] - mean_c(t)) / sqrt(var_c(t) + eps)

where ``mean_c`` and ``var_c`` (biased) are taken over the last (channel) dimension of ``t``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def whiten(t: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Standardise every token of ``t`` [..., C] over its C channels (LayerNorm without affine).

    Computed in float32 whatever the input precision, and returned in float32: the target of a
    regression should not carry bf16 rounding.
    """
    return F.layer_norm(t.float(), (t.shape[-1],), weight=None, bias=None, eps=eps)
