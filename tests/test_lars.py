"""fd_ref.optim.lars.Lars, the published linear probe's optimiser (MoCo v3's LARS): a hand formula for several
steps, and timm's Lars as an independent reference where the two variants coincide (no weight decay)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fd_ref.errors import UserError
from fd_ref.optim.lars import Lars


def _hand_lars(params, grads_per_step, lr, wd, momentum, trust):
    """numpy float64: the update written out, one parameter at a time."""
    params = [p.copy() for p in params]
    mus = [np.zeros_like(p) for p in params]
    for grads in grads_per_step:
        for i, (p, g) in enumerate(zip(params, grads)):
            if p.ndim > 1:
                d = g + wd * p
                pn, dn = np.sqrt((p ** 2).sum()), np.sqrt((d ** 2).sum())
                q = trust * pn / dn if pn > 0 and dn > 0 else 1.0
                d = q * d
            else:
                d = g
            mus[i] = momentum * mus[i] + d
            params[i] = p - lr * mus[i]
    return params


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), lr=st.floats(1e-3, 2.0), wd=st.floats(0.0, 0.5),
       momentum=st.floats(0.0, 0.99), trust=st.floats(1e-4, 1.0), steps=st.integers(1, 4),
       zero_weight=st.booleans(), grad_scale=st.sampled_from([1e-3, 0.1, 1.0, 10.0]), zero_grad=st.booleans())
def test_lars_matches_the_hand_formula(seed, lr, wd, momentum, trust, steps, zero_weight, grad_scale, zero_grad):
    """Gradients of every size (update norms below and above 1); a zero matrix, and a matrix whose gradient is
    zero (with no weight decay its update norm is 0: the plain q = 1 step, no division by zero)."""
    rng = np.random.default_rng(seed)
    init = [rng.normal(size=(3, 4)), rng.normal(size=(4,)), rng.normal(size=(2, 2, 2))]
    if zero_weight:  # a zero matrix takes the plain (q = 1) update
        init[0] = np.zeros((3, 4))
    grads = [[grad_scale * rng.normal(size=p.shape) for p in init] for _ in range(steps)]
    if zero_grad:
        wd = 0.0
        for step in grads:
            step[2] = np.zeros((2, 2, 2))
    params = [torch.nn.Parameter(torch.tensor(p)) for p in init]
    opt = Lars(params, lr=lr, weight_decay=wd, momentum=momentum, trust_coefficient=trust)
    for step in grads:
        for p, g in zip(params, step):
            p.grad = torch.tensor(g)
        opt.step()
    expected = _hand_lars(init, grads, lr, wd, momentum, trust)
    for p, e in zip(params, expected):
        np.testing.assert_allclose(p.detach().numpy(), e, rtol=1e-10, atol=1e-12)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), lr=st.floats(1e-3, 1.0), momentum=st.floats(0.0, 0.95),
       steps=st.integers(1, 4))
def test_lars_without_weight_decay_equals_timm(seed, lr, momentum, steps):
    """Without weight decay both variants scale a matrix's step by trust * ||p|| / ||g|| and leave 1-D
    parameters alone; timm needs always_adapt for the matrix and eps 0 to be exactly that."""
    from timm.optim import Lars as TimmLars

    g = torch.Generator().manual_seed(seed)
    w, b = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    ours = [torch.nn.Parameter(w.clone()), torch.nn.Parameter(b.clone())]
    theirs = [torch.nn.Parameter(w.clone()), torch.nn.Parameter(b.clone())]
    opt = Lars(ours, lr=lr, weight_decay=0.0, momentum=momentum)
    ref = TimmLars([{"params": [theirs[0]], "always_adapt": True}, {"params": [theirs[1]]}], lr=lr,
                   momentum=momentum, weight_decay=0.0, trust_coeff=0.001, eps=0.0, foreach=False)
    for _ in range(steps):
        grads = [torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)]
        for params in (ours, theirs):
            for p, gr in zip(params, grads):
                p.grad = gr.clone()
        opt.step()
        ref.step()
    for a, b_ in zip(ours, theirs):
        torch.testing.assert_close(a.detach(), b_.detach(), rtol=1e-12, atol=1e-14)


def test_lars_defaults_are_the_published_ones():
    opt = Lars([torch.nn.Parameter(torch.zeros(2, 2))], lr=0.1)
    (group,) = opt.param_groups
    assert (group["momentum"], group["trust_coefficient"], group["weight_decay"]) == (0.9, 0.001, 0.0)
    assert Lars([torch.nn.Parameter(torch.zeros(2))]).param_groups[0]["lr"] == 0.0  # the schedule sets it
    with pytest.raises(UserError) as error:
        Lars([torch.nn.Parameter(torch.zeros(2))], lr=-1.0)
    assert str(error.value) == ("LARS needs lr >= 0, weight_decay >= 0, momentum in [0, 1) and trust_coefficient > 0; "
                                "got -1.0, 0.0, 0.9, 0.001")


@pytest.mark.parametrize("bad", [{"lr": -1e-9}, {"weight_decay": -1e-9}, {"momentum": -0.1}, {"momentum": 1.0},
                                 {"momentum": 1.5}, {"trust_coefficient": 0.0}])
def test_lars_refuses_each_setting_outside_its_range(bad):
    with pytest.raises(UserError):
        Lars([torch.nn.Parameter(torch.zeros(2))], **{"lr": 0.1, **bad})


def test_lars_accepts_the_edges_of_each_range():
    """lr 0 (the warm-up's first step), no weight decay, no momentum: all valid."""
    Lars([torch.nn.Parameter(torch.zeros(2))], lr=0.0, weight_decay=0.0, momentum=0.0, trust_coefficient=1e-9)


def test_lars_skips_parameters_without_a_gradient_and_returns_the_closure_s_loss():
    """A parameter without a gradient is left alone and the ones after it still step; ``step(closure)``
    evaluates the closure with gradients enabled and returns its loss, ``step()`` returns None."""
    first, second = torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(3))
    opt = Lars([first, second], lr=0.5, momentum=0.0)
    second.grad = torch.ones(3)
    assert opt.step() is None
    assert torch.equal(first.detach(), torch.ones(2, 2)) and torch.equal(second.detach(), torch.full((3,), 0.5))

    def closure():
        opt.zero_grad()
        loss = (second ** 2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert float(loss.detach()) == pytest.approx(0.75)  # 3 x 0.5^2, before this step's update
