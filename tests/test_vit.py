"""Spec tests of the ViT student: shapes, attention equation, fused/plain agreement, checkpointing, pooling,
layer scale, q/v biases, LayerNorm eps, and numerical parity with timm's Beit."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.beit import Beit

import fd_ref.models.vit as vit_module
from fd_ref.checkpoint.keys import expand_shared_rpb, from_timm_beit, to_timm_beit
from fd_ref.errors import UserError
from fd_ref.models.vit import Attention, VisionTransformer, create_vit

POS = ["shared_rpb", "rpb", "abs"]


def _tiny(pos_embed="shared_rpb", seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=4, pos_embed=pos_embed)
    cfg.update(kw)
    return VisionTransformer(**cfg)


@torch.no_grad()
def _randomise(model: nn.Module, seed: int = 0, std: float = 0.3) -> nn.Module:
    """Every parameter random (so layer scales, biases, tables and norms are all non-trivial)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen) * std
        if "norm" in name and name.endswith("weight"):
            noise += 1.0
        p.copy_(noise)
    return model


@pytest.mark.parametrize("pos_embed", POS)
def test_forward_features_shape(pos_embed):
    model = _tiny(pos_embed).eval()
    out = model.forward_features(torch.randn(3, 3, 16, 16))
    assert out.shape == (3, 1 + 16, 32)
    assert model.grid == (4, 4)


@pytest.mark.parametrize("pos_embed", POS)
def test_fused_and_plain_attention_agree(pos_embed):
    model = _randomise(_tiny(pos_embed, depth=3)).eval()
    x = torch.randn(2, 3, 16, 16)
    model.set_fused_attn(True)
    assert all(b.attn.fused for b in model.blocks)
    fused = model.forward_features(x)
    model.set_fused_attn(False)
    assert not any(b.attn.fused for b in model.blocks)
    plain = model.forward_features(x)
    assert (fused - plain).abs().max().item() <= 1e-5


@pytest.mark.parametrize("pos_embed", POS)
def test_attention_maps_are_distributions(pos_embed):
    model = _randomise(_tiny(pos_embed, depth=3), std=0.5).eval()
    maps = model.attention_maps(torch.randn(2, 3, 16, 16))
    assert len(maps) == 3
    for m in maps:
        assert m.shape == (2, 4, 17, 17)
        assert torch.all(m >= 0)
        assert torch.allclose(m.sum(-1), torch.ones(2, 4, 17), atol=1e-5)


