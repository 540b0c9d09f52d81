"""Spec tests of the small equations of FD: whitening, the smooth-L1 loss, the projection g and drop path."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from fd_ref.method.drop_path import DropPath, add_branch, drop_path, drop_path_rates
from fd_ref.method.loss import smooth_l1
from fd_ref.method.projection import Projection
from fd_ref.method.whitening import whiten

shapes = st.lists(st.integers(1, 4), min_size=0, max_size=2).flatmap(
    lambda lead: st.integers(2, 48).map(lambda c: tuple(lead) + (c,)))


def _randn(shape, seed, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ------------------------------------------------------------------------------------------------ whiten
@given(shape=shapes, scale=st.floats(0.5, 1e3), offset=st.floats(-1e3, 1e3), seed=st.integers(0, 2**31 - 1))
def test_whiten_zero_mean_unit_variance_per_token(shape, scale, offset, seed):
    x = (_randn(shape, seed) * scale + offset).float()
    y = whiten(x)
    assert y.shape == x.shape and y.dtype == torch.float32
    mean = y.double().mean(-1)
    var = y.double().var(-1, unbiased=False)
    # exact expectation with the eps of the denominator: var(y) = var(x) / (var(x) + eps)
    var_x = x.double().var(-1, unbiased=False)
    expected_var = var_x / (var_x + 1e-5)
    assert torch.allclose(mean, torch.zeros_like(mean), atol=1e-4 * (1 + abs(offset) / scale))
    assert torch.allclose(var, expected_var, atol=2e-3, rtol=1e-3)
    big = var_x > 1e-2  # unit variance where eps is negligible
    assert torch.allclose(var[big], torch.ones_like(var[big]), atol=2e-3)


@given(shape=shapes, seed=st.integers(0, 2**31 - 1))
def test_whiten_matches_hand_formula_and_layer_norm_without_affine(shape, seed):
    x = _randn(shape, seed).float() * 3 + 1
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)  # biased variance over channels
    hand = (x - mean) / torch.sqrt(var + 1e-5)
    assert torch.allclose(whiten(x), hand, atol=1e-5, rtol=1e-5)
    ln = F.layer_norm(x, (x.shape[-1],), weight=None, bias=None, eps=1e-5)
    assert torch.allclose(whiten(x), ln, atol=1e-6)


def test_whiten_has_no_parameters_and_no_state():
    # A plain function (not a module with affine weights) whose output depends only on its input.
    assert not isinstance(whiten, nn.Module)
    x = torch.randn(2, 5, 8)
    assert torch.equal(whiten(x), whiten(x.clone()))
    # an affine LayerNorm at initialisation agrees, but whiten stays fixed whatever the "weights" would be
    ln = nn.LayerNorm(8, eps=1e-5)
    with torch.no_grad():
        ln.weight.fill_(3.0)
        ln.bias.fill_(1.0)
    assert not torch.allclose(whiten(x), ln(x))
    assert torch.allclose(whiten(x) * 3 + 1, ln(x), atol=1e-5)


def test_whiten_eps_and_float32_output():
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0]])  # var 1.25
    expected = (x - 1.5) / math.sqrt(1.25 + 1e-5)
    assert torch.allclose(whiten(x), expected, atol=1e-6)
    expected_eps = (x - 1.5) / math.sqrt(1.25 + 0.75)
    assert torch.allclose(whiten(x, eps=0.75), expected_eps, atol=1e-6)
    assert whiten(x.double()).dtype == torch.float32
    assert whiten(x.half()).dtype == torch.float32
    # a constant token has no spread: it whitens to zeros (not NaN)
    assert torch.equal(whiten(torch.full((1, 6), 4.0)), torch.zeros(1, 6))


@given(shape=shapes, seed=st.integers(0, 2**31 - 1), log_a=st.floats(-1.0, 2.0))
def test_whiten_invariant_to_positive_affine_per_token(shape, seed, log_a):
    x = _randn(shape, seed).float()
    gen = torch.Generator().manual_seed(seed + 1)
    lead = shape[:-1] + (1,)
    a = 10 ** (log_a + 0.2 * torch.rand(lead, generator=gen))  # a > 0, per token
    b = torch.randn(lead, generator=gen) * 10  # b per token
    y = whiten(a * x + b)
    # Tolerance from eps: rescaling changes var/(var+eps) slightly, so only compare tokens whose spread is
    # well above eps both before and after scaling.
    var_x = x.double().var(-1, unbiased=False)
    ok = (var_x > 0.05) & (var_x * a[..., 0].double() ** 2 > 0.05)
    assert torch.allclose(y[ok], whiten(x)[ok], atol=3e-3, rtol=1e-3)
    # a negative scale flips the sign
    assert torch.allclose(whiten(-a * x + b)[ok], -whiten(x)[ok], atol=3e-3, rtol=1e-3)


# ------------------------------------------------------------------------------------------------ smooth L1
def _smooth_l1_ref(d: torch.Tensor, beta: float) -> torch.Tensor:
    return torch.where(d.abs() <= beta, 0.5 * d ** 2 / beta, d.abs() - 0.5 * beta)


@given(d=st.lists(st.floats(-20, 20), min_size=1, max_size=40), beta=st.floats(0.05, 5.0),
       shift=st.floats(-5, 5))
def test_smooth_l1_matches_piecewise_definition(d, beta, shift):
    d = torch.tensor(d, dtype=torch.float64)
    target = torch.full_like(d, shift)
    pred = target + d
    loss = smooth_l1(pred.float(), target.float(), beta=beta)
    ref = _smooth_l1_ref((pred.float() - target.float()).double(), beta).mean()
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert math.isclose(loss.item(), ref.item(), rel_tol=1e-5, abs_tol=1e-5)
    # symmetric in d
    assert math.isclose(smooth_l1(target.float(), pred.float(), beta=beta).item(), loss.item(),
                        rel_tol=1e-6, abs_tol=1e-6)


def test_smooth_l1_hand_computed_examples():
    zero = torch.zeros(1)
    assert smooth_l1(torch.tensor([1.0]), zero, beta=2.0).item() == pytest.approx(0.25)  # 0.5*1/2
    assert smooth_l1(torch.tensor([3.0]), zero, beta=2.0).item() == pytest.approx(2.0)  # 3 - 1
    assert smooth_l1(torch.tensor([-3.0]), zero, beta=2.0).item() == pytest.approx(2.0)
    assert smooth_l1(torch.tensor([1.0, 3.0]), torch.zeros(2), beta=2.0).item() == pytest.approx(1.125)
    assert smooth_l1(torch.tensor([2.0]), zero, beta=2.0).item() == pytest.approx(1.0)  # at beta: 0.5*beta
    # default beta is the paper's 2.0
    assert smooth_l1(torch.tensor([1.0, 3.0]), torch.zeros(2)).item() == pytest.approx(1.125)
    # beta = 0.5: d = 1 is in the linear part: 1 - 0.25
    assert smooth_l1(torch.tensor([1.0]), zero, beta=0.5).item() == pytest.approx(0.75)


@given(beta=st.floats(0.05, 5.0))
def test_smooth_l1_continuous_at_beta(beta):
    zero = torch.zeros(1, dtype=torch.float64)
    eps = 1e-4 * beta
    below = smooth_l1(torch.tensor([beta - eps], dtype=torch.float64), zero, beta=beta).item()
    above = smooth_l1(torch.tensor([beta + eps], dtype=torch.float64), zero, beta=beta).item()
    assert below == pytest.approx(0.5 * beta, rel=1e-3)
    assert above == pytest.approx(0.5 * beta, rel=1e-3)
    assert abs(above - below) <= 2.5 * eps


@given(d=st.lists(st.floats(-20, 20), min_size=1, max_size=40), beta=st.floats(0.05, 5.0))
def test_smooth_l1_gradient_bounded_by_one_over_numel(d, beta):
    d = torch.tensor(d, dtype=torch.float32)
    pred = d.clone().requires_grad_(True)
    smooth_l1(pred, torch.zeros_like(d), beta=beta).backward()
    g = pred.grad * d.numel()
    assert torch.all(g.abs() <= 1 + 1e-6)
    # exactly clamp(d / beta, -1, 1): the derivative of the piecewise definition
    assert torch.allclose(g, (d / beta).clamp(-1, 1), atol=1e-5)


def test_smooth_l1_mean_over_all_elements():
    gen = torch.Generator().manual_seed(0)
    pred = torch.randn(3, 5, 7, generator=gen) * 4
    target = torch.randn(3, 5, 7, generator=gen)
    loss = smooth_l1(pred, target, beta=2.0)
    ref = _smooth_l1_ref(pred - target, 2.0)
    assert loss.item() == pytest.approx(ref.mean().item(), rel=1e-5)
    assert loss.item() != pytest.approx(ref.sum().item(), rel=1e-3)
    # repeating the batch leaves a mean unchanged
    twice = smooth_l1(torch.cat([pred, pred]), torch.cat([target, target]), beta=2.0)
    assert twice.item() == pytest.approx(loss.item(), rel=1e-6)


def test_smooth_l1_rejects_bad_input():
    with pytest.raises(ValueError, match=r"^smooth_l1: pred \(2, 3\) and target \(3, 2\) differ$"):
        smooth_l1(torch.zeros(2, 3), torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"^smooth_l1: beta must be > 0$"):
        smooth_l1(torch.zeros(2), torch.zeros(2), beta=0.0)


# ------------------------------------------------------------------------------------------------ projection
def _random_projection(cs: int, ct: int, seed: int) -> Projection:
    torch.manual_seed(seed)
    p = Projection(cs, ct)
    with torch.no_grad():
        p.proj.weight.normal_()
        p.proj.bias.normal_()
    return p


@given(b=st.integers(1, 3), n=st.integers(1, 9), cs=st.integers(1, 12), ct=st.integers(1, 12),
       seed=st.integers(0, 1000))
def test_projection_tokens_equal_einsum_and_conv1d(b, n, cs, ct, seed):
    p = _random_projection(cs, ct, seed)
    s = _randn((b, n, cs), seed).float()
    w, bias = p.proj.weight[:, :, 0], p.proj.bias
    out = p(s)
    assert out.shape == (b, n, ct)
    assert torch.allclose(out, torch.einsum("bnc,oc->bno", s, w) + bias, atol=1e-5)
    conv = nn.Conv1d(cs, ct, kernel_size=1)
    conv.load_state_dict({"weight": p.proj.weight.detach(), "bias": p.proj.bias.detach()})
    ref = conv(s.transpose(1, 2)).transpose(1, 2)
    assert torch.allclose(out, ref, atol=1e-5)


@given(b=st.integers(1, 3), h=st.integers(1, 5), w_=st.integers(1, 5), cs=st.integers(1, 10),
       ct=st.integers(1, 10), seed=st.integers(0, 1000))
def test_projection_maps_equal_einsum(b, h, w_, cs, ct, seed):
    p = _random_projection(cs, ct, seed)
    s = _randn((b, cs, h, w_), seed).float()
    w, bias = p.proj.weight[:, :, 0], p.proj.bias
    out = p(s)
    assert out.shape == (b, ct, h, w_)
    assert torch.allclose(out, torch.einsum("bchw,oc->bohw", s, w) + bias[:, None, None], atol=1e-5)
    # the same map as tokens gives the same numbers
    tokens = s.flatten(2).transpose(1, 2)
    assert torch.allclose(p(tokens).transpose(1, 2).reshape(b, ct, h, w_), out, atol=1e-5)


def test_projection_parameters_and_errors():
    p = Projection(6, 10)
    assert dict((k, tuple(v.shape)) for k, v in p.state_dict().items()) == {
        "proj.weight": (10, 6, 1), "proj.bias": (10,)}
    with pytest.raises(ValueError, match=r"^Projection expects 6 channels, got 5$"):  # tokens: the last dim
        p(torch.zeros(2, 3, 5))
    with pytest.raises(ValueError, match=r"^Projection expects 6 channels, got 5$"):  # a map: dim 1
        p(torch.zeros(2, 5, 3, 4))
    with pytest.raises(ValueError, match=r"^Projection takes \[B, N, C\] or \[B, C, H, W\], got shape \(2, 6\)$"):
        p(torch.zeros(2, 6))
    # hand-computed: weight = [[1, 2]], bias = [0.5] -> 1*3 + 2*4 + 0.5
    q = Projection(2, 1)
    with torch.no_grad():
        q.proj.weight.copy_(torch.tensor([[[1.0], [2.0]]]))
        q.proj.bias.fill_(0.5)
    assert q(torch.tensor([[[3.0, 4.0]]])).item() == pytest.approx(11.5)


# ------------------------------------------------------------------------------------------------ drop path
def test_drop_path_identity_in_eval_and_at_zero_rate():
    x = torch.randn(16, 5, 4)
    m = DropPath(0.5).eval()
    assert torch.equal(m(x), x)
    assert torch.equal(DropPath(0.0).train()(x), x)
    assert torch.equal(DropPath().train()(x), x)  # the default rate is 0
    assert repr(DropPath(0.25)) == "DropPath(p=0.25)"
    assert torch.equal(drop_path(x, 0.7, training=False), x)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_drop_path_per_sample_zero_or_rescaled(p):
    torch.manual_seed(0)
    x = torch.randn(256, 3, 4) + 5.0  # no zero entries
    out = DropPath(p).train()(x)
    dropped = (out == 0).flatten(1).all(1)
    kept = torch.isclose(out, x / (1 - p), rtol=1e-6, atol=0).flatten(1).all(1)
    assert torch.all(dropped ^ kept)  # every sample is exactly one of the two, as a whole
    assert dropped.any() and kept.any()


def test_drop_path_keeps_expectation():
    torch.manual_seed(1234)
    p, n = 0.3, 40_000
    x = torch.ones(n, 2)
    out = DropPath(p).train()(x)
    assert out.mean().item() == pytest.approx(1.0, abs=0.03)  # std of the mean ~0.005
    assert (out[:, 0] == 0).float().mean().item() == pytest.approx(p, abs=0.02)


def test_drop_path_rejects_bad_rate():
    for p in (1.0, -0.1):
        with pytest.raises(ValueError, match=rf"^drop path rate must be in \[0, 1\), got {p}$"):
            DropPath(p)


def test_drop_path_at_rate_zero_draws_nothing():
    """At rate 0 (the teacher's side, the first block) no mask is drawn in training either, so the global random
    stream, and with it every later draw of the run, is the same as without the module."""
    x, branch = torch.randn(4, 3, 2), torch.randn(4, 3, 2)
    torch.manual_seed(7)
    before = torch.get_rng_state()
    assert torch.equal(drop_path(x, 0.0, training=True), x)
    assert torch.equal(add_branch(x, branch, None, 0.0, training=True), x + branch)
    assert torch.equal(torch.get_rng_state(), before)
    drop_path(x, 0.5, training=True)  # a positive rate does draw
    assert not torch.equal(torch.get_rng_state(), before)


@given(batch=st.integers(1, 6), n=st.integers(1, 5), c=st.integers(1, 8), p=st.sampled_from([0.0, 0.2, 0.7]),
       layer_scale=st.booleans(), training=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_add_branch_is_the_residual_update(batch, n, c, p, layer_scale, training, seed):
    """``add_branch(x, y, gamma, p)`` = ``x + drop_path(gamma * y)`` with the same random mask (both sides
    draw from the same seed), in value and in the gradients of x, y and gamma; per sample, the branch is
    either all dropped (out = x) or all kept and rescaled by 1 / (1 - p)."""
    x, y = _randn((batch, n, c), seed), _randn((batch, n, c), seed + 1) + 3.0
    gamma = _randn((c,), seed + 2) if layer_scale else None
    leaves = [t.requires_grad_() for t in (x, y, gamma) if t is not None]
    torch.manual_seed(seed)
    fused = add_branch(x, y, gamma, p, training)
    torch.manual_seed(seed)
    plain = x + drop_path(y if gamma is None else gamma * y, p, training)
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-12)
    w = _randn(fused.shape, seed + 3)
    for a, b in zip(torch.autograd.grad((fused * w).sum(), leaves), torch.autograd.grad((plain * w).sum(), leaves)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    branch = (fused - x).detach()
    scaled = (y if gamma is None else gamma * y).detach()
    dropped = (branch == 0).flatten(1).all(1)
    kept = torch.isclose(branch, scaled / (1 - p if training else 1.0), rtol=1e-9, atol=1e-12).flatten(1).all(1)
    assert torch.all(dropped ^ kept)
    if p == 0.0 or not training:
        assert torch.all(kept)


def test_add_branch_keeps_expectation():
    torch.manual_seed(99)
    x, y, gamma = torch.zeros(40_000, 2), torch.ones(40_000, 2), torch.tensor([0.5, 2.0])
    out = add_branch(x, y, gamma, 0.3, training=True)
    assert out.mean(0).tolist() == pytest.approx([0.5, 2.0], rel=0.03)
    assert (out[:, 0] == 0).float().mean().item() == pytest.approx(0.3, abs=0.02)


@given(max_rate=st.floats(0.0, 0.9), depth=st.integers(1, 32))
def test_drop_path_rates_linear_from_zero_to_max(max_rate, depth):
    rates = drop_path_rates(max_rate, depth)
    assert len(rates) == depth
    assert rates[0] == 0.0
    if depth > 1:
        assert rates[-1] == pytest.approx(max_rate)
        step = max_rate / (depth - 1)
        for i, r in enumerate(rates):  # float32 rates (as published): within float32's rounding of i * step
            assert r == pytest.approx(i * step, rel=1e-6, abs=1e-12)
    assert all(a <= b for a, b in zip(rates, rates[1:]))


def test_drop_path_rates_hand_example():
    assert drop_path_rates(0.3, 4) == pytest.approx([0.0, 0.1, 0.2, 0.3])


@given(max_rate=st.floats(0.0, 0.9), depth=st.integers(1, 48))
def test_drop_path_rates_are_the_published_float32_ones(max_rate, depth):
    """Bit for bit the rates the published ViT computes (``[x.item() for x in torch.linspace(0, rate, depth)]``,
    written out in tests/swinv2_reference.py): float32 values, not a float64 formula."""
    import swinv2_reference as published
    rates = drop_path_rates(max_rate, depth)
    assert rates == published.drop_path_rates(max_rate, (depth,))
    assert all(float(np.float32(r)) == r for r in rates)


def test_drop_path_rates_differ_from_a_float64_formula():
    assert drop_path_rates(0.1, 4)[1] != 0.1 / 3 and drop_path_rates(0.1, 4)[1] == float(np.float32(0.1 / 3))
