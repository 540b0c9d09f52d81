"""Mixup / CutMix and the fine-tuning loss (timm's, as the published main_finetune.py uses them)."""
from __future__ import annotations

from typing import Any

import torch

from fd_ref.errors import UserError

# ---------------------------------------------------------------------------------------------------------
# Mixup / CutMix and the fine-tuning loss (timm's, as the published main_finetune.py uses them)
# ---------------------------------------------------------------------------------------------------------


def build_mixup(num_classes: int, mixup: float = 0.8, cutmix: float = 1.0, switch_prob: float = 0.5,
                label_smoothing: float = 0.1) -> Any:
    """timm's ``Mixup`` in "batch" mode (one ``lam`` per batch, each image mixed with the batch reversed),
    or ``None`` when both alphas are 0 (no mixing).

    Per batch: CutMix with probability ``switch_prob`` (when both alphas are positive), else Mixup, with
    ``lam ~ Beta(alpha, alpha)``; CutMix's ``lam`` is corrected to the kept area. Targets are
    ``lam * smooth(y) + (1 - lam) * smooth(y.flip(0))``, ``smooth(y) = one_hot(y) * (1 - eps) + eps / K``
    with ``eps = label_smoothing``. Needs an even batch. Randomness: NumPy's global generator.
    """
    if mixup < 0 or cutmix < 0:
        raise UserError(f"mixup/cutmix alphas must be >= 0 (0 disables), got {mixup}, {cutmix}")
    if not 0 <= switch_prob <= 1:
        raise UserError(f"mixup/cutmix switch probability must be in [0, 1], got {switch_prob}")
    if not 0 <= label_smoothing < 1:
        raise UserError(f"label smoothing must be in [0, 1), got {label_smoothing}")
    if mixup == 0 and cutmix == 0:
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=1.0, switch_prob=switch_prob, mode="batch",
                 label_smoothing=label_smoothing, num_classes=num_classes)


def build_criterion(mixing: bool, label_smoothing: float) -> torch.nn.Module:
    """The fine-tuning loss, chosen as the published ``main_finetune.py`` does, from timm:

    * with Mixup/CutMix: ``SoftTargetCrossEntropy``, ``mean_b( -sum_k t[b, k] * log_softmax(z[b])[k] )``
      (label smoothing is already in the mixed targets ``t``);
    * else with ``label_smoothing > 0``: ``LabelSmoothingCrossEntropy``,
      ``mean_b( (1 - eps) * -log_softmax(z[b])[y_b] + eps * mean_k -log_softmax(z[b])[k] )``;
    * else plain cross-entropy.
    """
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if mixing:
        return SoftTargetCrossEntropy()
    if label_smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=label_smoothing)
    return torch.nn.CrossEntropyLoss()