@pytest.mark.parametrize("fused", [False, True])
def test_attention_equation_by_hand(fused):
    torch.manual_seed(0)
    dim, heads, n = 12, 3, 5
    attn = _randomise(Attention(dim, heads, qkv_bias=True)).eval()
    attn.fused = fused
    x = torch.randn(2, n, dim)
    bias = torch.randn(heads, n, n)
    out, _ = attn(x, shared_bias=bias)
    w = attn.qkv.weight
    wq, wk, wv = w[:dim], w[dim:2 * dim], w[2 * dim:]
    q = x @ wq.T + attn.q_bias
    k = x @ wk.T  # no bias on k
    v = x @ wv.T + attn.v_bias
    split = lambda t: t.view(2, n, heads, dim // heads).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    logits = q @ k.transpose(-1, -2) * (dim // heads) ** -0.5 + bias
    o = (logits.softmax(-1) @ v).transpose(1, 2).reshape(2, n, dim)
    expected = o @ attn.proj.weight.T + attn.proj.bias
    assert torch.allclose(out, expected, atol=1e-5)


def test_block_equation_by_hand():
    model = _randomise(_tiny("abs", depth=1)).eval()
    block = model.blocks[0]
    x = torch.randn(2, 17, 32)
    out, _ = block(x)
    a, _ = block.attn(F.layer_norm(x, (32,), block.norm1.weight, block.norm1.bias, 1e-6))
    x1 = x + block.ls1.gamma * a
    h = F.layer_norm(x1, (32,), block.norm2.weight, block.norm2.bias, 1e-6)
    mlp = F.linear(F.gelu(F.linear(h, block.mlp.fc1.weight, block.mlp.fc1.bias)), block.mlp.fc2.weight,
                   block.mlp.fc2.bias)
    assert torch.allclose(out, x1 + block.ls2.gamma * mlp, atol=1e-5)


def test_grad_checkpointing_gives_identical_gradients(monkeypatch):
    model = _randomise(_tiny("shared_rpb", depth=3, drop_path_rate=0.2)).train()
    x = torch.randn(2, 3, 16, 16)

    def grads(checkpointing):
        model.zero_grad()
        model.set_grad_checkpointing(checkpointing)
        torch.manual_seed(7)  # same drop-path masks in both runs
        model.forward_features(x).pow(2).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    calls = []
    real = vit_module.checkpoint
    monkeypatch.setattr(vit_module, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    plain = grads(False)
    assert calls == []
    ckpt = grads(True)
    assert len(calls) == 3  # really went through checkpoint, once per block
    assert plain.keys() == ckpt.keys()
    for name in plain:
        assert torch.allclose(plain[name], ckpt[name], atol=1e-7, rtol=1e-6), name
    assert any(g.abs().sum() > 0 for g in plain.values())


def test_global_pool_cls_and_avg_heads():
    x = torch.randn(2, 3, 16, 16)
    cls_model = _randomise(_tiny(num_classes=5, global_pool="cls")).eval()
    tokens = cls_model.forward_features(x)
    assert isinstance(cls_model.norm, nn.LayerNorm) and isinstance(cls_model.fc_norm, nn.Identity)
    expected = tokens[:, 0] @ cls_model.head.weight.T + cls_model.head.bias
    assert torch.allclose(cls_model(x), expected, atol=1e-5)

    avg_model = _randomise(_tiny(num_classes=5, global_pool="avg")).eval()
    assert isinstance(avg_model.norm, nn.Identity) and isinstance(avg_model.fc_norm, nn.LayerNorm)
    tokens = avg_model.forward_features(x)
    pooled = tokens[:, 1:].mean(1)  # patch tokens only
    pooled = F.layer_norm(pooled, (32,), avg_model.fc_norm.weight, avg_model.fc_norm.bias, 1e-6)
    expected = pooled @ avg_model.head.weight.T + avg_model.head.bias
    assert torch.allclose(avg_model(x), expected, atol=1e-5)
    # the class token's output does not reach an avg head
    with_cls = tokens.clone()
    with_cls[:, 0] += 100.0
    assert torch.allclose(avg_model.forward_head(with_cls), avg_model.forward_head(tokens))

    headless = _tiny(num_classes=0)
    assert isinstance(headless.head, nn.Identity)


def test_head_init_is_small():
    model = _tiny(num_classes=10)
    assert model.head.weight.abs().max() < 0.01
    assert torch.all(model.head.bias == 0)


def test_layer_scale_initialised_to_0_1():
    model = _tiny(depth=3)
    gammas = [(n, p) for n, p in model.named_parameters() if n.endswith("gamma")]
    assert len(gammas) == 2 * 3
    for _, g in gammas:
        assert g.shape == (32,) and torch.all(g == 0.1)
    no_ls = _tiny(layer_scale_init=None)
    assert not any(n.endswith("gamma") for n, _ in no_ls.named_parameters())


def test_q_and_v_bias_but_no_k_bias():
    model = _tiny()
    names = {n for n, _ in model.named_parameters()}
    for i in range(2):
        assert f"blocks.{i}.attn.q_bias" in names and f"blocks.{i}.attn.v_bias" in names
        assert f"blocks.{i}.attn.qkv.weight" in names and f"blocks.{i}.attn.qkv.bias" not in names
    assert not any("k_bias" in n for n in names)
    assert not any("k_bias" in n for n in model.state_dict())
    # a k bias would be constant per query and cancel in the softmax; changing q_bias does matter
    attn = _randomise(Attention(8, 2)).eval()
    x = torch.randn(1, 4, 8)
    before, _ = attn(x)
    with torch.no_grad():
        attn.q_bias.add_(1.0)
    after, _ = attn(x)
    assert not torch.allclose(before, after)
    no_bias = Attention(8, 2, qkv_bias=False)
    assert no_bias.q_bias is None and no_bias.v_bias is None


def test_layer_norm_eps():
    for global_pool in ("cls", "avg"):
        model = _tiny(global_pool=global_pool)
        norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
        assert len(norms) == 2 * 2 + 1
        assert all(m.eps == 1e-6 for m in norms)


def test_drop_path_rates_per_block():
    model = _tiny(depth=4, drop_path_rate=0.3)
    assert [b.drop_path1.p for b in model.blocks] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert [b.drop_path2.p for b in model.blocks] == pytest.approx([0.0, 0.1, 0.2, 0.3])


def test_bad_configurations_raise():
    with pytest.raises(ValueError):
        _tiny(pos_embed="sincos")
    with pytest.raises(ValueError):
        _tiny(global_pool="max")
    with pytest.raises(ValueError):
        _tiny(img_size=18)
    with pytest.raises(ValueError):
        _tiny(num_heads=5)
    with pytest.raises(ValueError):
        _tiny().forward_features(torch.randn(1, 3, 32, 32))
    with pytest.raises(UserError):
        create_vit("vit_gigantic")


def test_create_vit_overrides():
    model = create_vit("vit_small", img_size=32, depth=2)
    assert (model.embed_dim, model.depth, model.num_heads, model.patch_size) == (384, 2, 6, 16)
    assert model.grid == (2, 2)


# ------------------------------------------------------------------------------------------------ timm Beit
BEIT = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, qkv_bias=True, init_values=0.1,
            use_abs_pos_emb=False, global_pool="", num_classes=0)


def _fd_tiny(pos_embed, seed=0):
    torch.manual_seed(seed)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, qkv_bias=True,
                              layer_scale_init=0.1, pos_embed=pos_embed)
    return _randomise(model, seed=seed).eval()


