"""Spec tests of the frozen teachers: local timm / fd_ref weights, re-normalisation, frozen eval mode and the
readable errors (unknown name, offline without weights, wrong image size)."""
from __future__ import annotations

import socket

import pytest
import timm
import torch
import torch.nn as nn
from safetensors.torch import save_file

import fd_ref.models.teachers as teachers
from fd_ref.errors import UserError
from fd_ref.models.teachers import IMAGENET_MEAN, IMAGENET_STD, Teacher, build_teacher
from fd_ref.models.vit import VisionTransformer

TIMM_TAG = "vit_tiny_patch16_224"


@pytest.fixture(scope="module")
def timm_model():
    torch.manual_seed(0)
    model = timm.create_model(TIMM_TAG, pretrained=False, num_classes=0, img_size=32).eval()
    with torch.no_grad():  # make the norms and biases non-trivial too
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails at once (and is recorded)."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", lambda self, *a: refuse(*a))
    return attempts


def _renormalised(x):
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x * std + mean - 0.5) / 0.5


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_timm_teacher_from_local_checkpoint_matches_timm(tmp_path, timm_model, fmt, no_network):
    state = {k: v.contiguous() for k, v in timm_model.state_dict().items()}
    path = tmp_path / f"teacher.{fmt}"
    if fmt == "pth":
        torch.save({"model": state}, path)
    else:
        save_file(state, str(path))
    teacher = build_teacher(f"timm:{TIMM_TAG}", img_size=32, checkpoint=str(path))
    assert teacher.embed_dim == 192 and teacher.grid == (2, 2) and teacher.num_prefix_tokens == 1
    assert teacher.renormalise  # this tag was trained with mean = std = 0.5
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = timm_model.forward_features(_renormalised(x))
        got = teacher(x)
    assert got.shape == (2, 1 + 4, 192)
    assert (got - expected).abs().max().item() <= 1e-5
    # without re-normalisation the tokens would differ: the test can see a wrong normalisation
    with torch.no_grad():
        assert (timm_model.forward_features(x) - got).abs().max() > 1e-3
    assert no_network == []


def test_teacher_is_frozen_and_stays_in_eval(tmp_path):
    torch.manual_seed(0)
    net = VisionTransformer(img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2, drop_path_rate=0.5)
    teacher = Teacher(net, 16, net.grid, 1)
    parent = nn.Sequential(teacher)
    parent.train()
    teacher.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())
    assert sum(p.numel() for p in teacher.parameters() if p.requires_grad) == 0
    x = torch.randn(4, 3, 16, 16)
    assert torch.equal(teacher(x), teacher(x))  # no drop path despite rate 0.5
    assert not teacher.renormalise  # ImageNet statistics: input passed as is
    with torch.no_grad():
        assert torch.equal(teacher(x), net.forward_features(x))


def test_unknown_teacher_names(monkeypatch, no_network, tmp_path):
    import huggingface_hub.constants as hf_constants
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="unknown teacher"):
        build_teacher("resnet_teacher_that_does_not_exist", img_size=32)
    dummy = tmp_path / "w.pth"
    torch.save({"x": torch.zeros(1)}, dummy)
    with pytest.raises(UserError, match="unknown teacher"):
        build_teacher("timm:no_such_model_xyz", img_size=32, checkpoint=str(dummy))
    with pytest.raises(UserError):
        build_teacher(f"timm:{TIMM_TAG}", img_size=32, checkpoint=str(tmp_path / "missing.pth"))


def test_paper_teacher_offline_without_checkpoint_fails_fast(monkeypatch, no_network):
    import huggingface_hub.constants as hf_constants
    import timm.models.vision_transformer as tvit

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)  # as huggingface_hub reads it at import
    # Skip timm's weight init of the 86M-parameter ViT-B: irrelevant here and slow on a shared CPU.
    monkeypatch.setattr(tvit.VisionTransformer, "init_weights", lambda self, *a, **k: None)
    with pytest.raises(UserError, match="offline mode.*--teacher-checkpoint"):
        build_teacher("dino_vit_base", img_size=32)
    assert no_network == []  # not even an attempt to connect


