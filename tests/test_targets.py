"""The paper's ablation settings of the FD objective, each checked by hand on tiny models:

- ``target``: full feature map (default) | class token | average-pooled patch feature (fd_ref.method.distill);
- ``feat_after_norm``: the teacher's tokens after (published PRED_FEAT_AFTERNORM: True) or before its final
  norm (fd_ref.models.teachers), for timm and fd_ref teachers;
- the train.py settings and the published configs that select them.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

import train
from fd_ref.config import resolve_config
from fd_ref.method.distill import FeatureDistillation
from fd_ref.errors import UserError
from fd_ref.models.teachers import Teacher, build_teacher
from fd_ref.models.vit import VisionTransformer

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _vit(seed: int, dim: int, heads: int, patch: int = 8, global_pool: str = "cls") -> VisionTransformer:
    torch.manual_seed(seed)
    net = VisionTransformer(img_size=32, patch_size=patch, embed_dim=dim, depth=2, num_heads=heads,
                            global_pool=global_pool)
    with torch.no_grad():  # non-trivial norms, biases, tables
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return net.eval()


def _hand_whiten(t: torch.Tensor) -> torch.Tensor:
    mean = t.mean(-1, keepdim=True)
    var = ((t - mean) ** 2).mean(-1, keepdim=True)
    return (t - mean) / torch.sqrt(var + 1e-5)


def _hand_smooth_l1(pred, target, beta=2.0):
    d = (pred - target).abs()
    return torch.where(d <= beta, 0.5 * d ** 2 / beta, d - 0.5 * beta).mean()


def _hand_projection(fd: FeatureDistillation, s: torch.Tensor) -> torch.Tensor:
    return torch.einsum("bnc,oc->bno", s, fd.projection.proj.weight[:, :, 0]) + fd.projection.proj.bias


def _fd(target: str, teacher_patch: int = 8, target_norm: str = "whiten") -> FeatureDistillation:
    teacher_net = _vit(1, 48, 3, patch=teacher_patch)
    fd = FeatureDistillation(_vit(0, 32, 2), Teacher(teacher_net, 48, teacher_net.grid, 1), target=target,
                             target_norm=target_norm)
    return fd.eval()


@pytest.mark.parametrize("teacher_patch", [8, 4])
def test_cls_target_is_the_whitened_teacher_class_token(teacher_patch):
    fd = _fd("cls", teacher_patch)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        t = fd.teacher.model.forward_features(x)
        s = fd.student.forward_features(x)
        target = _hand_whiten(t[:, :1])
        expected = _hand_smooth_l1(_hand_projection(fd, s[:, :1]), target)
        assert fd.targets(x).shape == (3, 1, 48)
        assert torch.allclose(fd.targets(x), target, atol=1e-5)
        assert torch.allclose(fd(x), expected, atol=1e-6)
        # ... and it is another loss than the full map's
        assert not torch.allclose(_fd("full", teacher_patch)(x), fd(x), atol=1e-4)


@pytest.mark.parametrize("teacher_patch", [8, 4])
def test_avg_target_is_the_whitened_mean_patch_token(teacher_patch):
    fd = _fd("avg", teacher_patch)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        t = fd.teacher.model.forward_features(x)  # the teacher's own grid, class token first
        s = fd.student.forward_features(x)
        target = _hand_whiten(t[:, 1:].mean(1, keepdim=True))
        expected = _hand_smooth_l1(_hand_projection(fd, s[:, 1:].mean(1, keepdim=True)), target)
        assert fd.targets(x).shape == (3, 1, 48)
        assert torch.allclose(fd.targets(x), target, atol=1e-5)
        assert torch.allclose(fd(x), expected, atol=1e-6)
        # the pooled feature leaves the class token out: it is not the mean over all tokens
        assert not torch.allclose(fd.student_tokens(x), s.mean(1, keepdim=True), atol=1e-5)


def test_raw_targets_for_each_target():
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        t = _fd("full").teacher.model.forward_features(x)
        assert torch.allclose(_fd("cls", target_norm="none").targets(x), t[:, :1])
        assert torch.allclose(_fd("avg", target_norm="none").targets(x), t[:, 1:].mean(1, keepdim=True))
        assert torch.allclose(_fd("full", target_norm="none").targets(x), t)


@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 3), n=st.integers(1, 6), c_s=st.integers(2, 12), c_t=st.integers(2, 12),
       seed=st.integers(0, 2**16))
def test_projecting_the_mean_equals_averaging_the_projection(b, n, c_s, c_t, seed):
    """The avg target's student side: g(mean_n s_n) = mean_n g(s_n), since g is affine."""
    from fd_ref.method.projection import Projection
    torch.manual_seed(seed)
    g, s = Projection(c_s, c_t), torch.randn(b, n, c_s, dtype=torch.float64)
    g = g.double()
    with torch.no_grad():
        assert torch.allclose(g(s.mean(1, keepdim=True)), g(s).mean(1, keepdim=True), atol=1e-12)


