"""The Vision Transformer used as FD student (and fine-tuned afterwards), paper Sec. 3.1 and 4.1.

A ViT in the BEiT style, which the paper adopts for its students:

- patch embedding (a stride-``patch_size`` convolution) and a class token;
- position information from a relative position bias, ``pos_embed="shared_rpb"`` (one table for the
  whole network, the FD default), ``"rpb"`` (one table per block, what a fine-tuned FD student becomes)
  or ``"abs"`` (a learned absolute embedding, for the ablation);
- pre-norm blocks ``x = x + drop_path(ls1 * attn(norm1(x)))``, ``x = x + drop_path(ls2 * mlp(norm2(x)))``
  with layer scale ``ls`` initialised at 0.1, LayerNorm eps 1e-6 and a bias on q and v but not on k;
- a final LayerNorm ``norm`` over all tokens (class token kept) whose output is the feature map FD
  distils into; for classification either the class token (``global_pool="cls"``) or the mean of the
  patch tokens followed by ``fc_norm`` (``global_pool="avg"``, the FD fine-tuning recipe; ``norm`` is then
  the identity, as in BEiT), then a linear ``head``.

Options that make the same class hold the published *baseline* networks too (timm DeiT / DINO / OpenAI
CLIP ViTs, fine-tuned as the paper's "teacher fine-tuned" rows): ``layer_scale_init=None`` (no layer
scale), ``pos_embed="abs"``, ``pre_norm=True`` (CLIP's ``norm_pre``, a LayerNorm on the embedded tokens
before the first block), ``act_layer="quick_gelu"`` (CLIP's MLP activation ``x * sigmoid(1.702 x)``),
``ln_eps=1e-5`` (CLIP's LayerNorm eps) and ``patch_bias=False`` (CLIP's patch embedding has no bias).
A k bias is never needed: it adds ``q_i . b_k`` to every logit of query i, which the softmax cancels.

Initialisation (the published FD student, ``models/vision_transformer.py`` plus the FD subclass's
``_trunc_normal_`` in ``models/feature_distillation.py``), see ``VisionTransformer._init_weights``::

    w ~ N(0, 0.02^2) truncated to [-0.02, 0.02]     Linear and Conv2d weights, class token, pos_embed
    b = 0, LayerNorm (1, 0), q_bias = v_bias = 0, relative position bias tables = 0, gamma = init
    blocks[i].attn.proj.weight /= sqrt(2 * layer_id),  blocks[i].mlp.fc2.weight /= sqrt(2 * layer_id),
                                                       layer_id = i + 1
    head.weight ~ N(0, 0.02^2) * head_init_scale (the fine-tuning head, x0.001), head.bias = 0

Attention (per head h, tokens i, j)::

    attn[h, i, j] = softmax_j(q[h, i] . k[h, j] * scale + bias[h, i, j]),   scale = head_dim ** -0.5
    out[h, i]     = sum_j attn[h, i, j] v[h, j]

computed by one of three kernels (:mod:`fd_ref.models.attention`, ``set_attention_kernel``): FlexAttention
with ``bias[h, i, j] = table[index[i, j], h]`` gathered inside the kernel (the default on a CUDA GPU), or
``scaled_dot_product_attention`` with ``bias`` as an additive mask (fused path), or the explicit formula
above (plain path): taken when ``attn`` is returned (the diagnostics), for training with a trainable bias on
the CPU and for bf16 on the CPU, where it measured faster (:class:`Attention`), and everywhere with
``set_fused_attn(False)`` or ``set_attention_kernel("explicit")``. Every path builds the qkv bias
``[q_bias, 0, v_bias]`` per call.
State-dict keys are clean and stable: ``patch_embed.proj``, ``cls_token``, ``rel_pos_bias.table``,
``blocks.{i}.attn.qkv``, ``blocks.{i}.attn.q_bias``, ``blocks.{i}.attn.v_bias``, ``blocks.{i}.ls1.gamma``,
``blocks.{i}.mlp.fc1``, ``norm``, ``fc_norm``, ``head``.
"""
from __future__ import annotations

