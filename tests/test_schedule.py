"""Tests for fd_ref.optim.schedule: warm-up + cosine lr, the scheduler object and its resume, lr scaling."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fd_ref.errors import UserError
from fd_ref.optim.schedule import WarmupCosine, lr_at, scale_lr, scale_lrs


@st.composite
def hparams(draw: st.DrawFn) -> dict:
    total = draw(st.integers(1, 300))
    warmup = draw(st.integers(0, total))
    base = draw(st.floats(1e-6, 1.0))
    min_lr = draw(st.floats(0.0, 1.0)) * base
    warmup_lr = draw(st.floats(0.0, 1.0)) * base
    return {"base_lr": base, "total_steps": total, "warmup_steps": warmup, "min_lr": min_lr,
            "warmup_lr": warmup_lr}


def _curve(h: dict, extra: int = 5) -> list[float]:
    return [lr_at(s, **h) for s in range(h["total_steps"] + extra)]


@settings(max_examples=200, deadline=None)
@given(h=hparams())
def test_schedule_invariants(h: dict) -> None:
    lrs = _curve(h)
    total, warmup = h["total_steps"], h["warmup_steps"]
    tol = 1e-12 * h["base_lr"]
    if warmup > 0:
        assert lrs[0] == pytest.approx(h["warmup_lr"], abs=tol)
        # Linear warm-up: equal increments.
        steps = [b - a for a, b in zip(lrs[:warmup], lrs[1:warmup + 1])] if warmup < total else []
        for d in steps:
            assert d == pytest.approx((h["base_lr"] - h["warmup_lr"]) / warmup, abs=tol)
    if warmup < total:
        assert lrs[warmup] == pytest.approx(h["base_lr"], abs=tol)
        after = lrs[warmup:]
        assert all(b <= a + tol for a, b in zip(after, after[1:]))  # non-increasing
    assert lrs[total] == h["min_lr"]
    assert all(lr == h["min_lr"] for lr in lrs[total:])  # clamped after the end
    assert all(lr >= h["min_lr"] for lr in lrs[warmup:])
    assert all(lr >= 0.0 for lr in lrs)


def test_known_values() -> None:
    h = {"base_lr": 1.0, "total_steps": 110, "warmup_steps": 10, "min_lr": 0.0, "warmup_lr": 0.0}
    assert lr_at(5, **h) == pytest.approx(0.5)
    assert lr_at(60, **h) == pytest.approx(0.5)  # half-way through the cosine
    assert lr_at(35, **h) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_bad_hparams() -> None:
    """Each check names the setting, the value it got and what to change (the whole message is pinned)."""
    good = {"base_lr": 1.0, "total_steps": 10, "warmup_steps": 2, "min_lr": 0.0}
    for bad, message in (
            ({"total_steps": 0}, "total_steps must be >= 1, got 0; check epochs and the data size"),
            ({"warmup_steps": 11}, "warmup_steps must be in [0, total_steps=10], got 11; "
                                   "use fewer warm-up epochs than epochs"),
            ({"min_lr": 2.0}, "need 0 <= min_lr <= base_lr, got min_lr=2.0, base_lr=1.0; fix the lr settings"),
            ({"warmup_lr": -1.0}, "warmup_lr must be >= 0, got -1.0; fix the lr settings")):
        with pytest.raises(UserError) as error:
            lr_at(0, **{**good, **bad})
        assert str(error.value) == message
    with pytest.raises(ValueError, match=r"^step must be >= 0, got -1$"):
        lr_at(-1, **good)


def test_warm_up_starts_at_zero_by_default() -> None:
    """Without ``warmup_lr`` the warm-up ramps from 0: lr_at(0) == 0 and lr_at(w / 2) == base_lr / 2."""
    h = {"base_lr": 1.0, "total_steps": 110, "warmup_steps": 10, "min_lr": 0.1}
    assert lr_at(0, **h) == 0.0
    assert lr_at(5, **h) == pytest.approx(0.5)


def _published_group_lr(step: int, h: dict, scale: float) -> float:
    """Hand formula of the published schedule for one group (timm 0.4.12 CosineLRScheduler with
    warmup_prefix=True, t_in_epochs=False, cycle_limit=1, over a group whose initial lr is base_lr * scale)."""
    peak, total, warm = h["base_lr"] * scale, h["total_steps"], h["warmup_steps"]
    if step >= total:
        return h["min_lr"]
    if step < warm:
        return h["warmup_lr"] + step * (peak - h["warmup_lr"]) / warm
    t = (step - warm) / (total - warm)
    return h["min_lr"] + 0.5 * (peak - h["min_lr"]) * (1 + math.cos(math.pi * t))


@settings(max_examples=50, deadline=None)
@given(h=hparams(), scale=st.floats(0.001, 1.0), whole=st.booleans())
def test_group_schedule_published_and_whole_curve(h: dict, scale: float, whole: bool) -> None:
    """Published: lr_g = curve(peak = base * s, start = warmup_lr, floor = min_lr). scale_whole_curve: s * lr."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [p], "lr_scale": scale}], lr=1.0)
    sched = WarmupCosine(opt, **h, scale_whole_curve=whole)
    for step in range(h["total_steps"] + 2):
        expected = scale * lr_at(step, **h) if whole else _published_group_lr(step, h, scale)
        assert opt.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-9, abs=1e-15)
        if step == h["warmup_steps"] < h["total_steps"]:  # the peak is reached either way
            assert opt.param_groups[0]["lr"] == pytest.approx(h["base_lr"] * scale, rel=1e-9)
        sched.step()


