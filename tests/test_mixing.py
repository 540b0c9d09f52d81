"""Tests for fine-tuning's mixing and losses in fd_ref.data: timm's Mixup/CutMix with the published settings
and timm's losses, each against a hand formula."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fd_ref.data import build_criterion, build_mixup
from fd_ref.errors import UserError


def test_mixup_is_timms_with_the_published_settings() -> None:
    from timm.data import Mixup

    mix = build_mixup(1000)
    assert isinstance(mix, Mixup)
    assert (mix.mixup_alpha, mix.cutmix_alpha, mix.switch_prob, mix.mode, mix.label_smoothing, mix.mix_prob,
            mix.num_classes, mix.cutmix_minmax, mix.correct_lam) == (0.8, 1.0, 0.5, "batch", 0.1, 1.0, 1000, None, True)
    assert build_mixup(10, 0.0, 0.0) is None
    for bad in (dict(mixup=-1.0), dict(switch_prob=2.0), dict(label_smoothing=1.0)):
        with pytest.raises(UserError):
            build_mixup(10, **bad)


@settings(max_examples=40, deadline=None)
@given(half=st.integers(1, 4), classes=st.integers(2, 12), smoothing=st.floats(0, 0.5), seed=st.integers(0, 1000))
def test_mixup_targets_follow_the_hand_formula(half: int, classes: int, smoothing: float, seed: int) -> None:
    """Mixup only: image b becomes lam * x_b + (1 - lam) * x_{B-1-b}; its target is
    lam * smooth(y_b) + (1 - lam) * smooth(y_{B-1-b}), smooth(y) = one_hot(y) (1 - eps) + eps / K."""
    batch = 2 * half
    np.random.seed(seed)
    images = torch.arange(batch, dtype=torch.float64)[:, None, None, None].expand(batch, 3, 4, 4).clone()
    labels = torch.randint(0, classes, (batch,), generator=torch.Generator().manual_seed(seed))
    out, targets = build_mixup(classes, mixup=0.8, cutmix=0.0, label_smoothing=smoothing)(images.clone(), labels)
    lam = (out[0, 0, 0, 0].item() - (batch - 1)) / (0 - (batch - 1))  # out[0] = lam * 0 + (1 - lam) * (B - 1)
    hand_images = lam * images + (1 - lam) * images.flip(0)
    torch.testing.assert_close(out, hand_images)
    smooth = torch.nn.functional.one_hot(labels, classes).double() * (1 - smoothing) + smoothing / classes
    hand = lam * smooth + (1 - lam) * smooth.flip(0)
    torch.testing.assert_close(targets.double(), hand, rtol=1e-5, atol=1e-6)
    assert torch.allclose(targets.sum(1).double(), torch.ones(batch, dtype=torch.float64), atol=1e-5)


def test_cutmix_lambda_is_the_kept_area() -> None:
    np.random.seed(1)
    images = torch.stack([torch.zeros(3, 16, 16), torch.ones(3, 16, 16)])
    mix = build_mixup(2, mixup=0.0, cutmix=1.0, label_smoothing=0.0)
    for _ in range(10):
        out, targets = mix(images.clone(), torch.tensor([0, 1]))
        pasted = out[0, 0].mean().item()  # fraction of image 0 now coming from image 1
        assert targets[0, 1].item() == pytest.approx(pasted, abs=1e-6)


def _log_softmax_by_hand(z: torch.Tensor) -> torch.Tensor:
    z = z.double()
    m = z.max(dim=1, keepdim=True).values
    return z - m - torch.log(torch.exp(z - m).sum(dim=1, keepdim=True))


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 6), classes=st.integers(2, 9), smoothing=st.floats(0.01, 0.5), seed=st.integers(0, 1000))
def test_fine_tuning_losses_follow_the_hand_formulas(batch: int, classes: int, smoothing: float, seed: int) -> None:
    """build_criterion picks timm's losses as main_finetune.py does; each equals its formula."""
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(batch, classes, generator=g)
    labels = torch.randint(0, classes, (batch,), generator=g)
    soft = torch.softmax(torch.randn(batch, classes, generator=g), dim=1)
    logp = _log_softmax_by_hand(logits)

    soft_ce = build_criterion(True, smoothing)
    assert isinstance(soft_ce, SoftTargetCrossEntropy)
    expected = -(soft.double() * logp).sum(1).mean()
    assert soft_ce(logits, soft).item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)

    ls_ce = build_criterion(False, smoothing)
    assert isinstance(ls_ce, LabelSmoothingCrossEntropy)
    nll = -logp[torch.arange(batch), labels]
    expected = ((1 - smoothing) * nll + smoothing * (-logp).mean(1)).mean()
    assert ls_ce(logits, labels).item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)

    plain = build_criterion(False, 0.0)
    assert type(plain) is torch.nn.CrossEntropyLoss and plain.label_smoothing == 0.0
    assert plain(logits, labels).item() == pytest.approx(nll.mean().item(), rel=1e-5, abs=1e-6)