from typing import Literal, Optional, Union

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint

from fd_ref.method.drop_path import DropPath, add_branch, drop_path_rates
from fd_ref.method.position import Grid, RelativePositionBias, as_table, bias_score_mod, gather_bias
from fd_ref.models.attention import check_kernel, flex_attention, resolve_kernel

# A shared position bias as handed to the blocks: dense [heads, N, N], or its (table, index) pair.
SharedBias = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]

PosEmbed = Literal["shared_rpb", "rpb", "abs"]
Activation = Literal["gelu", "quick_gelu"]
LN_EPS = 1e-6
INIT_STD = 0.02


def trunc_normal_at_std_(tensor: torch.Tensor, std: float = INIT_STD) -> torch.Tensor:
    """In place: ``tensor ~ N(0, std^2)`` truncated to ``[-std, std]`` (the FD student's ``_trunc_normal_``).

    The truncation at one standard deviation shrinks the effective standard deviation to
    ``std * sqrt(1 - 2 phi(1) / (2 Phi(1) - 1))``, about ``0.5396 * std`` (0.0108 for std 0.02)."""
    return nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=-std, b=std)


class PatchEmbed(nn.Module):
    """[B, 3, H*P, W*P] image -> [B, H*W, C] tokens through a P x P, stride-P convolution."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int, bias: bool = True) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"image size {img_size} is not a multiple of patch size {patch_size}")
        self.img_size, self.patch_size = img_size, patch_size
        self.grid: Grid = (img_size // patch_size, img_size // patch_size)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"expected {self.img_size}x{self.img_size} images, got {tuple(x.shape[-2:])}")
        return rearrange(self.proj(x), "b c h w -> b (h w) c")


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 grid: Optional[Grid] = None) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        # q and v get a bias, k does not (a bias on k would add the same logit to every key of a query
        # and cancel in the softmax).
        self.q_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        # Per-block relative position bias (pos_embed="rpb"); None when shared or absolute.
        self.rel_pos_bias = RelativePositionBias(grid, num_heads) if grid is not None else None
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        # auto | flex | sdpa | explicit (fd_ref.models.attention); the model sets every block's at once.
        self.kernel = "auto"
        # On the CPU, SDPA cannot differentiate a mask with its fused kernel and falls back to its math
        # kernel, the explicit formula with extra work. So training with a trainable bias on the CPU takes
        # the explicit formula even when ``fused``; False forces SDPA there too (measurements:
        # bench/README.md, "Attention paths on the CPU").
        self.explicit_on_cpu_training = True
        # On a CPU with native bf16, SDPA's CPU kernels in bf16 were slower than the explicit formula under
        # load and level with it on a quiet CPU (bench/README.md, "Attention paths on the CPU"). So bf16
        # attention on the CPU takes the explicit formula even when ``fused``; False forces SDPA there too.
        self.explicit_on_cpu_bf16 = True

    @property
    def fused(self) -> bool:
        """False: the explicit formula (``kernel="explicit"``); True: a fused kernel (``kernel="auto"``)."""
        return self.kernel != "explicit"

    @fused.setter
    def fused(self, enabled: bool) -> None:
        self.kernel = "auto" if enabled else "explicit"

    def _qkv_bias(self) -> Optional[torch.Tensor]:
        if self.q_bias is None:
            return None
        return torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])

    def forward(self, x: torch.Tensor, shared_bias: Optional[SharedBias] = None,
                return_attn: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``shared_bias``: the network's shared bias, dense [heads, N, N] or as its ``(table, index)``
        (what the model hands over when the pass runs FlexAttention); either form works with every kernel."""
        qkv = F.linear(x, self.qkv.weight, self._qkv_bias())
        q, k, v = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        drop = self.attn_drop if self.training else 0.0
        kernel = "explicit" if return_attn else resolve_kernel(self.kernel, q.device, self.head_dim,
                                                                self.training and torch.is_grad_enabled())
        if kernel == "flex" and drop > 0:  # FlexAttention has no attention dropout
            kernel = "sdpa"
        if kernel == "flex":
            tables = [] if shared_bias is None else [shared_bias if isinstance(shared_bias, tuple)
                                                     else as_table(shared_bias)]
            if self.rel_pos_bias is not None:
                tables.append((self.rel_pos_bias.table, self.rel_pos_bias.index))
            out = flex_attention(q, k, v, bias_score_mod(*tables), self.scale)
            return self.proj(rearrange(out, "b h n d -> b n (h d)")), None
        bias = gather_bias(*shared_bias) if isinstance(shared_bias, tuple) else shared_bias
        if self.rel_pos_bias is not None:
            own = self.rel_pos_bias()
            bias = own if bias is None else bias + own
        attn = None
        fused = kernel != "explicit"
        if self.kernel == "auto" and q.device.type == "cpu":  # the CPU rules above (a forced sdpa skips them)
            if (self.explicit_on_cpu_training and self.training and bias is not None and bias.requires_grad
                    and torch.is_grad_enabled()):
                fused = False
            if self.explicit_on_cpu_bf16 and q.dtype == torch.bfloat16:
                fused = False
        if fused:
            mask = None if bias is None else bias.to(q.dtype).unsqueeze(0)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
        else:
            logits = (q * self.scale) @ k.transpose(-2, -1)
            if bias is not None:
                logits = logits + bias.to(logits.dtype)
            attn = logits.softmax(dim=-1)
            out = F.dropout(attn, drop, self.training) @ v
        return self.proj(rearrange(out, "b h n d -> b n (h d)")), attn


