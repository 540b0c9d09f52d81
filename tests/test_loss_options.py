"""Spec tests of --loss (fd_ref.method.loss_options): each loss against its formula written out, the gradients at the
kinks of smooth-L1 (|d| = beta and d = 0), MSE's gradient 2d/n, and the cosine loss's invariance to positive
rescaling of either side, its range, its minimum and its gradient perpendicular to the prediction."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fd_ref.method.loss_options import LOSSES, cosine, distill_loss, mse

shapes = st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(2, 24))


def _pair(shape, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * scale, torch.randn(shape, generator=g) * scale


@given(shape=shapes, seed=st.integers(0, 2**31 - 1), beta=st.floats(0.1, 5.0))
def test_values_match_the_formulas(shape, seed, beta):
    pred, target = _pair(shape, seed)
    d = (pred - target).double()
    smooth = torch.where(d.abs() <= beta, 0.5 * d ** 2 / beta, d.abs() - 0.5 * beta).mean()
    assert torch.allclose(distill_loss("smooth_l1", pred, target, beta).double(), smooth, rtol=1e-5)
    assert torch.allclose(distill_loss("mse", pred, target).double(), (d ** 2).mean(), rtol=1e-5)
    p, t = pred.double(), target.double()
    cos = (p * t).sum(-1) / (p.norm(dim=-1) * t.norm(dim=-1))
    assert torch.allclose(distill_loss("cosine", pred, target).double(), (1 - cos).mean(), atol=1e-5)


def _grad(name, pred, target, beta=2.0):
    pred = pred.clone().requires_grad_(True)
    distill_loss(name, pred, target, beta).backward()
    return pred.grad


@pytest.mark.parametrize("beta", [0.5, 2.0])
def test_smooth_l1_gradient_at_its_kinks(beta):
    """d/dpred of mean(l(d)), n elements: d / (beta n) inside, sign(d) / n outside; at |d| = beta both sides
    give sign(d) / n (continuous), at d = 0 the gradient is 0."""
    target = torch.zeros(4, 3)
    d = torch.tensor([[beta, -beta, 0.0], [beta / 2, -beta / 2, 3 * beta],
                      [-3 * beta, beta + 1e-3, -(beta - 1e-3)], [0.0, 0.0, 0.0]])
    g = _grad("smooth_l1", d, target, beta)
    n = d.numel()
    expected = torch.where(d.abs() <= beta, d / beta, d.sign()) / n
    assert torch.allclose(g, expected, atol=1e-7)
    assert g[0, 0] == pytest.approx(1 / n) and g[0, 1] == pytest.approx(-1 / n) and g[0, 2] == 0
    assert g[2, 1] == pytest.approx(1 / n, rel=5e-3) and g[2, 2] == pytest.approx(-1 / n, rel=5e-3)


@given(shape=shapes, seed=st.integers(0, 2**31 - 1))
def test_mse_gradient_is_two_d_over_n(shape, seed):
    pred, target = _pair(shape, seed)
    g = _grad("mse", pred, target)
    assert torch.allclose(g, 2 * (pred - target) / pred.numel(), atol=1e-6)


@given(shape=shapes, seed=st.integers(0, 2**31 - 1), a=st.floats(1e-2, 1e2), b=st.floats(1e-2, 1e2))
def test_cosine_is_invariant_to_positive_scaling_token_by_token(shape, seed, a, b):
    pred, target = _pair(shape, seed)
    g = torch.Generator().manual_seed(seed + 1)
    per_token = torch.rand(shape[:-1] + (1,), generator=g) * 10 + 0.1  # a different factor for each token
    base = cosine(pred, target)
    assert torch.allclose(cosine(a * pred, b * target), base, atol=1e-5)
    assert torch.allclose(cosine(per_token * pred, target), base, atol=1e-5)
    assert 0 <= float(base) <= 2
    # a negative factor is no rescaling: it flips every cosine, 1 - c -> 1 + c
    assert torch.allclose(cosine(-pred, target), 2 - base, atol=1e-5)


@given(shape=shapes, seed=st.integers(0, 2**31 - 1))
def test_cosine_minimum_and_gradient_perpendicular_to_the_prediction(shape, seed):
    pred, target = _pair(shape, seed)
    assert float(cosine(3 * target, target)) == pytest.approx(0, abs=1e-6)
    assert torch.allclose(_grad("cosine", 3 * target, target), torch.zeros(shape), atol=1e-6)
    g = _grad("cosine", pred, target)
    assert torch.allclose((g * pred).sum(-1), torch.zeros(shape[:-1]), atol=1e-6)  # scale-free: no radial part


def test_shapes_must_agree_and_names_are_checked():
    for name in LOSSES:
        with pytest.raises(ValueError, match=rf"^{name}: pred \(2, 3\) and target \(2, 4\) differ$"):
            distill_loss(name, torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"^loss must be one of smooth_l1, mse, cosine, got 'l2'$"):
        distill_loss("l2", torch.zeros(2), torch.zeros(2))
    assert mse(torch.ones(3), torch.zeros(3)).dtype == torch.float32


def test_smooth_l1_is_the_default_with_beta_two():
    """FD's loss (Sec. 3.1): smooth-L1 with beta = 2 when no beta is given; differences on both sides of 2."""
    pred = torch.tensor([[0.5, -1.5, 2.5, -4.0]])
    d = pred.double().abs()
    hand = torch.where(d <= 2.0, 0.5 * d ** 2 / 2.0, d - 1.0).mean()  # beta 2: 0.0625, 0.5625, 1.5, 3.0
    assert float(distill_loss("smooth_l1", pred, torch.zeros(1, 4))) == pytest.approx(float(hand), rel=1e-6)
    assert float(hand) == pytest.approx((0.0625 + 0.5625 + 1.5 + 3.0) / 4)


def test_cosine_floor_is_one_e_minus_8_per_vector():
    """Norms are floored at 1e-8 each (F.cosine_similarity's eps): two equal vectors of norm 1.5e-8 still have
    cosine 1, two of norm 5e-9 have cosine (5e-9)^2 / (1e-8)^2 = 0.25, so the loss is 0.75."""
    for norm, loss in ((1.5e-8, 0.0), (5e-9, 0.75)):
        v = torch.tensor([[norm, 0.0]])
        assert float(cosine(v, v)) == pytest.approx(loss, abs=1e-6)