def test_timm_teacher_checkpoint_of_another_model_is_refused(tmp_path, no_network):
    small = VisionTransformer(img_size=32, patch_size=16, embed_dim=48, depth=1, num_heads=3)
    path = tmp_path / "other.pth"
    torch.save({"patch_embed.proj.weight": small.patch_embed.proj.weight.detach()}, path)
    with pytest.raises(UserError):
        build_teacher(f"timm:{TIMM_TAG}", img_size=32, checkpoint=str(path))


def _fd_config():
    return dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, pos_embed="rpb",
                global_pool="cls")


def test_fd_ref_preset_teacher_with_config_loads_exactly(tmp_path):
    torch.manual_seed(3)
    config = _fd_config()
    net = VisionTransformer(**config).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path / "student.pth"
    torch.save({"model": net.state_dict(), "model_config": config, "epoch": 3}, path)
    teacher = build_teacher("vit_tiny", img_size=32, checkpoint=str(path))
    assert teacher.embed_dim == 48 and teacher.grid == (4, 4)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(teacher(x), net.forward_features(x), atol=1e-6)


def test_fd_ref_avg_pool_teacher_applies_fc_norm_per_token(tmp_path):
    torch.manual_seed(4)
    config = dict(_fd_config(), global_pool="avg", num_classes=10)
    net = VisionTransformer(**config).eval()
    with torch.no_grad():
        net.fc_norm.weight.normal_()
        net.fc_norm.bias.normal_()
    path = tmp_path / "finetuned.pth"
    torch.save({"model": net.state_dict(), "model_config": config}, path)
    teacher = build_teacher("vit_small", img_size=32, checkpoint=str(path))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = net.fc_norm(net.forward_features(x))
        assert torch.allclose(teacher(x), expected, atol=1e-6)


def test_fd_ref_teacher_wrong_img_size(tmp_path):
    config = _fd_config()
    path = tmp_path / "student.pth"
    torch.save({"model": VisionTransformer(**config).state_dict(), "model_config": config}, path)
    with pytest.raises(UserError, match="--img-size"):
        build_teacher("vit_tiny", img_size=64, checkpoint=str(path))


def test_fd_ref_teacher_checkpoint_of_other_shape(tmp_path):
    config = _fd_config()
    path = tmp_path / "plain_state.pth"
    torch.save(VisionTransformer(**config).state_dict(), path)  # no config: vit_tiny preset is built
    with pytest.raises(UserError):
        build_teacher("vit_tiny", img_size=32, checkpoint=str(path))


# -- precision (issue #23): bf16 matrix products, float32 norms and features -------------------------------
def _small_timm_teacher(seed=0) -> Teacher:
    torch.manual_seed(seed)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, img_size=64, depth=3)
    return Teacher(model, model.num_features, tuple(model.patch_embed.grid_size), model.num_prefix_tokens)


def _small_fd_ref_teacher(seed=0) -> Teacher:
    torch.manual_seed(seed)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=2, num_classes=0)
    return Teacher(model, model.embed_dim, model.grid, model.num_prefix_tokens)


