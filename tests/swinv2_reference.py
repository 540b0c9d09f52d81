"""An independent reference of the SwinV2 student the published FD code trains (``SwinV2ForFD``; tests only).

Written from the facts of the published ``models/swin_transformer_v2.py`` and ``models/feature_distillation.py``
(``build_fd`` passes only the MODEL.SWIN values, so every other constructor argument is at its default:
``attn_type='cosine_mh'``, ``relative_coords_table_type='norm8_log'``, ``rpe_output_type='sigmoid'``,
``rpe_hidden_dim=512``, ``init_values=1e-5``, ``init_std=0.02``, ``fix_init=True``, no end norms, no MLP norm,
no shared bias, ``ape=False``, ``patch_norm=True``). No timm, no fd_ref; the state-dict keys are the published
ones (``rpe_mlp``, ``layers.i.downsample`` at the END of stage i, the persistent buffers).

- patch embedding: ``patch_embed.proj`` (Conv2d, kernel = stride = patch), then ``patch_embed.norm``;
- stage i (width ``embed_dim * 2**i`` on a ``res // 2**i`` map): its blocks, then (not in the last stage) the
  merging into stage i + 1: the 2 x 2 neighbours concatenated in the (row, col) order (0, 0), (1, 0), (0, 1),
  (1, 1), then ``reduction`` (Linear 4C -> 2C, no bias), THEN ``norm`` (LayerNorm over 2C);
- block j: shifted when j is odd (shift ``w // 2``); a map no larger than the window (``min(H, W) <= w``) is one
  window of side ``min(H, W)`` without shift (the bias MLP's coordinates then use that smaller window);
  residual post-norm: ``x = x + norm1(attn(x))``, ``x = x + norm2(fc2(gelu(fc1(x))))``;
- attention on each window: ``q, k, v = x W_qkv^T + (q_bias, 0, v_bias)`` (no k bias), split (3, heads, hd);
  ``logits = cos(q, k) * exp(min(logit_scale, log 100)) + 16 * sigmoid(B) + mask``;
- continuous position bias ``B``: ``rpe_mlp`` = Linear(2, 512) -> ReLU -> Linear(512, heads, no bias) on the
  table of offsets ``d`` in ``-(w-1) .. w-1`` (rows dy, columns dx), each ``t = 8 d / (w - 1)`` mapped to
  ``sign(t) log2(1 + |t|) / log2(8)``; pair (p, q) reads row ``(dy + w - 1)(2w - 1) + (dx + w - 1)``,
  ``(dy, dx) = pos(p) - pos(q)``;
- shifted windows: the map rolled by ``-s`` before the windows are cut and by ``+s`` after; on the rolled map the
  bands ``[0, H-w)``, ``[H-w, H-s)``, ``[H-s, H)`` of rows and of columns make 3 x 3 regions, two tokens of a
  window in different regions get -100;
- output of ``SwinV2ForFD.forward``: the last stage's tokens [B, H*W, C] after ``norm``; FD's projection is
  ``Conv1d(num_features, C_t, 1)`` on them.

Each convention lives in one module-level name, read when a model is built or run, so a test can swap one for a
wrong one and show that the parity then breaks. :func:`published_init` is the published initialisation.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from swin_windows import (Mlp, PatchEmbed, build_stages, from_windows, relative_index, shift_mask,
                          to_windows, window_and_shift)

MERGE_ORDER = ((0, 0), (1, 0), (0, 1), (1, 1))  # (row, col) offsets of the 2 x 2 neighbours, in concat order
MERGE_NORM_AFTER = True   # merging: reduction then norm (False: norm over 4C first, SwinV1's order)
ROLL = -1                 # the map is rolled by ROLL * s before the windows are cut, by -ROLL * s after
SHIFTED_PARITY = 1        # block j is shifted when j % 2 == SHIFTED_PARITY
POST_NORM = True          # x + norm(f(x)); False: x + f(norm(x))
COSINE = True             # cosine logits times the clamped logit scale; False: q k^T / sqrt(hd)
LOGIT_SCALE_MAX = math.log(1.0 / 0.01)  # None: no clamp
K_BIAS = False            # True: k gets v's bias as well (a wrong qkv bias)
CPB_LOG = True            # log-spaced coordinates; False: linear ones
CPB_GAIN = 16.0           # B = CPB_GAIN * sigmoid(mlp(table)); None: B = mlp(table)
CPB_DENOMINATOR = lambda w: w - 1  # noqa: E731 - the offsets are divided by this before the * 8
FINAL_NORM = True


def coords_table(w: int) -> torch.Tensor:
    """[2w-1, 2w-1, 2]: the bias MLP's input, (dy, dx) for every offset, normalised and log-spaced."""
    d = torch.arange(-(w - 1), w, dtype=torch.float32)
    t = torch.stack(torch.meshgrid(d, d, indexing="ij"), dim=-1) / CPB_DENOMINATOR(w) * 8.0
    return torch.sign(t) * torch.log2(t.abs() + 1.0) / math.log2(8.0) if CPB_LOG else t / 8.0


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, w: int) -> None:
        super().__init__()
        self.heads, self.w = heads, w
        self.logit_scale = nn.Parameter(torch.full((heads, 1, 1), math.log(10.0)))
        self.rpe_mlp = nn.Sequential(nn.Linear(2, 512), nn.ReLU(), nn.Linear(512, heads, bias=False))
        self.register_buffer("relative_coords_table", coords_table(w)[None])   # persistent in the release
        self.register_buffer("relative_position_index", relative_index(w))
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(dim)), nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def position_bias(self) -> torch.Tensor:
        """[heads, w*w, w*w]: B of the module docstring."""
        table = self.rpe_mlp(self.relative_coords_table).reshape(-1, self.heads)
        N = self.w * self.w
        bias = table[self.relative_position_index.reshape(-1)].reshape(N, N, self.heads).permute(2, 0, 1)
        return bias if CPB_GAIN is None else CPB_GAIN * torch.sigmoid(bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        n, N, C = x.shape
        k_bias = self.v_bias if K_BIAS else torch.zeros_like(self.v_bias)
        qkv = F.linear(x, self.qkv.weight, torch.cat([self.q_bias, k_bias, self.v_bias]))
        q, k, v = qkv.reshape(n, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        if COSINE:
            scale = self.logit_scale if LOGIT_SCALE_MAX is None else self.logit_scale.clamp(max=LOGIT_SCALE_MAX)
            logits = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1) * scale.exp()
        else:
            logits = q @ k.transpose(-2, -1) * (C // self.heads) ** -0.5
        logits = logits + self.position_bias()[None]
        if mask is not None:  # the same mask for window k of every image
            logits = (logits.reshape(-1, mask.shape[0], self.heads, N, N) + mask[None, :, None]).reshape(n, -1, N, N)
        out = logits.softmax(-1) @ v
        return self.proj(out.transpose(1, 2).reshape(n, N, C))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, res: int, window: int, shifted: bool) -> None:
        super().__init__()
        self.res = res
        self.w, self.s = window_and_shift(res, window, shifted)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn, self.mlp = Attention(dim, heads, self.w), Mlp(dim)
        self.register_buffer("attn_mask", shift_mask(res, res, self.w, self.s) if self.s else None)

    def window_attention(self, h: torch.Tensor) -> torch.Tensor:
        H = W = self.res
        if self.s:
            h = torch.roll(h, shifts=(ROLL * self.s, ROLL * self.s), dims=(1, 2))
        h = from_windows(self.attn(to_windows(h, self.w), self.attn_mask), self.w, H, W)
        if self.s:
            h = torch.roll(h, shifts=(-ROLL * self.s, -ROLL * self.s), dims=(1, 2))
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if POST_NORM:
            x = x + self.norm1(self.window_attention(x))
            return x + self.norm2(self.mlp(x))
        x = x + self.window_attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduction, self.norm = nn.Linear(4 * dim, 2 * dim, bias=False), nn.LayerNorm(2 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x[:, r::2, c::2, :] for r, c in MERGE_ORDER], dim=-1)
        if MERGE_NORM_AFTER:
            return self.norm(self.reduction(x))
        # the wrong order reuses the same parameters: plain normalisation over 4C, reduction, the affine part
        return self.reduction(F.layer_norm(x, x.shape[-1:])) * self.norm.weight + self.norm.bias


