"""Window mechanics and plain layers shared by the two independent references of the published Swin networks
(tests only): ``tests/swin_reference.py`` (Swin, the EsViT teacher) and ``tests/swinv2_reference.py`` (SwinV2,
the student). Both published files (``models/swin_transformer.py``, ``models/swin_transformer_v2.py``) cut
windows, index the relative positions and mask shifted windows the same way; no timm, no fd_ref.

Each reference imports these names into its own namespace and calls them from there, so a test can replace
one of them in that reference (``monkeypatch.setattr(ref, "shift_mask", ...)``) and show that parity breaks.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

MASKED = -100.0  # the logit added between two tokens of a shifted window that come from different regions


def window_and_shift(res: int, window: int, shifted: bool) -> tuple[int, int]:
    """A block's (window, shift) on a res x res map: a map no larger than the window is one window, unshifted."""
    if res <= window:
        return res, 0
    return window, window // 2 if shifted else 0


def relative_index(w: int) -> torch.Tensor:
    """[w*w, w*w]: the table row of the pair (p, q), from their offset (dy, dx) = pos(p) - pos(q)."""
    ys, xs = torch.arange(w).repeat_interleave(w), torch.arange(w).repeat(w)  # row-major token positions
    dy, dx = ys[:, None] - ys[None, :], xs[:, None] - xs[None, :]
    return (dy + w - 1) * (2 * w - 1) + (dx + w - 1)


def to_windows(x: torch.Tensor, w: int) -> torch.Tensor:
    """[B, H, W, C] -> [B * nW, w * w, C]: windows row-major (batch outermost), tokens row-major inside."""
    B, H, W, C = x.shape
    x = x.reshape(B, H // w, w, W // w, w, C).transpose(2, 3)
    return x.reshape(-1, w * w, C)


def from_windows(win: torch.Tensor, w: int, H: int, W: int) -> torch.Tensor:
    """Inverse of :func:`to_windows`."""
    C = win.shape[-1]
    x = win.reshape(-1, H // w, W // w, w, w, C).transpose(2, 3)
    return x.reshape(-1, H, W, C)


def shift_mask(H: int, W: int, w: int, s: int) -> torch.Tensor:
    """[nW, w*w, w*w]: 0 where two tokens of a window lie in the same region of the rolled map, else MASKED."""
    def band(n: int) -> torch.Tensor:
        i = torch.arange(n)
        return (i >= n - w).long() + (i >= n - s).long()  # 0, 1, 2 for [0, n-w), [n-w, n-s), [n-s, n)
    region = (3 * band(H)[:, None] + band(W)[None, :]).float()[None, :, :, None]
    r = to_windows(region, w).squeeze(-1)                                       # [nW, w*w]
    return torch.where(r[:, :, None] == r[:, None, :], 0.0, MASKED)


def mask_windows_column_major(right: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """A wrong ``shift_mask`` for the negative tests: the mask of window (i, j) given to window (j, i)."""
    def wrong(H: int, W: int, w: int, s: int) -> torch.Tensor:
        m = right(H, W, w, s)
        return m.reshape(H // w, W // w, w * w, w * w).transpose(0, 1).reshape(m.shape)
    return wrong


class Mlp(nn.Module):
    """``fc2(gelu(fc1(x)))``, hidden width 4C (both published networks' MLP, mlp_ratio 4)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class PatchEmbed(nn.Module):
    """``proj`` (Conv2d, kernel = stride = patch), then ``norm`` (LayerNorm): [B, 3, S, S] -> [B, H, W, C]."""

    def __init__(self, patch: int, dim: int) -> None:
        super().__init__()
        self.proj, self.norm = nn.Conv2d(3, dim, patch, stride=patch), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class Stage(nn.Module):
    """Its blocks, then (``downsample``, None in the last stage) the merging into the next stage: the published
    layout, merging at the END of stage i (``layers.{i}.downsample``)."""

    def __init__(self, blocks: Sequence[nn.Module], downsample: Optional[nn.Module]) -> None:
        super().__init__()
        self.blocks, self.downsample = nn.ModuleList(blocks), downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x) if self.downsample is not None else x


def build_stages(embed_dim: int, depths: Sequence[int], num_heads: Sequence[int], res: int,
                 block: Callable[[int, int, int, int], nn.Module],
                 merging: Callable[[int], nn.Module]) -> nn.ModuleList:
    """``layers``: stage i (width ``embed_dim * 2**i`` on a ``res // 2**i`` map) holds ``block(dim, heads, map, j)``
    for its blocks j, then ``merging(dim)`` into stage i + 1 (not in the last stage)."""
    n = len(depths)
    return nn.ModuleList(
        Stage([block(embed_dim * 2 ** i, num_heads[i], res // 2 ** i, j) for j in range(depths[i])],
              merging(embed_dim * 2 ** i) if i < n - 1 else None) for i in range(n))
