"""Masked feature distillation: FD with the student's input partly masked (``--mask-ratio``, fd-ref's own).

FD (paper Sec. 3.1) is the mask ratio 0 point of one objective. MaskDistill (Peng et al. 2022, "A Unified
View of Masked Image Modeling", arXiv 2210.10615, Eq. 1) and EVA (Fang et al. 2022) let the student see a
*masked* image and regress the teacher's normalised features of the unmasked one. With a ratio r > 0, for
each image:

    count   = round(r * N)                                  N = H * W patch positions
    mask    = draw(H, W, count)                             [B, N] bool, exactly ``count`` True per image
    x_n     = mask_token if mask[n] else patch_embed(x)_n   before the class token and the blocks (BEiT)
    s       = student blocks + norm on [cls, x_1 .. x_N]    the whole grid kept: same position bias, same g
    pred    = projection(s)                                 [B, 1 + N, C_t]
    target  = norm(teacher(x))                              the teacher always sees the unmasked image
    loss    = loss(pred[keep], target[keep])                keep = [False, mask]   (over = "masked", MaskDistill)
            = loss(pred, target)                            every token, class token included   (over = "all")

``mask_token`` is one learnable vector [C] of the student's width, held here, not in the student, so the
backbone that fine-tuning, export, analysis and k-NN read has the same weights and keys as an FD student.

Masks (``style``):

    random  ``count`` positions drawn uniformly without replacement
    block   BEiT's block-wise masking (Bao et al. 2021, arXiv 2106.08254, Algorithm 1), parameters as BEiT's
            pre-training: rectangles are added until ``count`` is reached; each rectangle's area is drawn
            uniformly in [min_block, max(min_block, count - masked)], its aspect ratio h / w log-uniformly in
            [min_aspect, 1 / min_aspect], h = round(sqrt(area * aspect)), w = round(sqrt(area / aspect)),
            its corner uniformly among the positions that fit it strictly inside the grid (h < H, w < W, as
            BEiT); it is kept if h * w >= min_block, h / w is within the limits, and it adds between 1 and
            ``count - masked`` new positions; ``attempts`` tries per rectangle, and when a round of tries adds
            nothing, or the count is reached, the rectangles stop. Positions still missing are then drawn
            uniformly among the unmasked ones, so every image has exactly ``count`` masked patches.

The checks on the rounded rectangle (area >= min_block, aspect within the limits) and the top-up are
fd-ref's: BEiT applies its limits to the drawn area and aspect before rounding and lets a mask fall short.

Every draw comes from ``generator`` (default: torch's global generator, the run's seeded stream, whose
state checkpoint.pt keeps): a resumed run draws the masks the uninterrupted run draws. Imports torch only
(and this layer's losses and errors).
"""
from __future__ import annotations

import inspect
import math
from typing import Literal, Optional

import torch
import torch.nn as nn

from fd_ref.method.loss_options import distill_loss

MaskStyle = Literal["block", "random"]
MaskLoss = Literal["masked", "all"]
MASK_STYLES = ("block", "random")
MASK_LOSSES = ("masked", "all")
MIN_BLOCK = 16          # BEiT's --min_mask_patches_per_block
MIN_ASPECT = 0.3        # BEiT's aspect ratio range: 0.3 to 1 / 0.3
ATTEMPTS = 10           # BEiT's tries per rectangle
MASK_TOKEN_STD = 0.02   # BEiT's mask token initialisation, truncated normal


def mask_count(ratio: float, num_patches: int) -> int:
    """``round(ratio * num_patches)`` (Python's round: a half goes to the even neighbour): how many patches
    every image has masked."""
    return round(ratio * num_patches)