class SwinV2Reference(nn.Module):
    """``SwinV2ForFD``: ``forward(images)`` -> the last stage's tokens after ``norm``, [B, H*W, num_features]."""

    def __init__(self, img_size: int, patch_size: int, embed_dim: int, depths: tuple[int, ...],
                 num_heads: tuple[int, ...], window_size: int) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.layers = build_stages(embed_dim, depths, num_heads, img_size // patch_size,
                                   lambda dim, heads, res, j: Block(dim, heads, res, window_size,
                                                                    j % 2 == SHIFTED_PARITY),
                                   PatchMerging)
        self.num_features = embed_dim * 2 ** (len(depths) - 1)
        self.norm = nn.LayerNorm(self.num_features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images)
        for layer in self.layers:
            x = layer(x)
        x = x.flatten(1, 2)
        return self.norm(x) if FINAL_NORM else x


def published_init(model: SwinV2Reference, init_std: float = 0.02, init_values: float = 1e-5) -> None:
    """The published ``SwinTransformerV2.__init__`` initialisation, in its order:

    1. construction: ``logit_scale = log 10``, ``q_bias = v_bias = 0``;
    2. ``_init_weights`` on every module: Linear (all of them, the bias MLP's too) and Conv2d weights
       ``trunc_normal_(std=init_std)`` cut at +-2 (absolute, i.e. 100 std: uncut in effect), biases 0;
       LayerNorm weight 1, bias 0;
    3. ``fix_init_weight``: ``attn.proj.weight`` and ``mlp.fc2.weight`` of the b-th block (b = 1, 2, ... over all
       stages) divided by ``sqrt(2 b)``;
    4. ``_init_block_norm_weights``: every block's ``norm1`` / ``norm2`` weight ``init_values``, bias 0.
    """
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=init_std, a=-2.0, b=2.0)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.LayerNorm):
                m.weight.fill_(1.0), m.bias.zero_()
            elif isinstance(m, Attention):
                m.logit_scale.fill_(math.log(10.0)), m.q_bias.zero_(), m.v_bias.zero_()
        blocks = [block for layer in model.layers for block in layer.blocks]
        for b, block in enumerate(blocks, start=1):
            block.attn.proj.weight.div_(math.sqrt(2.0 * b))
            block.mlp.fc2.weight.div_(math.sqrt(2.0 * b))
        for block in blocks:
            for norm in (block.norm1, block.norm2):
                norm.weight.fill_(init_values), norm.bias.zero_()


def drop_path_rates(drop_path_rate: float, depths: tuple[int, ...]) -> list[float]:
    """Published schedule: ``linspace(0, drop_path_rate, sum(depths))``, one rate per block over all stages."""
    return torch.linspace(0, drop_path_rate, sum(depths)).tolist()
