"""Spec tests of the relative position bias (index, table, resizing) and of its sharing across blocks."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from timm.models.beit import gen_relative_position_index

from fd_ref.method.position import (RelativePositionBias, num_relative_positions, relative_position_index,
                                    resize_relative_position_bias_table)
from fd_ref.models.vit import VisionTransformer

grids = st.tuples(st.integers(1, 6), st.integers(1, 6))


def _coords(h, w):
    return [(y, x) for y in range(h) for x in range(w)]


# ------------------------------------------------------------------------------------------------ index
@given(grid=grids)
def test_patch_index_is_a_bijection_of_offsets(grid):
    h, w = grid
    index = relative_position_index(grid)
    n = h * w
    r = (2 * h - 1) * (2 * w - 1)
    assert index.shape == (n + 1, n + 1) and index.dtype == torch.long
    coords = _coords(h, w)
    offset_to_index: dict[tuple[int, int], int] = {}
    for i, (yi, xi) in enumerate(coords):
        for j, (yj, xj) in enumerate(coords):
            off = (yi - yj, xi - xj)
            value = int(index[i + 1, j + 1])
            assert 0 <= value < r
            # the same offset always gives the same index
            assert offset_to_index.setdefault(off, value) == value
    # different offsets give different indices, and every row of the table's patch block is used
    assert len(set(offset_to_index.values())) == len(offset_to_index) == r


@given(grid=grids, data=st.data())
def test_two_pairs_with_same_offset_share_an_index(grid, data):
    h, w = grid
    index = relative_position_index(grid)
    dy = data.draw(st.integers(-(h - 1), h - 1))
    dx = data.draw(st.integers(-(w - 1), w - 1))
    # two query positions from which the offset stays on the grid
    ys = [y for y in range(h) if 0 <= y - dy < h]
    xs = [x for x in range(w) if 0 <= x - dx < w]
    y1, y2 = data.draw(st.sampled_from(ys)), data.draw(st.sampled_from(ys))
    x1, x2 = data.draw(st.sampled_from(xs)), data.draw(st.sampled_from(xs))
    tok = lambda y, x: 1 + y * w + x  # noqa: E731
    a = index[tok(y1, x1), tok(y1 - dy, x1 - dx)]
    b = index[tok(y2, x2), tok(y2 - dy, x2 - dx)]
    assert a == b
    # and equals the closed formula of the docstring
    assert a == (dy + h - 1) * (2 * w - 1) + (dx + w - 1)


def test_index_hand_example():
    h, w = 2, 3  # R = 3 * 5 = 15
    index = relative_position_index((h, w))
    tok = lambda y, x: 1 + y * w + x  # noqa: E731
    assert index[tok(0, 0), tok(1, 2)] == 0  # most negative offset (dy=-1, dx=-2)
    assert index[tok(1, 2), tok(0, 0)] == 14  # most positive offset (dy=1, dx=2) = R - 1
    assert index[tok(0, 1), tok(0, 0)] == 8  # dy=0, dx=1: 1*5 + 3
    assert torch.all(index[1:, 1:].diagonal() == 7)  # zero offset is the centre (R - 1) / 2
    assert index[0, 0] == 17 and torch.all(index[0, 1:] == 15) and torch.all(index[1:, 0] == 16)


@given(grid=grids)
def test_class_token_uses_the_three_extra_entries(grid):
    h, w = grid
    r = (2 * h - 1) * (2 * w - 1)
    index = relative_position_index(grid)
    assert torch.all(index[0, 1:] == r)  # class token queries a patch
    assert torch.all(index[1:, 0] == r + 1)  # a patch queries the class token
    assert index[0, 0] == r + 2
    assert torch.all(index[1:, 1:] < r)
    assert num_relative_positions(grid) == r + 3
    assert num_relative_positions(grid, cls_token=False) == r
    assert int(index.max()) + 1 == num_relative_positions(grid)
    no_cls = relative_position_index(grid, cls_token=False)
    assert torch.equal(no_cls, index[1:, 1:])


@given(grid=grids)
def test_index_equals_timm(grid):
    assert torch.equal(relative_position_index(grid), gen_relative_position_index(grid))


# ------------------------------------------------------------------------------------------------ module
@given(grid=grids, heads=st.integers(1, 4), seed=st.integers(0, 1000))
def test_relative_position_bias_gathers_table(grid, heads, seed):
    torch.manual_seed(seed)
    rpb = RelativePositionBias(grid, heads)
    h, w = grid
    assert rpb.table.shape == ((2 * h - 1) * (2 * w - 1) + 3, heads)
    with torch.no_grad():
        rpb.table.normal_()
    bias = rpb()
    n = h * w + 1
    assert bias.shape == (heads, n, n)
    index = relative_position_index(grid)
    for head in range(heads):
        assert torch.equal(bias[head], rpb.table[:, head][index])
    # the index is a derived, non-persistent buffer: only the table is saved
    assert list(rpb.state_dict()) == ["table"]


def test_relative_position_bias_gradient_reaches_the_table():
    rpb = RelativePositionBias((2, 2), 2)
    rpb().sum().backward()
    # each table row receives one gradient per (i, j) pair that uses it: count of the index value
    counts = torch.bincount(relative_position_index((2, 2)).flatten(), minlength=rpb.table.shape[0])
    assert torch.equal(rpb.table.grad, counts[:, None].float().expand(-1, 2))


# ------------------------------------------------------------------------------------------------ resize
def _random_table(grid, heads=3, seed=0):
    return torch.randn(num_relative_positions(grid), heads, generator=torch.Generator().manual_seed(seed))


def test_resize_same_grid_is_identity_copy():
    t = _random_table((3, 4))
    r = resize_relative_position_bias_table(t, (3, 4), (3, 4))
    assert torch.equal(r, t) and r.data_ptr() != t.data_ptr()


@given(old=grids, new=grids, seed=st.integers(0, 1000))
def test_resize_keeps_class_rows_and_shape(old, new, seed):
    t = _random_table(old, seed=seed)
    r = resize_relative_position_bias_table(t, old, new)
    assert r.shape == (num_relative_positions(new), 3)
    assert torch.equal(r[-3:], t[-3:])


@given(old=grids, new=grids, seed=st.integers(0, 1000))
def test_resize_constant_over_offsets_stays_constant(old, new, seed):
    t = _random_table(old, seed=seed)
    n_old = num_relative_positions(old, cls_token=False)
    t[:n_old] = t[0]  # each head constant over offsets
    r = resize_relative_position_bias_table(t, old, new)
    n_new = num_relative_positions(new, cls_token=False)
    assert torch.allclose(r[:n_new], t[0].expand(n_new, -1), atol=1e-5)


def _centre(grid):
    h, w = grid
    return (h - 1) * (2 * w - 1) + (w - 1)


@given(old=st.tuples(st.integers(2, 5), st.integers(2, 5)), new=st.tuples(st.integers(2, 7), st.integers(2, 7)),
       seed=st.integers(0, 1000))
def test_resize_keeps_zero_offset_at_centre_and_extreme_offsets_at_corners(old, new, seed):
    t = _random_table(old, seed=seed)
    r = resize_relative_position_bias_table(t, old, new)
    assert torch.allclose(r[_centre(new)], t[_centre(old)], atol=1e-5)
    oh, ow = 2 * old[0] - 1, 2 * old[1] - 1
    nh, nw = 2 * new[0] - 1, 2 * new[1] - 1
    old_img, new_img = t[:oh * ow].view(oh, ow, -1), r[:nh * nw].view(nh, nw, -1)
    for (oy, ox), (ny, nx) in [((0, 0), (0, 0)), ((0, ow - 1), (0, nw - 1)), ((oh - 1, 0), (nh - 1, 0)),
                               ((oh - 1, ow - 1), (nh - 1, nw - 1))]:
        assert torch.allclose(new_img[ny, nx], old_img[oy, ox], atol=1e-5)


@given(old=st.tuples(st.integers(2, 4), st.integers(2, 4)), seed=st.integers(0, 1000))
def test_resize_to_doubled_offsets_resamples_at_old_offsets(old, seed):
    """Grid (H, W) -> (2H-1, 2W-1) doubles the offset range: new offset 2*o lands exactly on old offset o."""
    t = _random_table(old, seed=seed)
    new = (2 * old[0] - 1, 2 * old[1] - 1)
    r = resize_relative_position_bias_table(t, old, new)
    oh, ow = 2 * old[0] - 1, 2 * old[1] - 1
    nh, nw = 2 * new[0] - 1, 2 * new[1] - 1
    old_img, new_img = t[:oh * ow].view(oh, ow, -1), r[:nh * nw].view(nh, nw, -1)
    assert torch.allclose(new_img[::2, ::2], old_img, atol=1e-5)


@given(old=grids, new=grids, seed=st.integers(0, 1000))
def test_resize_preserves_antisymmetry_and_linear_trend_in_dy(old, new, seed):
    # A table odd about the zero offset (e.g. linear in dy) stays odd: the resampling is centred.
    n_old = num_relative_positions(old, cls_token=False)
    t = _random_table(old, seed=seed)
    t[:n_old] = t[:n_old] - t[:n_old].flip(0)
    r = resize_relative_position_bias_table(t, old, new)
    n_new = num_relative_positions(new, cls_token=False)
    assert torch.allclose(r[:n_new], -r[:n_new].flip(0), atol=1e-5)
    # linear in dy: values grow with dy and the zero-offset row stays 0
    h, w = old
    dy = torch.arange(-(h - 1), h).float()
    lin = dy[:, None].expand(-1, 2 * w - 1).reshape(-1, 1)
    lin = torch.cat([lin, torch.zeros(3, 1)])
    rl = resize_relative_position_bias_table(lin, old, new)[:n_new].view(2 * new[0] - 1, 2 * new[1] - 1)
    assert torch.allclose(rl[new[0] - 1], torch.zeros(2 * new[1] - 1), atol=1e-5)
    assert torch.allclose(rl, rl[:, :1].expand_as(rl), atol=1e-5)  # still independent of dx
    if h > 1 and new[0] > 1:  # extreme offsets map onto extreme offsets
        assert rl[0, 0] == pytest.approx(-(h - 1), abs=1e-4) and rl[-1, 0] == pytest.approx(h - 1, abs=1e-4)


def test_resize_rejects_wrong_table():
    with pytest.raises(ValueError):
        resize_relative_position_bias_table(torch.zeros(10, 2), (2, 2), (3, 3))


# ------------------------------------------------------------------------------------------------ sharing
def _tiny(pos_embed, depth=3, seed=0):
    torch.manual_seed(seed)
    return VisionTransformer(img_size=16, patch_size=4, embed_dim=16, depth=depth, num_heads=2,
                             pos_embed=pos_embed).eval()


def _tables(model):
    return [(name, p) for name, p in model.named_parameters() if name.endswith("table")]


def test_shared_rpb_has_exactly_one_table_used_by_every_block():
    model = _tiny("shared_rpb")
    tables = _tables(model)
    assert [name for name, _ in tables] == ["rel_pos_bias.table"]
    assert model.pos_embed is None
    assert all(block.attn.rel_pos_bias is None for block in model.blocks)
    x = torch.randn(2, 3, 16, 16)
    before = model.attention_maps(x)
    with torch.no_grad():
        tables[0][1].add_(torch.randn_like(tables[0][1]))
    after = model.attention_maps(x)
    for b, a in zip(before, after):
        assert (b - a).abs().max() > 1e-3  # every block's attention moved


def test_shared_bias_enters_every_block_logits():
    """Perturbing only the first block's input leaves the bias: block i's attention of an rpb model whose
    tables are all copies of the shared table equals the shared model's, block by block."""
    shared = _tiny("shared_rpb", seed=1)
    with torch.no_grad():
        shared.rel_pos_bias.table.normal_()
    per_block = _tiny("rpb", seed=2)
    state = dict(shared.state_dict())
    table = state.pop("rel_pos_bias.table")
    for i in range(shared.depth):
        state[f"blocks.{i}.attn.rel_pos_bias.table"] = table
    per_block.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 16, 16)
    for a, b in zip(shared.attention_maps(x), per_block.attention_maps(x)):
        assert torch.allclose(a, b, atol=1e-6)


