"""Spec tests of the relative position bias (index, table, resizing) and of its sharing across blocks."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from timm.models.beit import gen_relative_position_index

from fd_ref.method.position import (RelativePositionBias, cubic_spline_weights, geometric_positions,
                                    num_relative_positions, relative_position_index,
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
# The published rule (utils.py, remap_pretrained_keys_vit / _swin), written out here by hand and solved another
# way than fd_ref/method/position.py: the geometric positions from the bisection as the published loop runs it, then
# SciPy's interp2d(kind="cubic") on a grid, i.e. along each axis the not-a-knot interpolating cubic spline
# evaluated at the nearest edge outside the data, here solved as ONE linear system in the four polynomial
# coefficients of every interval (numpy), where the library solves for the second derivatives (torch).
def published_positions(src: int, dst: int) -> list[float]:
    """Offsets 0, +-1, +-(1 + q), +-(1 + q + q^2), ... with q bisected on [1.01, 1.5] until the bracket is
    narrower than 1e-6 (q = the last midpoint), so that the sum of the src // 2 first powers meets dst // 2."""
    half, target = src // 2, dst // 2
    left, right = 1.01, 1.5
    while right - left > 1e-6:
        q = (left + right) / 2.0
        total = sum(q ** k for k in range(half))
        left, right = (left, q) if total > target else (q, right)
    ends = [sum(q ** k for k in range(j)) for j in range(1, half + 1)]
    return [-e for e in reversed(ends)] + [0.0] + ends


