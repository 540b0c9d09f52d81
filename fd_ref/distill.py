"""Feature distillation, the whole objective in one module (paper Sec. 3.1, Eq. 1 and Fig. 2).

For a batch of augmented images ``x`` (the same crop for both networks):

    t      = teacher(x)                 # [B, T, C_t], frozen, eval mode (no drop path), no_grad
    target = whiten(t)                  # per-token LayerNorm without affine
    s      = student.forward_features(x) # [B, N + 1, C_s], train mode (drop path on)
    pred   = projection(s)              # 1x1 conv g: C_s -> C_t
    loss   = smooth_l1(pred, target, beta)   # beta = 2.0, mean over all elements

When the token grids differ (another patch size or resolution), the teacher's patch map is resized to
the student's grid before whitening: its patch tokens, viewed as a [B, C_t, H_t, W_t] image, are
interpolated bilinearly to [H_s, W_s]; its class token is kept as the target of the student's class
token (a teacher without one contributes the mean of its patch tokens instead).

The distillation target (``target``; FD distils the full feature map, Sec. 3.1; the
other two are the paper's ablation of the distillation target), with P_t / P_s the teacher's / student's numbers of prefix (class) tokens:

    full: pred = projection(s)                       target = whiten(t)                  [B, 1 + N, C_t]
    cls:  pred = projection(s[:, 0])                 target = whiten(t[:, 0])            [B, 1, C_t]
    avg:  pred = projection(mean_n s[:, P_s + n])    target = whiten(mean_n t[:, P_t + n]) [B, 1, C_t]

``avg`` pools the patch tokens only (class token excluded; the mean of the teacher's own patches, before
any grid resize), on both sides; as the projection is linear, projecting the mean equals averaging the
projected tokens. The published code implements only ``full``; the definitions of ``cls`` and ``avg``
above are fd-ref's (the pooled vector is whitened like a token of the full map: a LayerNorm without affine
over its channels).
Whether the teacher's tokens are taken after or before its final norm is the teacher's setting
(``Teacher.feat_after_norm``).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from .loss import smooth_l1
from .projection import Projection
from .errors import UserError
from .teachers import Teacher
from .whitening import whiten

Target = Literal["full", "cls", "avg"]
TARGETS = ("full", "cls", "avg")


def match_token_grid(t: torch.Tensor, teacher_grid: tuple[int, int], num_prefix_tokens: int,
                     student_grid: tuple[int, int]) -> torch.Tensor:
    """Teacher tokens [B, P + H_t*W_t, C] -> [B, 1 + H_s*W_s, C] (class token first)."""
    cls = t[:, :1] if num_prefix_tokens > 0 else t.mean(dim=1, keepdim=True)
    patches = t[:, num_prefix_tokens:]
    if tuple(teacher_grid) != tuple(student_grid):
        h, w = teacher_grid
        img = rearrange(patches, "b (h w) c -> b c h w", h=h, w=w)
        img = F.interpolate(img.float(), size=tuple(student_grid), mode="bilinear", align_corners=False)
        patches = rearrange(img, "b c h w -> b (h w) c").to(t.dtype)
    return torch.cat([cls, patches], dim=1)


class FeatureDistillation(nn.Module):
    """Student + projection trained to predict the whitened feature map of a frozen teacher.

    ``whiten_target=False`` regresses the raw teacher features instead (the paper's ablation);
    ``target`` chooses the full feature map (default), the class token or the average-pooled feature
    (module docstring). The teacher is a registered submodule (so ``.to(device)`` moves it) but stays
    frozen and in eval mode; checkpoints keep only ``student`` and ``projection``.
    """

    def __init__(self, student: nn.Module, teacher: Teacher, beta: float = 2.0,
                 whiten_target: bool = True, target: Target = "full") -> None:
        super().__init__()
        if target not in TARGETS:
            raise UserError(f"distillation target must be one of {', '.join(TARGETS)}, got {target!r}")
        self.student, self.teacher = student, teacher
        self.projection = Projection(student.embed_dim, teacher.embed_dim)
        self.beta, self.whiten_target, self.target = beta, whiten_target, target

    @torch.no_grad()
    def targets(self, images: torch.Tensor) -> torch.Tensor:
        self.teacher.eval()
        t = self.teacher(images)
        if self.target == "avg":
            t = t[:, self.teacher.num_prefix_tokens:].mean(dim=1, keepdim=True)
        else:
            t = match_token_grid(t, self.teacher.grid, self.teacher.num_prefix_tokens, self.student.grid)
            if self.target == "cls":
                t = t[:, :1]
        return whiten(t) if self.whiten_target else t.float()

    def student_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The student's side of the target: all tokens, the class token, or the mean patch token."""
        s = self.student.forward_features(images)
        if self.target == "cls":
            return s[:, :1]
        if self.target == "avg":
            return s[:, self.student.num_prefix_tokens:].mean(dim=1, keepdim=True)
        return s

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        target = self.targets(images)
        pred = self.projection(self.student_tokens(images))
        return smooth_l1(pred, target, self.beta)