def _hand_layer_norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) * weight + bias over the last dimension, in float64."""
    x = x.double()
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight.double() + norm.bias.double()


@pytest.mark.parametrize("build", [_small_timm_teacher, _small_fd_ref_teacher], ids=["timm_vit", "fd_ref_vit"])
def test_bf16_teacher_keeps_norms_and_features_in_float32(build):
    """``Teacher.set_precision(torch.bfloat16)`` (train.py's bf16 teacher): Linear / Conv weights in bf16, every
    other parameter in float32; the final norm computes in float32 (its output equals the hand-written norm
    of its own input to float32 precision, where a bf16 result would be off by bf16's rounding, ~4e-3), the
    returned tokens are float32, and the whitened target is closer to the float32 teacher's than with the
    whole teacher cast to bf16 (fd-ref before). ``set_precision(None)`` runs in float32 throughout."""
    from fd_ref.models.teachers import MATRIX_LAYERS
    from fd_ref.method.whitening import whiten

    size = 64 if build is _small_timm_teacher else 32
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(1))
    fp32 = build()
    with torch.no_grad():
        ref = whiten(fp32(x))
    teacher = build().set_precision(torch.bfloat16)
    for module in teacher.model.modules():
        for p in module.parameters(recurse=False):
            assert p.dtype == (torch.bfloat16 if isinstance(module, MATRIX_LAYERS) else torch.float32)
    seen = {}
    teacher.model.norm.register_forward_hook(lambda m, args, out: seen.update(x=args[0], out=out))
    with torch.no_grad():
        tokens = teacher(x)
    assert tokens.dtype == torch.float32 and seen["out"].dtype == torch.float32
    torch.testing.assert_close(tokens.double(), _hand_layer_norm(seen["x"], teacher.model.norm), rtol=0, atol=2e-5)
    err_now = ((whiten(tokens) - ref).norm(dim=-1) / ref.norm(dim=-1)).mean()

    whole = build()
    whole.model.to(torch.bfloat16)  # fd-ref before: every parameter and the input in bf16
    with torch.no_grad():
        before = whiten(whole.model.forward_features(x.to(torch.bfloat16)))
    err_before = ((before - ref).norm(dim=-1) / ref.norm(dim=-1)).mean()
    assert 0 < err_now < err_before

    with torch.no_grad():  # None: the float32 teacher, untouched
        assert torch.equal(whiten(build().set_precision(None)(x)), ref)
        teacher.set_precision(None)  # back to float32 throughout (the weights keep their bf16 rounding)
        assert all(p.dtype == torch.float32 for p in teacher.parameters()) and not teacher._norm_hooks
        assert torch.equal(teacher(x), teacher.model.forward_features(x))


def test_train_runs_the_teacher_with_bf16_matrices(tmp_path, monkeypatch):
    """A bf16 train.py run sets the teacher's precision (not a cast of the whole teacher)."""
    import train

    calls = []
    original = Teacher.set_precision
    monkeypatch.setattr(Teacher, "set_precision", lambda self, dtype: calls.append(dtype) or original(self, dtype))
    train.main(["--precision", "bf16", "--max-steps", "1", "--synthetic-size", "8", "--batch-size", "4",
                "--img-size", "32", "--epochs", "1", "--num-workers", "0", "--progress", "false",
                "--output", str(tmp_path / "run")])
    assert calls == [torch.bfloat16]


class _LinearThenNorm(nn.Module):
    """Patches -> Linear -> ``norm``: under autocast the norm receives the Linear's bf16 output."""

    def __init__(self, norm: nn.Module, width: int = 64) -> None:
        super().__init__()
        self.proj, self.norm = nn.Linear(3 * 8 * 8, width), norm

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        patches = x.unfold(2, 8, 8).unfold(3, 8, 8).permute(0, 2, 3, 1, 4, 5).flatten(3).flatten(1, 2)
        return self.norm(self.proj(patches))


@pytest.mark.parametrize("norm", [nn.RMSNorm, timm.layers.RmsNorm], ids=["torch", "timm"])
def test_bf16_teacher_keeps_rms_norms_in_float32(norm):
    """``set_precision`` keeps every norm in float32, RMS norms included (torch's ``RMSNorm`` and timm's
    ``RmsNorm`` are not LayerNorm subclasses): fed a bf16 Linear output, the final norm computes in float32
    (its output equals the hand-written RMS norm of its input in float64 to float32 precision, where a bf16
    norm would be off by bf16's rounding, ~4e-3) and keeps float32 weights."""
    torch.manual_seed(0)
    model = _LinearThenNorm(norm(64, eps=1e-6))
    nn.init.normal_(model.norm.weight, 1.0, 0.5)
    teacher = Teacher(model, 64, (4, 4), 0).set_precision(torch.bfloat16)
    assert model.norm.weight.dtype == torch.float32 and model.proj.weight.dtype == torch.bfloat16
    seen = {}
    model.norm.register_forward_hook(lambda m, args, out: seen.update(x=args[0], out=out))
    with torch.no_grad():
        tokens = teacher(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    x = seen["x"].double()
    hand = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * model.norm.weight.double()
    assert tokens.shape == (2, 16, 64) and seen["out"].dtype == torch.float32
    torch.testing.assert_close(seen["out"].double(), hand, rtol=0, atol=2e-5)