def _load_beit(state, **kw):
    beit = Beit(**BEIT, **kw).eval()
    result = beit.load_state_dict(to_timm_beit(state), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return beit


def test_parity_with_timm_beit_shared_rpb():
    model = _fd_tiny("shared_rpb")
    beit = _load_beit(model.state_dict(), use_rel_pos_bias=False, use_shared_rel_pos_bias=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours, theirs = model.forward_features(x), beit.forward_features(x)
    assert ours.shape == theirs.shape == (2, 17, 64)
    assert (ours - theirs).abs().max().item() <= 1e-5
    assert ours.abs().max() > 0.1  # not a trivial comparison
    # ... and the parity depends on the table: a different table gives other features
    with torch.no_grad():
        model.rel_pos_bias.table.add_(1.0 + torch.randn_like(model.rel_pos_bias.table))
        assert (model.forward_features(x) - theirs).abs().max() > 1e-3


def test_parity_with_timm_beit_per_block_rpb_after_expansion():
    shared = _fd_tiny("shared_rpb", seed=1)
    expanded = expand_shared_rpb(shared.state_dict(), depth=2)
    beit = _load_beit(expanded, use_rel_pos_bias=True, use_shared_rel_pos_bias=False)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (shared.forward_features(x) - beit.forward_features(x)).abs().max().item() <= 1e-5
    per_block = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4,
                                  pos_embed="rpb").eval()
    per_block.load_state_dict(expanded, strict=True)
    # let the blocks' tables diverge, as in fine-tuning, then compare again
    with torch.no_grad():
        per_block.blocks[1].attn.rel_pos_bias.table.normal_()
    beit = _load_beit(per_block.state_dict(), use_rel_pos_bias=True, use_shared_rel_pos_bias=False)
    with torch.no_grad():
        assert (per_block.forward_features(x) - beit.forward_features(x)).abs().max().item() <= 1e-5


def test_from_timm_beit_round_trips_keys():
    model = _fd_tiny("shared_rpb", seed=2)
    state = model.state_dict()
    beit_state = to_timm_beit(state)
    assert "rel_pos_bias.relative_position_bias_table" in beit_state
    assert "blocks.0.gamma_1" in beit_state and "blocks.1.gamma_2" in beit_state
    back = from_timm_beit(beit_state)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)
    # a Beit state dict (with its derived buffers, if any) loads strictly into an fd_ref model
    beit = _load_beit(state, use_rel_pos_bias=False, use_shared_rel_pos_bias=True)
    full = dict(beit.state_dict(keep_vars=False))
    full["blocks.0.attn.k_bias"] = torch.zeros(64)
    full["rel_pos_bias.relative_position_index"] = torch.zeros(17, 17, dtype=torch.long)
    fresh = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4).eval()
    fresh.load_state_dict(from_timm_beit(full), strict=True)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(fresh.forward_features(x), model.forward_features(x), atol=1e-6)


@pytest.mark.parametrize("pos_embed", ["abs", "shared_rpb"])
def test_bf16_attention_on_the_cpu_takes_the_explicit_formula(monkeypatch, pos_embed):
    """Under bf16 on the CPU, fused=True uses the explicit formula (faster there, bench/README.md) unless
    explicit_on_cpu_bf16 is switched off; both paths give the same features and gradients up to bf16 rounding."""
    import torch.nn.functional as F
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, pos_embed=pos_embed)
    x = torch.randn(2, 3, 32, 32)
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    results = []
    for explicit in (True, False):
        for block in model.blocks:
            block.attn.explicit_on_cpu_bf16 = explicit
        calls.clear()
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model.eval().forward_features(x)
        out.float().square().mean().backward()
        assert (len(calls) == 0) is explicit
        results.append((out.float().detach(), model.blocks[0].attn.qkv.weight.grad.clone()))
    (a, ga), (b, gb) = results
    torch.testing.assert_close(a, b, atol=0.05, rtol=0.05)
    torch.testing.assert_close(ga, gb, atol=0.05 * ga.abs().max().item(), rtol=0.05)
    with torch.no_grad():  # fp32 keeps SDPA
        calls.clear()
        model.forward_features(x)
        assert len(calls) == 2
