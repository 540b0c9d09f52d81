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
import torch.nn.functional as F
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
        n = self.index.shape[0]
        bias = self.table[self.index.view(-1)]  # [N*N, heads]
        return rearrange(bias, "(i j) h -> h i j", i=n, j=n).contiguous()


def resize_relative_position_bias_table(table: torch.Tensor, old_grid: Grid, new_grid: Grid,
                                        cls_token: bool = True) -> torch.Tensor:
    """Resample a table for a new patch grid (e.g. fine-tuning at another resolution).

    The (2H-1) x (2W-1) block of offsets is treated as an image with one channel per head and resized
    bicubically (align_corners=True keeps the zero offset at the centre); the 3 class-token rows are kept
    as they are. The published code used SciPy's ``interp2d`` (removed from SciPy); a bicubic resize in
    torch plays the same role.
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
    img = rearrange(patch.float(), "(y x) h -> 1 h y x", y=2 * old_h - 1, x=2 * old_w - 1)
    # A new side of one offset holds only the zero offset; align_corners would sample the first (most
    # negative) offset there, so keep the old centre line instead.
    if new_h == 1:
        img = img[:, :, old_h - 1:old_h]
    if new_w == 1:
        img = img[:, :, :, old_w - 1:old_w]
    img = F.interpolate(img, size=(2 * new_h - 1, 2 * new_w - 1), mode="bicubic", align_corners=True)
    resized = rearrange(img, "1 h y x -> (y x) h").to(table.dtype)
    return torch.cat([resized, extra], dim=0)