class LayerScale(nn.Module):
    """x -> gamma * x with a learned per-channel gamma (initialised at ``init``, 0.1 for FD)."""

    def __init__(self, dim: int, init: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class QuickGELU(nn.Module):
    """OpenAI CLIP's activation: ``x * sigmoid(1.702 * x)`` (a cheap approximation of GELU; CLIP's weights
    were trained with it, so they must run with it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def activation(name: Activation) -> nn.Module:
    """``"gelu"``: exact GELU (the FD student, DeiT, DINO); ``"quick_gelu"``: :class:`QuickGELU` (CLIP)."""
    if name == "gelu":
        return nn.GELU()
    if name == "quick_gelu":
        return QuickGELU()
    raise ValueError(f"act_layer must be gelu or quick_gelu, got {name!r}")


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act_layer: Activation = "gelu") -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), activation(act_layer), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _gamma(layer_scale: nn.Module) -> Optional[torch.Tensor]:
    return layer_scale.gamma if isinstance(layer_scale, LayerScale) else None


class Block(nn.Module):
    """``x = x + drop_path1(ls1(attn(norm1(x))))``, ``x = x + drop_path2(ls2(mlp(norm2(x))))``. Each update is
    one fused op (:func:`fd_ref.method.drop_path.add_branch`); ``ls*`` and ``drop_path*`` stay modules for their
    parameters, state-dict keys and rates."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool,
                 layer_scale_init: Optional[float], drop_path: float, attn_drop: float,
                 grid: Optional[Grid], act_layer: Activation = "gelu", ln_eps: float = LN_EPS) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=ln_eps)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, grid)
        self.ls1 = LayerScale(dim, layer_scale_init) if layer_scale_init else nn.Identity()
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=ln_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer)
        self.ls2 = LayerScale(dim, layer_scale_init) if layer_scale_init else nn.Identity()
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor, shared_bias: Optional[SharedBias] = None,
                return_attn: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        y, attn = self.attn(self.norm1(x), shared_bias, return_attn)
        x = add_branch(x, y, _gamma(self.ls1), self.drop_path1.p, self.training)  # x + drop_path1(ls1(y))
        x = add_branch(x, self.mlp(self.norm2(x)), _gamma(self.ls2), self.drop_path2.p, self.training)
        return x, attn


