"""Relative position bias, shared across all blocks of the student (paper Sec. 3.1, "shared relative
position bias").

The student has no absolute position embedding. Instead every attention logit gets a learned bias that
depends only on the relative offset between query and key patches:

    logits[h, i, j] = q_i . k_j * scale + table[index[i, j], h]

For patches i=(y_i, x_i), j=(y_j, x_j) on an H x W grid,

    index[i, j] = (y_i - y_j + H - 1) * (2W - 1) + (x_i - x_j + W - 1)     in [0, (2H-1)(2W-1))

and, with a class token at position 0, three extra rows of the table are used:

    index[0, j>0] = R      (class token queries a patch)
    index[i>0, 0] = R + 1  (a patch queries the class token)
    index[0, 0]   = R + 2  (class token to itself),       R = (2H-1)(2W-1).

So the table has (2H-1)(2W-1)+3 rows and one column per head. FD uses *one* table for every block
(shared RPB); at fine-tuning it is copied into each block (``fd_ref.checkpoint.keys.expand_shared_rpb``).

Hand-written rather than timm's Beit ``RelativePositionBias``: timm's keeps the index and table inside a
module built for one window size, while FD needs them as plain pieces (one table shared by every block, the
index checked against the formula above, the table resized between grids for fine-tuning).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from einops import rearrange

Grid = tuple[int, int]


def num_relative_positions(grid: Grid, cls_token: bool = True) -> int:
    """Rows of the table: (2H-1)(2W-1), plus 3 with a class token."""
    h, w = grid
    return (2 * h - 1) * (2 * w - 1) + (3 if cls_token else 0)


def relative_position_index(grid: Grid, cls_token: bool = True) -> torch.Tensor:
    """The [N, N] long tensor ``index`` of the module docstring (N = H*W, +1 with a class token)."""
    h, w = grid
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()])  # [2, H*W]
    dy, dx = coords[:, :, None] - coords[:, None, :]  # each [H*W, H*W]
    patch_index = (dy + h - 1) * (2 * w - 1) + (dx + w - 1)
    if not cls_token:
        return patch_index
    r = (2 * h - 1) * (2 * w - 1)
    index = torch.empty(h * w + 1, h * w + 1, dtype=torch.long)
    index[1:, 1:] = patch_index
    index[0, 1:] = r
    index[1:, 0] = r + 1
    index[0, 0] = r + 2
    return index


class RelativePositionBias(nn.Module):
    """A learned table [(2H-1)(2W-1)(+3), num_heads]; ``forward()`` gathers the bias [num_heads, N, N].

    Built once per forward pass of the whole network and handed to every block when shared, which is
    cheaper than each block gathering its own copy.
    """

    def __init__(self, grid: Grid, num_heads: int, cls_token: bool = True) -> None:
        super().__init__()
        self.grid, self.num_heads, self.cls_token = tuple(grid), num_heads, cls_token
        self.table = nn.Parameter(torch.zeros(num_relative_positions(self.grid, cls_token), num_heads))
        # Initialised at zero, as published (models/vision_transformer.py): no position preference at the start.
        self.register_buffer("index", relative_position_index(self.grid, cls_token), persistent=False)

    def forward(self) -> torch.Tensor:
        return gather_bias(self.table, self.index)


def gather_bias(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The dense bias ``bias[h, i, j] = table[index[i, j], h]``, [heads, N, N]."""
    n, m = index.shape
    bias = table[index.reshape(-1)]  # [N*N, heads]
    return rearrange(bias, "(i j) h -> h i j", i=n, j=m).contiguous()