def random_mask(batch: int, grid: tuple[int, int], count: int,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """[batch, H*W] bool with ``count`` positions per row drawn uniformly without replacement."""
    n = grid[0] * grid[1]
    order = torch.rand(batch, n, generator=generator).argsort(dim=1)
    mask = torch.zeros(batch, n, dtype=torch.bool)
    return mask.scatter_(1, order[:, :count], True)


def block_rectangles(grid: tuple[int, int], count: int, generator: Optional[torch.Generator] = None,
                     min_block: int = MIN_BLOCK, min_aspect: float = MIN_ASPECT,
                     attempts: int = ATTEMPTS) -> tuple[torch.Tensor, list[tuple[int, int, int, int]]]:
    """The rectangle phase of block masking (module docstring) for one image: an [H, W] bool mask with at
    most ``count`` positions set and the rectangles ``(top, left, h, w)`` whose union it is."""
    height, width = grid
    mask = torch.zeros(height, width, dtype=torch.bool)
    log_low, log_high = math.log(min_aspect), -math.log(min_aspect)
    rectangles, masked = [], 0
    while masked < count:
        room = count - masked
        added = 0
        for _ in range(attempts):
            u_area, u_aspect, u_top, u_left = torch.rand(4, generator=generator).tolist()
            area = min_block + u_area * max(0, room - min_block)
            aspect = math.exp(log_low + u_aspect * (log_high - log_low))
            h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if not (h < height and w < width and h * w >= min_block and min_aspect <= h / w <= 1 / min_aspect):
                continue
            top, left = int(u_top * (height - h + 1)), int(u_left * (width - w + 1))
            new = h * w - int(mask[top:top + h, left:left + w].sum())
            if 0 < new <= room:
                mask[top:top + h, left:left + w] = True
                rectangles.append((top, left, h, w))
                added = new
                break
        if added == 0:
            break
        masked += added
    return mask, rectangles


def block_mask(batch: int, grid: tuple[int, int], count: int, generator: Optional[torch.Generator] = None,
               min_block: int = MIN_BLOCK, min_aspect: float = MIN_ASPECT, attempts: int = ATTEMPTS) -> torch.Tensor:
    """[batch, H*W] bool: BEiT-style rectangles, topped up with uniform positions to exactly ``count``."""
    rows = []
    for _ in range(batch):
        mask, _ = block_rectangles(grid, count, generator, min_block, min_aspect, attempts)
        mask = mask.flatten()
        short = count - int(mask.sum())
        if short > 0:
            free = (~mask).nonzero().squeeze(1)
            mask[free[torch.randperm(free.numel(), generator=generator)[:short]]] = True
        rows.append(mask)
    return torch.stack(rows)


def masked_distill_loss(name: str, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, over: MaskLoss,
                        beta: float = 2.0) -> torch.Tensor:
    """The loss ``name`` (fd_ref.method.loss_options) over the masked patch tokens only (``over="masked"``: their
    prefix tokens, the class token, count as unmasked) or over every token (``over="all"``).

    ``pred``, ``target``: [B, P + N, C]; ``mask``: [B, N] bool. Unselected tokens are not in the loss at all,
    so its gradient with respect to their predictions is exactly zero."""
    if over == "all":
        return distill_loss(name, pred, target, beta)
    if over != "masked":
        raise ValueError(f"mask loss must be one of {', '.join(MASK_LOSSES)}, got {over!r}")
    prefix = pred.shape[1] - mask.shape[1]
    keep = torch.cat([mask.new_zeros(mask.shape[0], prefix), mask], dim=1)
    return distill_loss(name, pred[keep], target[keep], beta)


class PatchMasking(nn.Module):
    """The learnable mask token and the masking settings of one student (module docstring).

    ``student`` must take the mask in ``forward_features(x, mask=..., mask_token=...)`` (fd_ref's ViT does;
    timm backbones do not and are refused). ``draw(batch)`` gives the masks of a batch on the CPU."""

    def __init__(self, student: nn.Module, ratio: float, style: MaskStyle = "block", over: MaskLoss = "masked") -> None:
        super().__init__()
        forward_features = getattr(student, "forward_features", None)
        if forward_features is None or "mask_token" not in inspect.signature(forward_features).parameters:
            raise ValueError(f"masking {ratio} of the patches needs fd-ref's ViT student (its forward_features "
                             f"takes a mask and a mask token); {type(student).__name__} has no mask-token interface")
        if style not in MASK_STYLES or over not in MASK_LOSSES:
            raise ValueError(f"the mask style must be one of {', '.join(MASK_STYLES)} and the mask loss one of "
                             f"{', '.join(MASK_LOSSES)}, got {style!r} and {over!r}")
        self.grid = tuple(student.grid)
        self.count = mask_count(ratio, self.grid[0] * self.grid[1])
        if not 0 < ratio <= 1 or self.count == 0:
            raise ValueError(f"the mask ratio must be in (0, 1] and mask at least one of the {self.grid[0]}x"
                             f"{self.grid[1]} patches, got {ratio}")
        self.ratio, self.style, self.over = ratio, style, over
        # one vector [C] (1-D, so the optimiser's rule leaves it without weight decay, as fd_ref.optim.groups
        # does for every mask token)
        self.mask_token = nn.Parameter(nn.init.trunc_normal_(torch.empty(student.embed_dim), std=MASK_TOKEN_STD))

    def draw(self, batch: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """[batch, H*W] bool masks, ``count`` True per row, from ``generator`` (default: torch's global one)."""
        if self.style == "random":
            return random_mask(batch, self.grid, self.count, generator)
        return block_mask(batch, self.grid, self.count, generator)

    def extra_repr(self) -> str:
        return f"ratio={self.ratio}, count={self.count}, grid={self.grid}, style={self.style}, loss={self.over}"
