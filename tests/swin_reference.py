"""An independent reference of the Swin the published FD code runs the EsViT teacher in (tests only).

Written from the facts of the published ``models/swin_transformer.py`` (Microsoft's Swin, vendored by FD) and
``models/esvit.py`` / ``models/feature_distillation.py`` (how FD loads and reads it); no timm, no fd_ref:

- patch embedding: ``patch_embed.proj`` (Conv2d, kernel = stride = patch) then ``patch_embed.norm`` (LayerNorm);
  no absolute position embedding;
- stage i (width ``embed_dim * 2**i``): its blocks, then, except in the last stage, the patch merging INTO the
  next stage (``layers.{i}.downsample``): the 2 x 2 neighbours concatenated in the order (row, col) =
  (0, 0), (1, 0), (0, 1), (1, 1), then ``norm`` (LayerNorm over 4C), then ``reduction`` (Linear 4C -> 2C, no bias);
- block j: window ``w``, shift ``w // 2`` for odd j; when the map is no larger than the window
  (``min(H, W) <= w``) the window becomes ``min(H, W)`` and the shift 0;
  ``x = x + proj(attn(roll(norm1(x), -s)))`` rolled back by ``+s``, then ``x = x + fc2(gelu(fc1(norm2(x))))``;
- windows: the map cut into ``w x w`` windows, windows in row-major order, tokens row-major inside a window;
- attention: ``softmax(q k^T * head_dim**-0.5 + B[index] + mask) v``; ``qkv`` splits as (3, heads, head_dim);
  the table ``relative_position_bias_table`` has ``(2w-1)**2`` rows, one column per head;
  ``index[p, q] = (dy + w - 1) * (2w - 1) + (dx + w - 1)`` with ``(dy, dx) = pos(p) - pos(q)``;
- the shifted-window mask: on the rolled map, rows ``[0, H-w)``, ``[H-w, H-s)``, ``[H-s, H)`` (and the same
  columns) form 3 x 3 regions; two tokens of a window in different regions get -100;
- ``norm``: LayerNorm over the last width; FD's teacher features are the last stage's tokens, after ``norm``
  when ``PRED_FEAT_AFTERNORM`` (``forward(x, after_norm)``); with ``PRED_FEAT_S3`` the network is built with
  three stages and the released ``norm`` is popped before a non-strict load (:func:`load_released`).

Each convention lives in one module-level name (``MERGE_ORDER``, ``ROLL``, ``QK_SCALE``, ``window_and_shift``,
``relative_index``, ``shift_mask``, ``to_windows`` / ``from_windows``), read when a model is built or run, so a
test can swap one for a wrong one and show that the parity then breaks.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from swin_windows import (Mlp, PatchEmbed, build_stages, from_windows, relative_index, shift_mask,
                          to_windows, window_and_shift)

MERGE_ORDER = ((0, 0), (1, 0), (0, 1), (1, 1))  # (row, col) offsets of the 2 x 2 neighbours, in concat order
ROLL = -1          # the map is rolled by ROLL * s before the windows are cut, by -ROLL * s after
QK_SCALE = None    # None: head_dim ** -0.5 (the published qk_scale=None)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, w: int) -> None:
        super().__init__()
        self.heads, self.w = heads, w
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * w - 1) ** 2, heads))
        self.register_buffer("relative_position_index", relative_index(w))  # stored in the release, too

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        n, N, C = x.shape
        q, k, v = self.qkv(x).reshape(n, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        logits = (q * (QK_SCALE or (C // self.heads) ** -0.5)) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        logits = logits + bias.reshape(N, N, self.heads).permute(2, 0, 1)[None]
        if mask is not None:  # the same mask for window k of every image
            logits = (logits.reshape(-1, mask.shape[0], self.heads, N, N) + mask[None, :, None]).reshape(n, -1, N, N)
        out = logits.softmax(-1) @ v                                             # [n, heads, N, hd]
        return self.proj(out.transpose(1, 2).reshape(n, N, C))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, res: int, window: int, shifted: bool) -> None:
        super().__init__()
        self.w, self.s = window_and_shift(res, window, shifted)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn, self.mlp = Attention(dim, heads, self.w), Mlp(dim)
        mask = shift_mask(res, res, self.w, self.s) if self.s else None
        self.register_buffer("attn_mask", mask, persistent=False)  # the EsViT release stores no mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        h = self.norm1(x)
        if self.s:
            h = torch.roll(h, shifts=(ROLL * self.s, ROLL * self.s), dims=(1, 2))
        h = from_windows(self.attn(to_windows(h, self.w), self.attn_mask), self.w, H, W)
        if self.s:
            h = torch.roll(h, shifts=(-ROLL * self.s, -ROLL * self.s), dims=(1, 2))
        x = x + h
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduction, self.norm = nn.Linear(4 * dim, 2 * dim, bias=False), nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x[:, r::2, c::2, :] for r, c in MERGE_ORDER], dim=-1)
        return self.reduction(self.norm(x))


class SwinReference(nn.Module):
    """FD's EsViT teacher network: ``forward(x, after_norm)`` -> the last stage's tokens [B, H*W, C]."""

    def __init__(self, img_size: int, patch_size: int, embed_dim: int, depths: tuple[int, ...],
                 num_heads: tuple[int, ...], window_size: int) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.layers = build_stages(embed_dim, depths, num_heads, img_size // patch_size,
                                   lambda dim, heads, res, j: Block(dim, heads, res, window_size, j % 2 == 1),
                                   PatchMerging)
        self.norm = nn.LayerNorm(embed_dim * 2 ** (len(depths) - 1))

    def forward_featuremap(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images)
        for layer in self.layers:
            x = layer(x)
        return x.flatten(1, 2)

    def forward(self, images: torch.Tensor, after_norm: bool = True) -> torch.Tensor:
        x = self.forward_featuremap(images)
        return self.norm(x) if after_norm else x


def load_released(model: SwinReference, blob: dict, pop_norm: bool) -> list[str]:
    """The published loader: ``blob["student"]``, ``module.`` removed, ``norm.*`` popped for S3, a non-strict
    load (keys the model lacks are skipped). Returns the model's keys left at their initial values."""
    state = {k.replace("module.", ""): v for k, v in blob["student"].items()}
    if pop_norm:
        state.pop("norm.weight"), state.pop("norm.bias")
    return model.load_state_dict(state, strict=False).missing_keys