def as_table(bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A dense bias [heads, N, N] as a ``(table, index)`` pair with ``gather_bias(table, index) == bias``:
    one table row per (i, j), so any additive bias can go through :func:`bias_score_mod`."""
    heads, n, m = bias.shape
    index = torch.arange(n * m, device=bias.device).view(n, m)
    return rearrange(bias, "h i j -> (i j) h"), index


def bias_score_mod(*tables: tuple[torch.Tensor, torch.Tensor]):
    """The bias as FlexAttention's ``score_mod``: for each ``(table, index)`` pair given,

        score[b, h, q_idx, kv_idx] + table[index[q_idx, kv_idx], h]

    (the logits of the module docstring, the sum over pairs when a block has its own table besides a shared
    one). The kernel gathers the bias inside its tiles instead of reading a dense [heads, N, N] tensor, and
    its backward accumulates the logits' gradient into ``table``'s rows."""
    def add_bias(score, b, h, q_idx, kv_idx):  # noqa: ARG001 (the batch index b: the same bias for every image)
        for table, index in tables:
            score = score + table[index[q_idx, kv_idx], h]
        return score
    return add_bias


def geometric_positions(src: int, dst: int) -> torch.Tensor:
    """Where the ``src`` offsets of a table's axis (``src = 2H - 1``) sit on the axis of ``dst`` offsets
    (published ``utils.py``, ``remap_pretrained_keys_vit`` / ``_swin``): offset 0 stays at 0 and the k-th
    offset on either side (k = 1 .. src // 2) moves to

        +-(1 + q + q^2 + ... + q^(k-1)),

    a geometric progression whose ratio q is found by bisection on [1.01, 1.5] (stopping when the bracket is
    narrower than 1e-6, q the last midpoint) so that the outermost offset lands at ``dst // 2``: near offsets
    keep their unit spacing (offsets 0 and +-1 stay where they are), far ones spread out. A shrinking axis
    gets q = 1.01 (its outermost offsets fall beyond the new range); a ratio above 1.5 is cut at 1.5 (the new
    range's ends then lie beyond the old offsets). Returned as float64, ascending."""
    n = src // 2
    lo, hi, q = 1.01, 1.5, 1.01
    while hi - lo > 1e-6:
        q = (lo + hi) / 2.0
        if (1.0 - q ** n) / (1.0 - q) > dst // 2:  # 1 + q + ... + q^(n-1)
            hi = q
        else:
            lo = q
    right = torch.tensor([q ** i for i in range(n)], dtype=torch.float64).cumsum(0)
    return torch.cat([-right.flip(0), torch.zeros(1, dtype=torch.float64), right])


def cubic_spline_weights(knots: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """The matrix W [len(points), len(knots)] with ``W @ z`` = the not-a-knot cubic spline through
    ``(knots[i], z[i])`` at ``points``, each point first clamped to ``[knots[0], knots[-1]]``.

    This is what the published ``scipy.interpolate.interp2d(..., kind="cubic")`` computes on a grid, one axis
    after the other: an interpolating bicubic spline whose interior knots skip the second and the
    second-to-last data points (not-a-knot), evaluated at the nearest edge outside the data. With the
    moments m_i = S''(knots[i]) and h_i = knots[i+1] - knots[i], on [knots[i], knots[i+1]]

        S(t) = m_i a^3 / (6 h_i) + m_(i+1) b^3 / (6 h_i) + (z_i / h_i - m_i h_i / 6) a
               + (z_(i+1) / h_i - m_(i+1) h_i / 6) b,      a = knots[i+1] - t,  b = t - knots[i];

    the moments make S' continuous at the interior knots and S''' continuous at the second and the
    second-to-last knots (not-a-knot). Three knots: the parabola through them; two: the line; one: the
    constant. Float64."""
    x = knots.double()
    t = points.double().clamp(x[0], x[-1])
    n = len(x)
    if n == 1:
        return torch.ones(len(t), 1, dtype=torch.float64)
    h = x[1:] - x[:-1]
    if n == 2:
        moments = torch.zeros(2, 2, dtype=torch.float64)  # m = moments @ z
    else:
        a = torch.zeros(n, n, dtype=torch.float64)
        b = torch.zeros(n, n, dtype=torch.float64)
        for i in range(1, n - 1):  # S' continuous at x_i
            a[i, i - 1], a[i, i], a[i, i + 1] = h[i - 1], 2 * (h[i - 1] + h[i]), h[i]
            b[i, i - 1], b[i, i], b[i, i + 1] = 6 / h[i - 1], -6 / h[i - 1] - 6 / h[i], 6 / h[i]
        if n == 3:  # one parabola: equal moments
            a[0, 0], a[0, 1] = 1.0, -1.0
            a[2, 1], a[2, 2] = 1.0, -1.0
        else:  # S''' continuous at x_1 and at x_(n-2)
            a[0, 0], a[0, 1], a[0, 2] = h[1], -(h[0] + h[1]), h[0]
            a[-1, -3], a[-1, -2], a[-1, -1] = h[-1], -(h[-2] + h[-1]), h[-2]
        moments = torch.linalg.solve(a, b)
    i = (torch.searchsorted(x, t, right=True) - 1).clamp(0, n - 2)
    hi = h[i]
    left, right = x[i + 1] - t, t - x[i]
    rows = torch.arange(len(t))
    on_z = torch.zeros(len(t), n, dtype=torch.float64)
    on_z[rows, i] = left / hi
    on_z[rows, i + 1] += right / hi
    on_m = torch.zeros(len(t), n, dtype=torch.float64)
    on_m[rows, i] = left ** 3 / (6 * hi) - left * hi / 6
    on_m[rows, i + 1] += right ** 3 / (6 * hi) - right * hi / 6
    return on_z + on_m @ moments


def resize_relative_position_bias_table(table: torch.Tensor, old_grid: Grid, new_grid: Grid,
                                        cls_token: bool = True) -> torch.Tensor:
    """Resample a table for a new patch grid (e.g. fine-tuning at another resolution), as the published
    ``utils.py`` does when a checkpoint's table has another size.

    The (2H-1) x (2W-1) block of offsets is an image with one channel per head. Its offsets are placed on
    the new grid's axes by :func:`geometric_positions` (each axis on its own, an axis that keeps its size
    kept as it is: the published code handles square tables only, and resamples only when the size changes)
    and the image is resampled at the new integer offsets ``-(new // 2) .. new // 2`` by
    the not-a-knot bicubic spline of the published ``interp2d(kind="cubic")`` (:func:`cubic_spline_weights`;
    SciPy has since removed ``interp2d``; timm's ``resize_rel_pos_bias_table`` builds the same grid but
    interpolates linearly without SciPy). The 3 class-token rows are kept as they are.
    """
    old_h, old_w = old_grid
    new_h, new_w = new_grid
    n_old = (2 * old_h - 1) * (2 * old_w - 1)
    expected = n_old + (3 if cls_token else 0)
    if table.shape[0] != expected:
        raise ValueError(f"table has {table.shape[0]} rows, grid {tuple(old_grid)} needs {expected}")
    if tuple(old_grid) == tuple(new_grid):
        return table.clone()
    patch, extra = table[:n_old], table[n_old:]
    weights = []
    for old, new in ((old_h, new_h), (old_w, new_w)):
        src, dst = 2 * old - 1, 2 * new - 1
        targets = torch.arange(-(dst // 2), dst // 2 + 1, dtype=torch.float64)
        weights.append(torch.eye(src, dtype=torch.float64) if src == dst else
                       cubic_spline_weights(geometric_positions(src, dst), targets))
    img = rearrange(patch.double(), "(y x) h -> h y x", y=2 * old_h - 1, x=2 * old_w - 1)
    img = torch.einsum("Yy,hyx,Xx->hYX", weights[0], img, weights[1])
    resized = rearrange(img, "h y x -> (y x) h").to(table.dtype)
    return torch.cat([resized, extra], dim=0)