def test_unknown_target_is_refused():
    with pytest.raises(ValueError, match="full, cls, avg"):
        _fd("pooled")


# -- teacher features before / after its final norm ------------------------------------------------------------
def _hand_blocks_timm(m, x):
    """timm ViT by hand up to (not including) its final norm."""
    x = m.patch_embed(x)
    x = torch.cat([m.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + m.pos_embed
    x = m.norm_pre(x)
    for block in m.blocks:
        x = block(x)
    return x


@pytest.mark.parametrize("tag", ["vit_tiny_patch16_224", "vit_base_patch16_clip_quickgelu_224"])
def test_timm_teacher_before_norm_is_the_blocks_output(tmp_path, tag):
    torch.manual_seed(0)
    kw = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    model = timm.create_model(tag, pretrained=False, num_classes=0, **kw).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path / "t.pth"
    torch.save(model.state_dict(), path)
    small = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2)
    before = build_teacher(f"timm:{tag}", img_size=32, checkpoint=str(path), timm_kwargs=small, feat_after_norm=False)
    after = build_teacher(f"timm:{tag}", img_size=32, checkpoint=str(path), timm_kwargs=small)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        x_t = x * before.scale + before.shift if before.renormalise else x
        blocks_out = _hand_blocks_timm(model, x_t)
        assert (before(x) - blocks_out).abs().max().item() <= 1e-5
        assert (after(x) - model.norm(blocks_out)).abs().max().item() <= 1e-5
        assert (before(x) - after(x)).abs().max().item() > 0.1


@pytest.mark.parametrize("global_pool", ["cls", "avg"])
def test_fd_ref_teacher_before_norm(global_pool):
    net = _vit(3, 32, 2, global_pool=global_pool)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = net._tokens(x)
        bias = net.rel_pos_bias()
        for block in net.blocks:
            tokens, _ = block(tokens, bias)
        final = net.norm if global_pool == "cls" else net.fc_norm
        after = Teacher(net, 32, net.grid, 1)(x)
        assert (after - final(tokens)).abs().max().item() <= 1e-5
        before = Teacher(net, 32, net.grid, 1, feat_after_norm=False)(x)
        assert (before - tokens).abs().max().item() <= 1e-5
        assert (before - after).abs().max().item() > 0.1


def test_teacher_without_a_final_norm_is_refused():
    class NoNorm(torch.nn.Module):
        def forward_features(self, x):
            return x

    with pytest.raises(UserError, match="no final norm"):
        Teacher(NoNorm(), 3, (1, 1), 1, name="odd", feat_after_norm=False)


# -- settings -----------------------------------------------------------------------------------------------
def test_train_settings_and_published_configs():
    assert train.DEFAULTS["target"] == "full" and train.DEFAULTS["teacher_feat_after_norm"] is True
    cfg = resolve_config(train.DEFAULTS, ["--target", "avg", "--no-teacher-feat-after-norm"])
    assert cfg["target"] == "avg" and cfg["teacher_feat_after_norm"] is False
    fd_configs = sorted(CONFIGS.glob("fd_*.yaml"))
    assert len(fd_configs) == 6  # the five ViT runs and EsViT Swin-B -> SwinV2-B
    for path in fd_configs:  # every published pre-training config: PRED_FEAT_AFTERNORM: True, full map
        raw = yaml.safe_load(path.read_text())
        assert raw["target"] == "full" and raw["teacher_feat_after_norm"] is True, path.name


def test_train_runs_with_an_ablation_target(tmp_path):
    out = tmp_path / "out"
    train.main(["--img-size", "32", "--patch-size", "8", "--depth", "1", "--embed-dim", "32", "--num-heads", "2",
                "--teacher-patch-size", "8", "--teacher-depth", "1", "--synthetic-size", "16", "--num-workers", "0",
                "--progress", "false", "--warmup-epochs", "0", "--batch-size", "8", "--max-steps", "1",
                "--target", "cls", "--no-teacher-feat-after-norm", "--output", str(out)])
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["target"] == "cls" and resolved["teacher_feat_after_norm"] is False
    assert (out / "student.pt").exists()