def not_a_knot(x: np.ndarray, z: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Cubic p_i(s) = c0 + c1 s + c2 s^2 + c3 s^3, s = t - x_i, on each of the n - 1 intervals (n >= 4):
    p_i(0) = z_i and p_i(h_i) = z_(i+1); p_i' and p_i'' meet p_(i+1)' and p_(i+1)'' at x_(i+1); c3 equal on the
    first two and on the last two intervals (not-a-knot). ``z`` [n, k]; points clipped into [x_0, x_(n-1)]."""
    n, m = len(x), len(x) - 1
    a, rhs = np.zeros((4 * m, 4 * m)), np.zeros((4 * m, z.shape[1]))
    row = 0
    for i in range(m):
        h = x[i + 1] - x[i]
        a[row, 4 * i], rhs[row] = 1.0, z[i]
        a[row + 1, 4 * i:4 * i + 4], rhs[row + 1] = [1.0, h, h * h, h ** 3], z[i + 1]
        row += 2
    for i in range(m - 1):
        h = x[i + 1] - x[i]
        a[row, 4 * i:4 * i + 4], a[row, 4 * i + 5] = [0.0, 1.0, 2 * h, 3 * h * h], -1.0
        a[row + 1, 4 * i:4 * i + 4], a[row + 1, 4 * i + 6] = [0.0, 0.0, 2.0, 6 * h], -2.0
        row += 2
    a[row, 3], a[row, 7] = 1.0, -1.0
    a[row + 1, 4 * (m - 2) + 3], a[row + 1, 4 * (m - 1) + 3] = 1.0, -1.0
    c = np.linalg.solve(a, rhs).reshape(m, 4, -1)
    t = np.clip(t, x[0], x[-1])
    i = np.clip(np.searchsorted(x, t, side="right") - 1, 0, m - 1)
    s = (t - x[i])[:, None]
    return c[i, 0] + c[i, 1] * s + c[i, 2] * s ** 2 + c[i, 3] * s ** 3


def published_resize(table: torch.Tensor, old, new) -> torch.Tensor:
    (oh, ow), (nh, nw) = old, new
    sy, sx, dy, dx = 2 * oh - 1, 2 * ow - 1, 2 * nh - 1, 2 * nw - 1
    img = table[:sy * sx].double().numpy().reshape(sy, sx, -1)
    ty, tx = np.arange(-(dy // 2), dy // 2 + 1.0), np.arange(-(dx // 2), dx // 2 + 1.0)
    py, px = np.array(published_positions(sy, dy)), np.array(published_positions(sx, dx))
    along_y = (lambda v: v) if sy == dy else (lambda v: not_a_knot(py, v, ty))  # an unchanged axis is kept
    along_x = (lambda v: v) if sx == dx else (lambda v: not_a_knot(px, v, tx))
    heads = []
    for head in range(img.shape[2]):
        rows = along_x(img[:, :, head].T).T                      # along x: [sy, dx]
        heads.append(along_y(rows))                              # along y: [dy, dx]
    out = torch.from_numpy(np.stack(heads, -1).reshape(dy * dx, -1))
    return torch.cat([out.to(table.dtype), table[sy * sx:]])


def _random_table(grid, heads=3, seed=0):
    return torch.randn(num_relative_positions(grid), heads, generator=torch.Generator().manual_seed(seed))


def _image(table, grid):
    h, w = grid
    return table[:(2 * h - 1) * (2 * w - 1)].view(2 * h - 1, 2 * w - 1, -1)


big_grids = st.tuples(st.integers(3, 9), st.integers(3, 9))  # >= 5 offsets per axis: a true cubic spline


@given(old=big_grids, new=big_grids, seed=st.integers(0, 1000))
def test_resize_is_the_published_geometric_cubic_resampling(old, new, seed):
    t = _random_table(old, seed=seed)
    torch.testing.assert_close(resize_relative_position_bias_table(t, old, new), published_resize(t, old, new),
                               rtol=0, atol=2e-5)


def test_resize_of_a_14_grid_to_24_matches_the_published_positions():
    """ViT-B/16 224 -> 384 px: 27 offsets per axis placed on 47; the progression's ratio and its ends."""
    x = geometric_positions(27, 47)
    assert torch.allclose(x, torch.tensor(published_positions(27, 47), dtype=torch.float64), atol=1e-12)
    q = float((x[15] - x[14]) / (x[14] - x[13]))
    assert 1.01 < q < 1.5 and abs(float(x[-1]) - 23) < 1e-4 and float(x[14]) == 1.0


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


@given(old=grids, new=grids, seed=st.integers(0, 1000))
def test_resize_keeps_the_zero_offset_and_its_neighbours(old, new, seed):
    """Offsets 0 and +-1 sit where they were (the progression starts at 1 with unit step), so the bias of a
    patch to itself and to its 8 neighbours is kept exactly, growing or shrinking."""
    t = _random_table(old, seed=seed)
    r = resize_relative_position_bias_table(t, old, new)
    old_img, new_img = _image(t, old), _image(r, new)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if min(old[0], new[0]) > abs(dy) and min(old[1], new[1]) > abs(dx):
                torch.testing.assert_close(new_img[new[0] - 1 + dy, new[1] - 1 + dx],
                                           old_img[old[0] - 1 + dy, old[1] - 1 + dx], rtol=0, atol=1e-5)


@given(old=grids, new=grids, seed=st.integers(0, 1000), axis=st.sampled_from([0, 1]))
def test_resize_commutes_with_mirroring_and_is_linear(old, new, seed, axis):
    """The grid is symmetric about offset 0: mirroring the offsets before or after resampling is the same;
    and resampling is linear in the table."""
    a, b = _random_table(old, seed=seed), _random_table(old, seed=seed + 1)
    mirrored = a.clone()
    _image(mirrored, old).copy_(_image(a, old).flip(axis))
    ra = resize_relative_position_bias_table(a, old, new)
    torch.testing.assert_close(_image(resize_relative_position_bias_table(mirrored, old, new), new),
                               _image(ra, new).flip(axis), rtol=0, atol=1e-5)
    rb = resize_relative_position_bias_table(b, old, new)
    torch.testing.assert_close(resize_relative_position_bias_table(2 * a - 3 * b, old, new), 2 * ra - 3 * rb,
                               rtol=0, atol=1e-4)


@given(old=big_grids, grow=st.tuples(st.integers(1, 6), st.integers(1, 6)),
       coef=st.lists(st.floats(-1, 1), min_size=8, max_size=8))
def test_resize_reproduces_a_cubic_in_the_geometric_positions(old, grow, coef):
    """A table that is a product of cubics in the old offsets' new positions, P(y) Q(x), comes out as P and
    Q at the new integer offsets (a cubic spline reproduces cubics); the class rows stay."""
    new = (old[0] + grow[0], old[1] + grow[1])
    py, px = (geometric_positions(2 * o - 1, 2 * n - 1) for o, n in zip(old, new))
    poly = (lambda c, v: ((c[3] * v / 9 + c[2]) * v / 9 + c[1]) * v / 9 + c[0])
    t = torch.cat([(poly(coef[:4], py)[:, None] * poly(coef[4:], px)[None, :]).reshape(-1, 1).float(),
                   torch.zeros(3, 1)])
    r = resize_relative_position_bias_table(t, old, new)
    ty, tx = (torch.arange(-(n - 1), n, dtype=torch.float64) for n in new)
    inside_y, inside_x = ty.abs() <= py[-1], tx.abs() <= px[-1]  # q cut at 1.5: the ends lie beyond the data
    expected = poly(coef[:4], ty)[:, None] * poly(coef[4:], tx)[None, :]
    got = _image(r, new)[..., 0].double()
    assert torch.allclose(got[inside_y][:, inside_x], expected[inside_y][:, inside_x], atol=1e-4)


@given(old=st.tuples(st.integers(2, 5), st.integers(2, 5)), grow=st.tuples(st.integers(0, 3), st.integers(0, 3)),
       seed=st.integers(0, 1000))
def test_resize_to_a_larger_grid_keeps_the_corners(old, grow, seed):
    """Growing moderately (ratio below the 1.5 cut), the outermost old offsets land on the new grid's ends."""
    new = (old[0] + grow[0], old[1] + grow[1])
    t = _random_table(old, seed=seed)
    r = resize_relative_position_bias_table(t, old, new)
    old_img, new_img = _image(t, old), _image(r, new)
    for sy in (0, -1):
        for sx in (0, -1):
            torch.testing.assert_close(new_img[sy, sx], old_img[sy, sx], rtol=0, atol=1e-3)


@given(src=st.integers(1, 30), dst=st.integers(1, 60))
def test_geometric_positions(src, dst):
    """Symmetric, 0 and +-1 fixed, gaps growing by one ratio q in [1.01, 1.5]; the ends at dst // 2 unless
    q is cut at 1.01 (shrinking) or 1.5 (growing a lot)."""
    src, dst = 2 * src - 1, 2 * dst - 1
    x = geometric_positions(src, dst)
    assert len(x) == src and torch.equal(x, -x.flip(0)) and x[src // 2] == 0
    if src >= 3:
        assert x[src // 2 + 1] == 1.0
    gaps = x[src // 2 + 1:] - x[src // 2:-1]
    if len(gaps) >= 2:
        ratios = gaps[1:] / gaps[:-1]
        q = float(ratios[0])
        assert torch.allclose(ratios, torch.full_like(ratios, q)) and 1.01 - 1e-6 <= q <= 1.5 + 1e-6
        if 1.01 + 1e-5 < q < 1.5 - 1e-5:
            assert abs(float(x[-1]) - dst // 2) < 1e-3  # q is bisected to 1e-6


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


def test_cubic_spline_weights_with_one_and_two_knots():
    """The degenerate splines: one knot gives the constant, two give the straight line through them (clamped
    to the segment outside it), written out by hand."""
    points = torch.tensor([-1.0, 0.0, 0.5, 2.0, 3.5])
    z = torch.tensor([4.0, -2.0], dtype=torch.float64)
    line = cubic_spline_weights(torch.tensor([0.0, 2.0]), points) @ z
    t = points.double().clamp(0.0, 2.0)
    assert torch.allclose(line, 4.0 + (t / 2.0) * (-2.0 - 4.0), atol=1e-12)
    constant = cubic_spline_weights(torch.tensor([1.0]), points) @ torch.tensor([3.0], dtype=torch.float64)
    assert torch.equal(constant, torch.full((5,), 3.0, dtype=torch.float64))


def test_cubic_spline_weights_with_three_knots_is_the_parabola_through_them():
    """Three knots (a 2-patch axis has 3 offsets): not-a-knot leaves one cubic through three points with equal
    second derivatives at both ends, i.e. the parabola through them: Lagrange's formula, by hand."""
    knots = torch.tensor([-1.0, 0.0, 1.5])
    z = torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64)
    points = torch.tensor([-1.0, -0.5, 0.0, 0.7, 1.5, 3.0])  # 3.0 is clamped to 1.5
    t = points.double().clamp(-1.0, 1.5)
    x0, x1, x2 = -1.0, 0.0, 1.5
    parabola = (z[0] * (t - x1) * (t - x2) / ((x0 - x1) * (x0 - x2))
                + z[1] * (t - x0) * (t - x2) / ((x1 - x0) * (x1 - x2))
                + z[2] * (t - x0) * (t - x1) / ((x2 - x0) * (x2 - x1)))
    assert torch.allclose(cubic_spline_weights(knots, points) @ z, parabola, atol=1e-12)


def test_resize_without_class_rows_and_its_message():
    """A table without the 3 class-token rows resizes the same way (no rows kept aside); a table whose row
    count fits neither is refused with the counts."""
    t = _random_table((3, 3))
    bare = t[:num_relative_positions((3, 3), cls_token=False)]
    out = resize_relative_position_bias_table(bare, (3, 3), (5, 5), cls_token=False)
    torch.testing.assert_close(out, resize_relative_position_bias_table(t, (3, 3), (5, 5))[:81], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"^table has 25 rows, grid \(3, 3\) needs 28$"):
        resize_relative_position_bias_table(t[:25], (3, 3), (5, 5))
