"""The CLIP teachers are OpenAI's CLIP image towers (QuickGELU), checked against an independent reference.

The reference below is written from the facts of OpenAI's CLIP ``VisionTransformer`` (as vendored in the
published code, ``models/clip/model.py``): a bias-free patch convolution ``conv1``, a ``class_embedding``
prepended, ``positional_embedding`` added, ``ln_pre``, residual blocks
``x = x + attn(ln_1(x)); x = x + c_proj(QuickGELU(c_fc(ln_2(x))))`` with ``nn.MultiheadAttention``
(``in_proj_weight`` / ``in_proj_bias`` / ``out_proj``), ``ln_post`` and ``proj``; LayerNorm eps 1e-5;
QuickGELU(x) = x * sigmoid(1.702 x). FD distils the tokens after ``ln_post`` and before ``proj``.
Its state dict, saved with OpenAI's key names under ``visual.``, is loaded through ``build_teacher``.
"""
from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn as nn

from fd_ref.models.teachers import IMAGENET_MEAN, IMAGENET_STD, PAPER_TEACHERS, build_teacher

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TINY = dict(img_size=32, patch=8, width=32, layers=2, heads=2, output_dim=24)
TIMM_TINY = dict(patch_size=TINY["patch"], embed_dim=TINY["width"], depth=TINY["layers"], num_heads=TINY["heads"])


class RefQuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class RefBlock(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads)
        self.ln_1 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(d, 4 * d)), ("gelu", RefQuickGELU()),
                                              ("c_proj", nn.Linear(4 * d, d))]))
        self.ln_2 = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [L, N, D], as nn.MultiheadAttention wants
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class RefTransformer(nn.Module):
    def __init__(self, d: int, layers: int, heads: int) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(RefBlock(d, heads) for _ in range(layers))


class RefCLIPVisual(nn.Module):
    def __init__(self, img_size: int, patch: int, width: int, layers: int, heads: int, output_dim: int) -> None:
        super().__init__()
        scale = width ** -0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((img_size // patch) ** 2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = RefTransformer(width, layers, heads)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def tokens(self, x: torch.Tensor, after_norm: bool = True) -> torch.Tensor:
        x = self.conv1(x).flatten(2).permute(0, 2, 1)  # [N, grid^2, width]
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding)
        x = x.permute(1, 0, 2)
        for block in self.transformer.resblocks:
            x = block(x)
        x = x.permute(1, 0, 2)
        return self.ln_post(x) if after_norm else x


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    ref = RefCLIPVisual(**TINY).eval()
    with torch.no_grad():  # CLIP-like magnitudes, and non-trivial norms and biases
        for name, p in ref.named_parameters():
            if name.startswith(("class_embedding", "positional_embedding", "proj")):
                continue
            if "ln_" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
            else:
                p.normal_(0, p.shape[-1] ** -0.5 if p.dim() == 2 else 0.1)
    return ref


@pytest.fixture(scope="module")
def openai_checkpoint(reference, tmp_path_factory):
    """The reference's weights in OpenAI's layout (``visual.*``), plus a text-tower key to be ignored."""
    state = {f"visual.{k}": v.clone() for k, v in reference.state_dict().items()}
    state["token_embedding.weight"] = torch.randn(10, 8)
    assert "visual.transformer.resblocks.0.attn.in_proj_weight" in state and "visual.ln_post.weight" in state
    path = tmp_path_factory.mktemp("clip") / "ViT-tiny.pt"
    torch.save(state, path)
    return str(path)


def _clip_normalised(x: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised images -> CLIP-normalised ones (by hand)."""
    m_in, s_in = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    m_c, s_c = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x * s_in + m_in - m_c) / s_c


def test_paper_clip_teachers_are_the_quickgelu_models():
    import timm
    assert PAPER_TEACHERS["clip_vit_base"] == "vit_base_patch16_clip_quickgelu_224.openai"
    assert PAPER_TEACHERS["clip_vit_large"] == "vit_large_patch14_clip_quickgelu_224.openai"
    for tag in PAPER_TEACHERS.values():
        assert tag in timm.list_models(pretrained=True)  # the names exist in the installed timm


@pytest.mark.parametrize("name", ["clip_vit_base", "clip_vit_large"])
def test_clip_teacher_matches_openai_reference(name, reference, openai_checkpoint):
    teacher = build_teacher(name, img_size=TINY["img_size"], checkpoint=openai_checkpoint, timm_kwargs=TIMM_TINY)
    assert teacher.renormalise and teacher.embed_dim == TINY["width"] and teacher.grid == (4, 4)
    torch.manual_seed(1)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = reference.tokens(_clip_normalised(x))
        got = teacher(x)
    assert got.shape == expected.shape == (3, 17, TINY["width"])
    assert (got - expected).abs().max().item() <= 2e-5
    assert expected.abs().max() > 0.5  # not a trivial comparison


def test_gelu_clip_model_fails_the_same_comparison(reference, openai_checkpoint):
    """The old mapping (timm's ``*_clip_224.openai``, exact GELU) loads the same weights but differs."""
    old = build_teacher("timm:vit_base_patch16_clip_224.openai", img_size=32, checkpoint=openai_checkpoint,
                        timm_kwargs=TIMM_TINY)
    torch.manual_seed(1)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        diff = (old(x) - reference.tokens(_clip_normalised(x))).abs().max().item()
    assert diff > 1e-2


def test_clip_teacher_before_its_final_norm(reference, openai_checkpoint):
    """``feat_after_norm=False``: the tokens before ``ln_post`` (the published PRED_FEAT_AFTERNORM: False)."""
    teacher = build_teacher("clip_vit_base", img_size=32, checkpoint=openai_checkpoint, timm_kwargs=TIMM_TINY,
                            feat_after_norm=False)
    torch.manual_seed(2)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = reference.tokens(_clip_normalised(x), after_norm=False)
        got = teacher(x)
        after = reference.tokens(_clip_normalised(x))
    assert (got - expected).abs().max().item() <= 2e-5
    assert (got - after).abs().max().item() > 0.1