def test_rpb_has_one_table_per_block():
    model = _tiny("rpb", depth=3)
    names = [name for name, _ in _tables(model)]
    assert names == [f"blocks.{i}.attn.rel_pos_bias.table" for i in range(3)]
    assert model.rel_pos_bias is None and model.pos_embed is None
    # the last block's table only affects the last block
    x = torch.randn(2, 3, 16, 16)
    before = model.attention_maps(x)
    with torch.no_grad():
        model.blocks[-1].attn.rel_pos_bias.table.add_(1.0 + torch.randn_like(model.blocks[-1].attn.rel_pos_bias.table))
    after = model.attention_maps(x)
    for b, a in zip(before[:-1], after[:-1]):
        assert torch.equal(b, a)
    assert (before[-1] - after[-1]).abs().max() > 1e-3


def test_abs_has_no_table_and_a_position_embedding():
    model = _tiny("abs")
    assert _tables(model) == []
    assert model.rel_pos_bias is None
    assert isinstance(model.pos_embed, torch.nn.Parameter)
    assert model.pos_embed.shape == (1, 4 * 4 + 1, 16)
    x = torch.randn(1, 3, 16, 16)
    before = model.forward_features(x)
    with torch.no_grad():
        model.pos_embed.add_(1.0)
    assert not torch.allclose(before, model.forward_features(x))
