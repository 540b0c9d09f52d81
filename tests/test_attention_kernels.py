"""The attention kernels with the relative position bias (fd_ref.models.attention): FlexAttention's
``score_mod`` = the explicit formula, the kernel choice, and one compiled kernel per shape.

FlexAttention has no CPU backward, so the CPU checks the compiled forward; tests/test_cuda.py checks forward
and gradients (q, k, v and the tables) on a GPU."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from fd_ref.errors import UserError
from fd_ref.method.position import (RelativePositionBias, as_table, bias_score_mod, gather_bias,
                                    relative_position_index)
from fd_ref.models.attention import FLEX_HEAD_DIMS, flex_attention, flex_available, resolve_kernel
from fd_ref.models.vit import VisionTransformer


def explicit(q, k, v, bias):
    """The attention equation written out: softmax(q k^T * d^-1/2 + bias) v."""
    logits = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5 + bias
    return logits.softmax(-1) @ v


def _tiny(pos_embed: str) -> VisionTransformer:
    torch.manual_seed(0)
    model = VisionTransformer(img_size=16, patch_size=4, embed_dim=64, depth=2, num_heads=4, pos_embed=pos_embed)
    with torch.no_grad():  # tables far from zero, so the bias matters
        for name, p in model.named_parameters():
            if "rel_pos_bias" in name:
                p.normal_(std=1.0)
    return model.eval()


def test_dense_bias_round_trips_through_a_table():
    bias = torch.randn(3, 5, 7)
    assert torch.equal(gather_bias(*as_table(bias)), bias)


def test_kernel_choice():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert resolve_kernel("auto", cpu, 64, needs_grad=True) == "sdpa"
    assert resolve_kernel("auto", cpu, 64, needs_grad=False) == "sdpa"
    assert resolve_kernel("auto", gpu, 64, needs_grad=True) == ("flex" if flex_available() else "sdpa")
    assert resolve_kernel("auto", gpu, 24, needs_grad=True) == "sdpa"  # a head width flex does not tile
    assert 24 not in FLEX_HEAD_DIMS
    for kernel in ("sdpa", "explicit"):
        assert resolve_kernel(kernel, cpu, 64, needs_grad=True) == kernel
    assert resolve_kernel("flex", cpu, 64, needs_grad=False) == "flex"  # CPU inference
    with pytest.raises(UserError, match="no backward on the CPU"):
        resolve_kernel("flex", cpu, 64, needs_grad=True)
    with pytest.raises(UserError, match="attention kernel must be one of"):
        resolve_kernel("fast", cpu, 64, needs_grad=False)
    with pytest.raises(UserError, match="attention kernel must be one of"):
        _tiny("rpb").set_attention_kernel("flash")


@pytest.mark.slow
@torch.no_grad()
def test_flex_score_mod_equals_the_explicit_formula_on_a_rectangular_grid():
    """Compiled FlexAttention with table[index[q, k], h] = softmax(q k^T scale + bias) v, grid 3 x 5 with a
    class token (16 tokens), two tables summed (a block's own beside a shared one)."""
    torch.manual_seed(0)
    grid, heads = (3, 5), 2
    shared, own = RelativePositionBias(grid, heads), RelativePositionBias(grid, heads)
    for rpb in (shared, own):
        rpb.table.normal_(std=1.0)
    q, k, v = (torch.randn(2, heads, 16, 16) for _ in range(3))
    index = relative_position_index(grid)
    bias = shared.table[index].permute(2, 0, 1) + own.table[index].permute(2, 0, 1)
    out = flex_attention(q, k, v, bias_score_mod((shared.table, shared.index), (own.table, own.index)),
                         scale=16 ** -0.5)
    torch.testing.assert_close(out, explicit(q, k, v, bias), rtol=0, atol=1e-5)
    without = flex_attention(q, k, v, bias_score_mod(), scale=16 ** -0.5)
    assert (without - out).abs().max() > 1e-2  # the bias is not lost on the way


@pytest.mark.slow
@pytest.mark.parametrize("pos_embed", ["shared_rpb", "rpb"])
@torch.no_grad()
def test_flex_model_forward_equals_explicit_on_cpu(pos_embed):
    """The shared table (distillation) and the per-block tables (fine-tuning), grid 4 x 4."""
    model = _tiny(pos_embed)
    x = torch.randn(2, 3, 16, 16)
    model.set_attention_kernel("explicit")
    reference = model.forward_features(x)
    model.set_attention_kernel("flex")
    assert all(b.attn.kernel == "flex" for b in model.blocks)
    torch.testing.assert_close(model.forward_features(x), reference, rtol=0, atol=1e-5)


@pytest.mark.slow
@torch.no_grad()
def test_flex_kernel_is_compiled_once_per_shape():
    """Blocks with their own tables and later calls reuse one compiled kernel; a new batch size adds one."""
    model = _tiny("rpb")
    model.set_attention_kernel("flex")
    x = torch.randn(3, 3, 16, 16)
    model.forward_features(x)
    graphs = counters["stats"]["unique_graphs"]
    model.forward_features(x)
    _tiny("rpb").set_attention_kernel("flex")
    other = _tiny("rpb")
    other.set_attention_kernel("flex")
    other.forward_features(x + 1)
    assert counters["stats"]["unique_graphs"] == graphs
    model.forward_features(x[:1])
    assert counters["stats"]["unique_graphs"] == graphs + 1


def test_forced_flex_refuses_cpu_training():
    model = _tiny("shared_rpb").train()
    model.set_attention_kernel("flex")
    with pytest.raises(UserError, match="no backward on the CPU"):
        model.forward_features(torch.randn(1, 3, 16, 16))


def test_train_py_refuses_flex_training_on_the_cpu_in_one_line(tmp_path):
    import train
    with pytest.raises(UserError, match="no backward on the CPU"):
        train.main(["--attention", "flex", "--synthetic-size", "16", "--num-workers", "0", "--output",
                    str(tmp_path / "out")])
    with pytest.raises(UserError, match="attention kernel must be one of"):
        train.main(["--attention", "fast", "--synthetic-size", "16", "--num-workers", "0", "--output",
                    str(tmp_path / "out")])


def test_bias_score_mod_adds_each_table_s_entry_for_its_head():
    """The score_mod itself, without compiling: score + table[index[q, k], h] summed over the pairs, for
    every head and position (called as FlexAttention calls it, with 0-d tensors)."""
    g = torch.Generator().manual_seed(0)
    shared, own = torch.randn(9, 2, generator=g), torch.randn(5, 2, generator=g)
    shared_index, own_index = torch.randint(0, 9, (3, 3), generator=g), torch.randint(0, 5, (3, 3), generator=g)
    mod = bias_score_mod((shared, shared_index), (own, own_index))
    for h in range(2):
        for q in range(3):
            for k in range(3):
                out = mod(torch.tensor(0.25), torch.tensor(0), torch.tensor(h), torch.tensor(q), torch.tensor(k))
                assert float(out) == pytest.approx(0.25 + float(shared[shared_index[q, k], h])
                                                   + float(own[own_index[q, k], h]), abs=1e-6)
    assert float(bias_score_mod()(torch.tensor(0.25), 0, 0, 0, 0)) == 0.25