def test_scale_lrs_scales_all_three() -> None:
    """Published main_fd.py: base, warm-up and min lr all scale by total batch / 512 (accumulation included)."""
    # published FD recipe at the published batch (16 GPUs x 128) and on one GPU with 16 accumulation steps
    for total in (16 * 128, 1 * 128 * 16):
        lrs = scale_lrs(3e-4, 5e-7, 5e-6, total)
        assert lrs == pytest.approx({"base_lr": 1.2e-3, "warmup_lr": 2e-6, "min_lr": 2e-5})
    lrs = scale_lrs(1.25e-3, 2.5e-7, 2.5e-7, 256)  # fine-tuning recipe at batch 256
    assert lrs == pytest.approx({"base_lr": 6.25e-4, "warmup_lr": 1.25e-7, "min_lr": 1.25e-7})


def _optimizer() -> torch.optim.Optimizer:
    params = [torch.nn.Parameter(torch.zeros(2)) for _ in range(3)]
    return torch.optim.AdamW([{"params": [params[0]], "lr_scale": 0.25},
                              {"params": [params[1]], "lr_scale": 1.0},
                              {"params": [params[2]]}], lr=1.0)


@settings(max_examples=50, deadline=None)
@given(h=hparams(), cut=st.integers(0, 400))
def test_scheduler_sets_scaled_lr_and_resumes(h: dict, cut: int) -> None:
    n = h["total_steps"] + 3
    cut = cut % n
    opt = _optimizer()
    sched = WarmupCosine(opt, **h)
    seen = [[g["lr"] for g in opt.param_groups]]
    assert sched.last_lr == lr_at(0, **h)
    state = None
    for step in range(1, n):
        assert sched.step() == lr_at(step, **h) == sched.last_lr
        # published: only the peak of the lr_scale 0.25 group is scaled; warm-up start and floor are shared
        assert opt.param_groups[0]["lr"] == pytest.approx(_published_group_lr(step, h, 0.25), rel=1e-9, abs=1e-15)
        assert [g["lr"] for g in opt.param_groups][1:] == [sched.last_lr, sched.last_lr]
        seen.append([g["lr"] for g in opt.param_groups])
        if step == cut:
            state = sched.state_dict()
    if state is None:
        state = WarmupCosine(_optimizer(), **h).state_dict()  # cut == 0: resume from the start
    # Resume with a fresh optimizer and scheduler built with other hyper-parameters: the state wins.
    opt2 = _optimizer()
    other = {"base_lr": 9.0, "total_steps": 7, "warmup_steps": 1, "min_lr": 0.0}
    resumed = WarmupCosine(opt2, **other)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state
    assert [g["lr"] for g in opt2.param_groups] == seen[cut]
    for step in range(cut + 1, n):
        resumed.step()
        assert [g["lr"] for g in opt2.param_groups] == seen[step]


def test_scale_lr() -> None:
    assert scale_lr(1.2e-3, 2048) == pytest.approx(4.8e-3)
    assert scale_lr(1e-3, 512) == 1e-3
    assert scale_lr(1e-3, 1) == pytest.approx(1e-3 / 512)  # one image per step is a valid total batch
    with pytest.raises(UserError) as error:
        scale_lr(1e-3, 0)
    assert str(error.value) == "total batch size must be >= 1, got 0; check batch size and GPU count"


def test_scheduler_warm_up_starts_at_zero_by_default() -> None:
    opt = _optimizer()
    WarmupCosine(opt, base_lr=1.0, total_steps=10, warmup_steps=4, min_lr=0.1)
    assert [g["lr"] for g in opt.param_groups] == [0.0, 0.0, 0.0]


def test_a_scheduler_state_without_scale_whole_curve_resumes_scaling_the_whole_curve() -> None:
    """Checkpoints written before the published per-group curve existed scaled each group's whole curve: a
    state without the key resumes that way (lr_scale 0.25 -> 0.25 x the head's lr), a newer state as saved."""
    h = {"base_lr": 1.0, "total_steps": 10, "warmup_steps": 2, "min_lr": 0.1, "warmup_lr": 0.05}
    state = WarmupCosine(_optimizer(), **h).state_dict()
    state["step_count"] = 1
    old = {k: v for k, v in state.items() if k != "scale_whole_curve"}
    for saved, whole in ((old, True), (state, False)):
        opt = _optimizer()
        resumed = WarmupCosine(opt, **h)
        resumed.load_state_dict(saved)
        assert resumed.scale_whole_curve is whole
        expected = 0.25 * lr_at(1, **h) if whole else _published_group_lr(1, h, 0.25)
        assert opt.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12)
