"""Spec tests of the FD objective: frozen eval-mode teacher, drop path in the student only, the loss
written out by hand, token-grid matching, raw targets, and a tiny end-to-end run that learns."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from fd_ref.method.distill import FeatureDistillation, match_token_grid
from fd_ref.method.masking import PatchMasking
from fd_ref.models.teachers import Teacher, build_teacher
from fd_ref.models.vit import VisionTransformer


def _student(seed=0, patch=8, drop_path_rate=0.0, dim=32):
    torch.manual_seed(seed)
    return VisionTransformer(img_size=32, patch_size=patch, embed_dim=dim, depth=2, num_heads=2,
                             drop_path_rate=drop_path_rate)


def _teacher(seed=1, patch=8, dim=48):
    torch.manual_seed(seed)
    net = VisionTransformer(img_size=32, patch_size=patch, embed_dim=dim, depth=2, num_heads=3,
                            drop_path_rate=0.5)  # would be random if the teacher ever trained
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return Teacher(net, dim, net.grid, 1)


def _hand_whiten(t):
    mean = t.mean(-1, keepdim=True)
    var = ((t - mean) ** 2).mean(-1, keepdim=True)
    return (t - mean) / torch.sqrt(var + 1e-5)


def _hand_smooth_l1(pred, target, beta):
    d = (pred - target).abs()
    return torch.where(d <= beta, 0.5 * d ** 2 / beta, d - 0.5 * beta).mean()


def _hand_projection(fd, s):
    return torch.einsum("bnc,oc->bno", s, fd.projection.proj.weight[:, :, 0]) + fd.projection.proj.bias


def test_teacher_frozen_and_deterministic_in_train_mode():
    fd = FeatureDistillation(_student(drop_path_rate=0.5), _teacher())
    fd.train()
    assert fd.student.training and not fd.teacher.training
    x = torch.randn(4, 3, 32, 32)
    t1, t2 = fd.targets(x), fd.targets(x)
    assert torch.equal(t1, t2)
    assert not t1.requires_grad
    # no graph through the teacher even when the images carry one (no_grad, not just frozen weights)
    assert not fd.targets(x.clone().requires_grad_(True)).requires_grad
    # the student's drop path is on: two forward passes differ, while the targets did not
    s1, s2 = fd.student.forward_features(x), fd.student.forward_features(x)
    assert (s1 - s2).abs().max() > 1e-4
    loss = fd(x)
    loss.backward()
    assert all(p.grad is None for p in fd.teacher.parameters())
    assert all(p.grad is not None for p in fd.student.parameters())
    assert fd.projection.proj.weight.grad is not None and fd.projection.proj.weight.grad.abs().sum() > 0
    # the student and projection are what an optimiser sees
    trainable = {n.split(".")[0] for n, p in fd.named_parameters() if p.requires_grad}
    assert trainable == {"student", "projection"}


def test_loss_equals_hand_computation_eval_and_train():
    fd = FeatureDistillation(_student(drop_path_rate=0.3), _teacher(), beta=1.0)
    with torch.no_grad():
        fd.projection.proj.weight.normal_(std=0.5)
        fd.projection.proj.bias.normal_()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        tokens = fd.teacher.model.forward_features(x)
    target = _hand_whiten(tokens)

    fd.eval()
    loss = fd(x)
    pred = _hand_projection(fd, fd.student.forward_features(x))
    assert loss.item() == pytest.approx(_hand_smooth_l1(pred, target, 1.0).item(), rel=1e-5)
    assert loss.item() != pytest.approx(_hand_smooth_l1(pred, target, 2.0).item(), rel=1e-3)  # beta used
    assert loss.item() != pytest.approx(_hand_smooth_l1(pred, tokens, 1.0).item(), rel=1e-3)  # whitened

    fd.train()  # same drop-path masks when the random state is the same: the teacher draws none
    torch.manual_seed(11)
    loss = fd(x)
    torch.manual_seed(11)
    pred = _hand_projection(fd, fd.student.forward_features(x))
    assert loss.item() == pytest.approx(_hand_smooth_l1(pred, target, 1.0).item(), rel=1e-5)


def test_raw_targets_without_whitening():
    fd = FeatureDistillation(_student(), _teacher(), target_norm="none").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = fd.teacher.model.forward_features(x)
    assert torch.equal(fd.targets(x), tokens.float())
    pred = _hand_projection(fd, fd.student.forward_features(x))
    assert fd(x).item() == pytest.approx(_hand_smooth_l1(pred, tokens, 2.0).item(), rel=1e-5)
    whitened = FeatureDistillation(_student(), _teacher(), target_norm="whiten").eval()
    assert torch.allclose(whitened.targets(x), _hand_whiten(tokens), atol=1e-5)


def test_grid_mismatch_teacher_patch8_student_patch4():
    fd = FeatureDistillation(_student(patch=4), _teacher(patch=8))
    assert fd.student.grid == (8, 8) and fd.teacher.grid == (4, 4)
    x = torch.randn(2, 3, 32, 32)
    target = fd.targets(x)
    assert target.shape == (2, 1 + 64, 48)
    with torch.no_grad():
        tokens = fd.teacher.model.forward_features(x)
    assert torch.allclose(target[:, 0], _hand_whiten(tokens[:, 0]), atol=1e-5)  # class token kept
    fd.train()
    loss = fd(x)
    loss.backward()
    assert torch.isfinite(loss) and fd.student.cls_token.grad.abs().sum() > 0


class _FixedTokens(nn.Module):
    """A stand-in network whose features are given tokens."""

    def __init__(self, tokens):
        super().__init__()
        self.tokens = tokens
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward_features(self, x):
        return self.tokens.expand(x.shape[0], -1, -1)


def test_grid_resize_is_bilinear_by_hand():
    # teacher grid 2x2 -> student grid 4x4. Bilinear, half-pixel centres (align_corners=False), so along
    # each axis the weights on (v0, v1) are [1, 0], [3/4, 1/4], [1/4, 3/4], [0, 1].
    c = 5
    gen = torch.Generator().manual_seed(0)
    cls = torch.randn(1, 1, c, generator=gen)
    patches = torch.randn(1, 4, c, generator=gen)
    teacher = Teacher(_FixedTokens(torch.cat([cls, patches], 1)), c, (2, 2), 1)
    fd = FeatureDistillation(_student(patch=8, dim=16), teacher, target_norm="none")
    # student patch 8 on 32 px is a 4x4 grid
    target = fd.targets(torch.zeros(1, 3, 32, 32))
    a = torch.tensor([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]])
    grid = patches[0].view(2, 2, c)
    expected = torch.einsum("yi,xj,ijc->yxc", a, a, grid).reshape(16, c)
    assert torch.allclose(target[0, 0], cls[0, 0])
    assert torch.allclose(target[0, 1:], expected, atol=1e-6)
    # whitening happens after the resize, on the resized tokens
    fd.set_target_norm("whiten")
    assert torch.allclose(fd.targets(torch.zeros(1, 3, 32, 32))[0, 1:], _hand_whiten(expected), atol=1e-5)


def test_teacher_without_class_token_gives_mean_of_patches():
    gen = torch.Generator().manual_seed(1)
    t = torch.randn(2, 9, 4, generator=gen)  # 3x3 patches, no prefix token
    out = match_token_grid(t, (3, 3), 0, (3, 3))
    assert out.shape == (2, 10, 4)
    assert torch.allclose(out[:, 0], t.mean(1))
    assert torch.equal(out[:, 1:], t)
    # two prefix tokens (e.g. a distillation token): the first is the class token, the rest are dropped
    t2 = torch.randn(2, 2 + 4, 4, generator=gen)
    out2 = match_token_grid(t2, (2, 2), 2, (2, 2))
    assert torch.equal(out2, torch.cat([t2[:, :1], t2[:, 2:]], 1))


def test_tiny_end_to_end_loss_goes_down():
    torch.manual_seed(0)
    student = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                drop_path_rate=0.1)
    torch.manual_seed(1)
    teacher = build_teacher("vit_tiny", img_size=32)  # fd_ref preset, random weights
    fd = FeatureDistillation(student, teacher)
    fd.train()
    params = [p for p in fd.parameters() if p.requires_grad]
    assert not any(p is q for p in params for q in teacher.parameters())
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.05)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    losses = []
    for _ in range(30):
        loss = fd(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_before.items())


def test_settings_out_of_range_are_refused_with_their_whole_message():
    student, teacher = _student(), _teacher()
    for kwargs, message in (
            ({"target_norm": "batch"}, "the target normalisation must be one of whiten, none, phi_s, got 'batch'"),
            ({"loss": "l2"}, "the loss must be one of smooth_l1, mse, cosine, got 'l2'"),
            ({"target": "all"}, "the distillation target must be one of full, cls, avg, got 'all'")):
        with pytest.raises(ValueError) as error:
            FeatureDistillation(student, teacher, **kwargs)
        assert str(error.value) == message
    with pytest.raises(ValueError) as error:
        match_token_grid(torch.zeros(1, 5, 2), (2, 2), 1, (2, 2), student_prefix_tokens=2)
    assert str(error.value) == "a student with 2 prefix tokens is not supported (0 or 1)"
    no_class_token = _student()
    no_class_token.num_prefix_tokens = 0
    with pytest.raises(ValueError) as error:
        FeatureDistillation(no_class_token, teacher, target="cls")
    assert str(error.value) == ("the distillation target cls needs a student with a class token; this student "
                                "(a CNN or Swin) has none: distil the full map or the average instead")
    with pytest.raises(ValueError) as error:
        FeatureDistillation(student, teacher, target="avg", masking=PatchMasking(student, 0.5))
    assert str(error.value) == ("masking needs the full feature map as the target (the masked positions' tokens), "
                                "got the target 'avg'")
    # PHI-S for a teacher width without a Hadamard matrix: the teacher named (or called "teacher") with its width
    net = VisionTransformer(img_size=32, patch_size=8, embed_dim=6, depth=1, num_heads=1)
    for name, shown in (("vit6", "vit6"), ("", "teacher")):
        with pytest.raises(ValueError) as error:
            FeatureDistillation(student, Teacher(net, 6, net.grid, 1, name=name), target_norm="phi_s")
        assert str(error.value).startswith(f"{shown} (6 channels): no Hadamard matrix of order 6 can be built")