class VisionTransformer(nn.Module):
    def __init__(self, img_size: int = 224, patch_size: int = 16, embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 layer_scale_init: Optional[float] = 0.1, drop_path_rate: float = 0.0,
                 pos_embed: PosEmbed = "shared_rpb", num_classes: int = 0,
                 global_pool: Literal["cls", "avg"] = "cls", in_chans: int = 3,
                 attn_drop: float = 0.0, head_init_scale: float = 0.001, act_layer: Activation = "gelu",
                 pre_norm: bool = False, ln_eps: float = LN_EPS, patch_bias: bool = True) -> None:
        super().__init__()
        # The constructor arguments, saved in checkpoints so a model can be rebuilt from its file.
        self.config = dict(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                           num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                           layer_scale_init=layer_scale_init, drop_path_rate=drop_path_rate,
                           pos_embed=pos_embed, num_classes=num_classes, global_pool=global_pool,
                           in_chans=in_chans, attn_drop=attn_drop, head_init_scale=head_init_scale,
                           act_layer=act_layer, pre_norm=pre_norm, ln_eps=ln_eps, patch_bias=patch_bias)
        if pos_embed not in ("shared_rpb", "rpb", "abs"):
            raise ValueError(f"pos_embed must be shared_rpb, rpb or abs, got {pos_embed!r}")
        if global_pool not in ("cls", "avg"):
            raise ValueError(f"global_pool must be cls or avg, got {global_pool!r}")
        self.embed_dim, self.depth, self.num_heads = embed_dim, depth, num_heads
        self.num_classes, self.global_pool, self.pos_embed_type = num_classes, global_pool, pos_embed
        self.num_prefix_tokens = 1
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, bias=patch_bias)
        self.grid, self.patch_size, self.img_size = self.patch_embed.grid, patch_size, img_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        n_tokens = self.grid[0] * self.grid[1] + 1
        self.pos_embed = nn.Parameter(torch.zeros(1, n_tokens, embed_dim)) if pos_embed == "abs" else None
        self.rel_pos_bias = RelativePositionBias(self.grid, num_heads) if pos_embed == "shared_rpb" else None
        self.norm_pre = nn.LayerNorm(embed_dim, eps=ln_eps) if pre_norm else nn.Identity()
        block_grid = self.grid if pos_embed == "rpb" else None
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, layer_scale_init, rate, attn_drop, block_grid,
                  act_layer, ln_eps)
            for rate in drop_path_rates(drop_path_rate, depth))
        self.norm = nn.LayerNorm(embed_dim, eps=ln_eps) if global_pool == "cls" else nn.Identity()
        self.fc_norm = nn.LayerNorm(embed_dim, eps=ln_eps) if global_pool == "avg" else nn.Identity()
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.grad_checkpointing = False
        self.attn_kernel = "auto"  # set_attention_kernel
        self._init_weights(head_init_scale)

    @torch.no_grad()
    def _init_weights(self, head_init_scale: float) -> None:
        """The published FD student's initialisation (module docstring), in the published order: every
        Linear / Conv2d weight, the class token and ``pos_embed`` ~ N(0, 0.02^2) cut at +-0.02, biases 0,
        LayerNorms (1, 0); then ``blocks[i].attn.proj.weight`` and ``blocks[i].mlp.fc2.weight`` divided by
        ``sqrt(2 * layer_id)``, ``layer_id = i + 1``. q/v biases, position bias tables (zeros) and layer
        scales (``layer_scale_init``) keep their constructor values, as published.

        The fine-tuning head is the published fine-tuning network's: N(0, 0.02^2) (cut at +-2, i.e. not
        truncated in practice) times ``head_init_scale``, bias 0."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                trunc_normal_at_std_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        trunc_normal_at_std_(self.cls_token)
        if self.pos_embed is not None:
            trunc_normal_at_std_(self.pos_embed)
        for i, block in enumerate(self.blocks):
            layer_id = i + 1
            block.attn.proj.weight.div_(math.sqrt(2.0 * layer_id))
            block.mlp.fc2.weight.div_(math.sqrt(2.0 * layer_id))
        if isinstance(self.head, nn.Linear):  # small classifier at the start of fine-tuning
            nn.init.trunc_normal_(self.head.weight, std=INIT_STD)
            nn.init.zeros_(self.head.bias)
            self.head.weight.mul_(head_init_scale)
            self.head.bias.mul_(head_init_scale)

    # -- switches ------------------------------------------------------------------------------------
    def set_fused_attn(self, enabled: bool) -> None:
        """Choose scaled_dot_product_attention (True) or the explicit softmax formula (False).

        With True, the CPU still uses the explicit formula for training with a trainable position bias and
        for bf16 attention, where it measured faster (``Attention.explicit_on_cpu_training``,
        ``Attention.explicit_on_cpu_bf16``)."""
        self.attn_kernel = "auto" if enabled else "explicit"
        for block in self.blocks:
            block.attn.fused = enabled

    def set_attention_kernel(self, kernel: str) -> None:
        """``auto`` (flex on a CUDA GPU that has it, else SDPA with the CPU rules), ``flex``, ``sdpa`` or
        ``explicit`` for every block (:mod:`fd_ref.models.attention`)."""
        self.attn_kernel = check_kernel(kernel)
        for block in self.blocks:
            block.attn.kernel = kernel

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of storing them."""
        self.grad_checkpointing = enabled

    # -- forward -------------------------------------------------------------------------------------
    def _tokens(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None,
                mask_token: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.patch_embed(x)
        if mask is not None:  # masked patches [B, N] -> the mask token (fd_ref.method.masking), as BEiT
            x = torch.where(mask.unsqueeze(-1), mask_token.to(x.dtype), x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        return self.norm_pre(x)

    def forward_features(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None,
                         mask_token: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Images [B, 3, H, W] -> every token after the final norm, [B, 1 + N, C] (class token first). With a
        ``mask`` [B, N] (bool), the masked patches enter the blocks as ``mask_token`` [C] instead."""
        x = self._tokens(x, mask, mask_token)
        bias = None
        if self.rel_pos_bias is not None:  # FlexAttention reads the table itself; else built once per pass
            kernel = resolve_kernel(self.attn_kernel, x.device, self.embed_dim // self.num_heads,
                                    self.training and torch.is_grad_enabled())
            rpb = self.rel_pos_bias
            bias = (rpb.table, rpb.index) if kernel == "flex" else rpb()
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x, _ = checkpoint(block, x, bias, use_reentrant=False)
            else:
                x, _ = block(x, bias)
        return self.norm(x)

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        """Pool the tokens (class token, or mean of patch tokens then fc_norm) and classify."""
        pooled = tokens[:, 0] if self.global_pool == "cls" else tokens[:, self.num_prefix_tokens:].mean(1)
        return self.head(self.fc_norm(pooled))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every block's attention probabilities, one [B, heads, 1 + N, 1 + N] tensor per block.

        Runs the plain (explicit softmax) path under no_grad; the class token is index 0. This is what
        ``fd_ref.analysis.diagnostics`` and ``analyze.py`` consume.
        """
        x = self._tokens(x)
        bias = self.rel_pos_bias() if self.rel_pos_bias is not None else None
        maps = []
        for block in self.blocks:
            x, attn = block(x, bias, return_attn=True)
            maps.append(attn)
        return maps


PRESETS: dict[str, dict] = {
    "vit_tiny": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "vit_small": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit_large": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "vit_large_patch14": dict(patch_size=14, embed_dim=1024, depth=24, num_heads=16),
}


def preset_arguments(name: str, **overrides) -> dict:
    """The constructor arguments of a preset (``vit_tiny`` / ``vit_small`` / ``vit_base`` /
    ``vit_large[_patch14]``) with every override that is not ``None`` applied on top."""
    if name not in PRESETS:
        from fd_ref.errors import UserError
        raise UserError(f"unknown model {name!r}; choose one of {', '.join(PRESETS)}")
    return {**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}}


def create_vit(name: str, **overrides) -> VisionTransformer:
    """Build a preset (see :func:`preset_arguments`); keyword arguments override any constructor argument
    (e.g. ``img_size=32, patch_size=4, depth=6``)."""
    return VisionTransformer(**preset_arguments(name, **overrides))
