"""Spec tests of the student's initialisation against the published FD student (models/vision_transformer.py
init + the FD subclass's ``_trunc_normal_`` in models/feature_distillation.py, truncating at +-std):

    w ~ N(0, 0.02^2) cut at +-0.02 (Linear, Conv2d patch embedding, class token, abs pos_embed)
    biases 0, LayerNorm (1, 0), q/v biases 0, relative position bias tables 0, gammas = layer_scale_init
    blocks[i].attn.proj.weight, blocks[i].mlp.fc2.weight divided by sqrt(2 * (i + 1))
    head (fine-tuning): N(0, 0.02^2) * 0.001; projection: PyTorch's Conv1d default, U(-1/sqrt(C_s), 1/sqrt(C_s))

The expected standard deviations are computed here by formula, not read from the code.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from fd_ref.method.projection import Projection
from fd_ref.models.vit import VisionTransformer

STD = 0.02


def truncated_normal_std(std: float, cut: float) -> float:
    """Standard deviation of N(0, std^2) truncated to [-cut*std, cut*std]:
    std * sqrt(1 - 2 c phi(c) / (2 Phi(c) - 1))."""
    phi = math.exp(-0.5 * cut * cut) / math.sqrt(2 * math.pi)
    mass = math.erf(cut / math.sqrt(2))  # 2 Phi(c) - 1
    return std * math.sqrt(1 - 2 * cut * phi / mass)


EFFECTIVE_STD = truncated_normal_std(STD, 1.0)


def test_effective_std_formula():
    assert EFFECTIVE_STD == pytest.approx(0.010792, abs=2e-6)  # the "about 0.0108" of the recipe
    # the formula itself, checked by sampling a rejection-truncated normal
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400_000, generator=gen)
    x = x[x.abs() <= 1.0] * STD
    assert x.std().item() == pytest.approx(EFFECTIVE_STD, rel=0.01)


def _model(seed: int, depth: int, dim: int, pos_embed: str = "shared_rpb", **kw) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=dim, depth=depth, num_heads=4,
                             pos_embed=pos_embed, **kw)


def _check_std(values: torch.Tensor, expected: float, rel: float = 0.05) -> None:
    assert values.numel() >= 4096, "too few samples for a 5% std check"
    got = values.std().item()
    assert abs(got - expected) <= rel * expected, (got, expected)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16), depth=st.integers(1, 4), dim=st.sampled_from([64, 96]))
def test_linear_and_conv_weights_are_truncated_at_std(seed, depth, dim):
    model = _model(seed, depth, dim)
    plain = [model.patch_embed.proj.weight] + [w for b in model.blocks for w in (b.attn.qkv.weight, b.mlp.fc1.weight)]
    for w in plain:
        assert w.abs().max().item() <= STD
    pooled = torch.cat([w.detach().flatten() for w in plain])
    _check_std(pooled, EFFECTIVE_STD)
    # the cut is really at one std: the largest of thousands of samples comes close to it
    assert pooled.abs().max().item() > 0.99 * STD


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16), depth=st.integers(1, 4), dim=st.sampled_from([64, 96]))
def test_residual_output_weights_are_rescaled_per_depth(seed, depth, dim):
    model = _model(seed, depth, dim)
    for i, block in enumerate(model.blocks):
        factor = math.sqrt(2.0 * (i + 1))
        for w in (block.attn.proj.weight, block.mlp.fc2.weight):
            assert w.abs().max().item() <= STD / factor + 1e-9
            assert w.abs().max().item() > 0.95 * STD / factor  # rescaled, not cut lower
        # block.mlp.fc2 has dim * 4 * dim >= 16k entries: its std alone is a tight estimate
        _check_std(block.mlp.fc2.weight.detach().flatten(), EFFECTIVE_STD / factor)
        # the ratio between a block's own unscaled fc1 and its rescaled fc2 is sqrt(2 * layer_id)
        ratio = block.mlp.fc1.weight.std().item() / block.mlp.fc2.weight.std().item()
        assert abs(ratio - factor) <= 0.08 * factor


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**16), pos_embed=st.sampled_from(["shared_rpb", "rpb", "abs"]),
       layer_scale=st.sampled_from([0.1, 1e-5, None]))
def test_biases_norms_tables_and_gammas(seed, pos_embed, layer_scale):
    model = _model(seed, 3, 64, pos_embed=pos_embed, layer_scale_init=layer_scale, num_classes=0)
    for name, p in model.named_parameters():
        if name.endswith(("bias", "q_bias", "v_bias")) or ".table" in name:
            assert torch.all(p == 0), name
        if name.endswith("gamma"):
            assert torch.all(p == layer_scale), name
    tables = [n for n, _ in model.named_parameters() if n.endswith(".table")]
    assert len(tables) == {"shared_rpb": 1, "rpb": 3, "abs": 0}[pos_embed]
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    assert model.patch_embed.proj.bias is not None and torch.all(model.patch_embed.proj.bias == 0)


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_class_token_and_absolute_position_embedding_truncated(seed):
    model = _model(seed, 1, 96, pos_embed="abs")
    assert model.cls_token.abs().max().item() <= STD and model.cls_token.abs().max().item() > 0
    assert model.pos_embed.abs().max().item() <= STD
    # a tight std estimate needs more draws than one tiny model has: pool models of other seeds (same law)
    pos = torch.cat([_model(seed + k, 1, 96, pos_embed="abs").pos_embed.detach().flatten() for k in range(3)])
    _check_std(pos, EFFECTIVE_STD)
    cls = torch.cat([_model(seed + k, 1, 96).cls_token.detach().flatten() for k in range(48)])
    _check_std(cls, EFFECTIVE_STD)


def test_head_keeps_the_small_untruncated_init():
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=4, num_classes=1000,
                              global_pool="avg")
    w = model.head.weight.detach().flatten()
    _check_std(w, STD * 0.001)  # N(0, 0.02^2) * 0.001, not truncated at one std
    assert w.abs().max().item() > 2.5 * STD * 0.001
    assert torch.all(model.head.bias == 0)


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**16), c_s=st.sampled_from([64, 128]), c_t=st.sampled_from([96, 128]))
def test_projection_keeps_pytorch_conv1d_default(seed, c_s, c_t):
    """The published FD never re-initialises its Conv1d decoder: PyTorch's default, kaiming_uniform with
    a = sqrt(5), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)), for weight and bias."""
    torch.manual_seed(seed)
    proj = Projection(c_s, c_t).proj
    bound = 1 / math.sqrt(c_s)
    assert proj.weight.abs().max().item() <= bound and proj.bias.abs().max().item() <= bound
    _check_std(proj.weight.detach().flatten(), bound / math.sqrt(3))  # std of U(-b, b) is b / sqrt(3)
