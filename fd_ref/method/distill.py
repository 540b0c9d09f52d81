"""Feature distillation, the whole objective in one module (paper Sec. 3.1, Eq. 1 and Fig. 2).

For a batch of augmented images ``x`` (the same crop for both networks):

    t      = teacher(x)                 # [B, T, C_t], frozen, eval mode (no drop path), no_grad
    target = whiten(t)                  # per-token LayerNorm without affine (target_norm, fd_ref.method.target_norm)
    s      = student.forward_features(x) # [B, N + 1, C_s], train mode (drop path on)
    pred   = projection(s)              # 1x1 conv g: C_s -> C_t
    loss   = smooth_l1(pred, target, beta)   # beta = 2.0, mean over all elements (loss, fd_ref.method.loss_options)

Student and teacher meet on one token layout. Either side may be fd_ref's ViT, a timm ViT, a CNN or a
Swin (``fd_ref.models.timm_backbone``): every last feature map is read as tokens [B, P + H*W, C], P prefix
(class) tokens then the H x W map row-major (a CNN's [B, C, H, W] and Swin's NHWC [B, H, W, C] flattened;
CNNs and Swin have P = 0). The teacher's tokens are then matched to the student's layout by
:func:`match_token_grid`, before whitening:

    patches: the teacher's H_t x W_t map, viewed as a [B, C_t, H_t, W_t] image, resized bilinearly to the
             student's H_s x W_s (unchanged when the grids agree);
    prefix:  a student with a class token (P_s = 1) regresses the teacher's class token, or the mean of
             the teacher's patch tokens when the teacher has none (CNN, Swin); a student without one
             (P_s = 0: CNN, Swin) regresses the patch tokens only.

Per case (the 1x1 projection always maps C_s -> C_t, token by token):

    ViT student + ViT teacher, same grid      target = teacher tokens as they are           (the paper's runs)
    ViT student + ViT teacher, other grid     class token kept, patch map resized to the student's grid
    ViT student + CNN / Swin teacher          class token <- mean of the teacher's map, map resized
    CNN / Swin student + ViT teacher          teacher class token dropped, patch map resized
    CNN / Swin student + CNN / Swin teacher   map resized (e.g. SwinV2-B 7x7 <- EsViT Swin-B 7x7: as is)

The distillation target (``target``; FD distils the full feature map, Sec. 3.1; the
other two are the paper's ablation of the distillation target), with P_t / P_s the teacher's / student's numbers of prefix (class) tokens:

    full: pred = projection(s)                       target = whiten(t)                  [B, 1 + N, C_t]
    cls:  pred = projection(s[:, 0])                 target = whiten(t[:, 0])            [B, 1, C_t]  (P_s = 1)
    avg:  pred = projection(mean_n s[:, P_s + n])    target = whiten(mean_n t[:, P_t + n]) [B, 1, C_t]

``avg`` pools the patch tokens only (class token excluded; the mean of the teacher's own patches, before
any grid resize), on both sides; as the projection is linear, projecting the mean equals averaging the
projected tokens. The published code implements only ``full``; the definitions of ``cls`` and ``avg``
above are fd-ref's (the pooled vector is whitened like a token of the full map: a LayerNorm without affine
over its channels).
Whether the teacher's tokens are taken after or before its final norm is the teacher's setting
(``Teacher.feat_after_norm``).

With ``masking`` (fd_ref.method.masking, ``--mask-ratio r > 0``, fd-ref's own) the student sees the image
with a [B, N] ``mask`` of its patches replaced by a learnable mask token, and the loss covers the masked
positions only (or every token); without it, or with no ``mask`` given, the objective is FD's above.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Literal, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from fd_ref.method.loss_options import LOSSES, distill_loss
from fd_ref.method.masking import PatchMasking, masked_distill_loss
from fd_ref.method.projection import Projection
from fd_ref.method.target_norm import TARGET_NORMS, build_target_norm

Target = Literal["full", "cls", "avg"]
TARGETS = ("full", "cls", "avg")


class TeacherLike(Protocol):
    """What the objective needs of a teacher (fd_ref.models.teachers.Teacher is one): a frozen module in eval
    mode mapping images to tokens [B, P + H*W, C] after its final norm, with its width, grid and number P of
    prefix (class) tokens."""

    embed_dim: int
    grid: tuple[int, int]
    num_prefix_tokens: int

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


def match_token_grid(t: torch.Tensor, teacher_grid: tuple[int, int], num_prefix_tokens: int,
                     student_grid: tuple[int, int], student_prefix_tokens: int = 1) -> torch.Tensor:
    """Teacher tokens [B, P_t + H_t*W_t, C] -> [B, P_s + H_s*W_s, C] (module docstring): with
    ``student_prefix_tokens`` 1 the class token first (the teacher's, or the mean of its patch tokens), with
    0 the resized patch tokens only."""
    if student_prefix_tokens not in (0, 1):
        raise ValueError(f"a student with {student_prefix_tokens} prefix tokens is not supported (0 or 1)")
    patches = t[:, num_prefix_tokens:]
    if tuple(teacher_grid) != tuple(student_grid):
        h, w = teacher_grid
        img = rearrange(patches, "b (h w) c -> b c h w", h=h, w=w)
        img = F.interpolate(img.float(), size=tuple(student_grid), mode="bilinear", align_corners=False)
        patches = rearrange(img, "b c h w -> b (h w) c").to(t.dtype)
    if student_prefix_tokens == 0:
        return patches
    cls = t[:, :1] if num_prefix_tokens > 0 else t[:, num_prefix_tokens:].mean(dim=1, keepdim=True)
    return torch.cat([cls, patches], dim=1)


class FeatureDistillation(nn.Module):
    """Student + projection trained to predict the whitened feature map of a frozen teacher.

    ``target_norm`` and ``loss`` choose among fd_ref.method.target_norm's normalisations (``none`` regresses
    the raw teacher features, the paper's ablation) and fd_ref.method.loss_options' losses (defaults:
    whitening and smooth-L1, the paper's); ``target`` chooses the full feature map (default), the class token
    or the average-pooled feature (module docstring). The teacher is a registered submodule (so
    ``.to(device)`` moves it) but stays frozen and in eval mode; checkpoints keep only ``student`` and
    ``projection`` (and ``target_norm``, whose only state is PHI-S's statistics, and ``masking``'s mask token
    when there is one). A setting out of range is a ``ValueError`` in plain words (the scripts name their
    flags).
    """

    def __init__(self, student: nn.Module, teacher: TeacherLike, beta: float = 2.0, target: Target = "full",
                 target_norm: str = "whiten", loss: str = "smooth_l1",
                 masking: PatchMasking | None = None) -> None:
        super().__init__()
        if target_norm not in TARGET_NORMS:
            raise ValueError(f"the target normalisation must be one of {', '.join(TARGET_NORMS)}, got {target_norm!r}")
        if loss not in LOSSES:
            raise ValueError(f"the loss must be one of {', '.join(LOSSES)}, got {loss!r}")
        if target not in TARGETS:
            raise ValueError(f"the distillation target must be one of {', '.join(TARGETS)}, got {target!r}")
        if target == "cls" and getattr(student, "num_prefix_tokens", 1) == 0:
            raise ValueError("the distillation target cls needs a student with a class token; this student "
                             "(a CNN or Swin) has none: distil the full map or the average instead")
        if masking is not None and target != "full":
            raise ValueError(f"masking needs the full feature map as the target (the masked positions' tokens), "
                             f"got the target {target!r}")
        self.student, self.teacher, self.masking = student, teacher, masking
        self.projection = Projection(student.embed_dim, teacher.embed_dim)
        self.beta, self.target, self.loss = beta, target, loss
        self.set_target_norm(target_norm)

    def set_target_norm(self, name: str) -> None:
        """Normalise the targets with ``name`` (fd_ref.method.target_norm.TARGET_NORMS) from now on."""
        try:
            self.target_norm = build_target_norm(name, self.teacher.embed_dim)
        except ValueError as e:
            teacher = getattr(self.teacher, "name", "") or "teacher"
            raise ValueError(f"{teacher} ({self.teacher.embed_dim} channels): {e}") from None

    @torch.no_grad()
    def targets(self, images: torch.Tensor) -> torch.Tensor:
        """The normalised teacher tokens, in float32 even in a bf16 / fp16 run: a regression target carries
        no low-precision rounding (the normalisation runs outside autocast; whitening computes in float32)."""
        t = self.teacher_tokens(images)
        device = t.device.type
        with torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) else nullcontext():
            return self.target_norm(t)

    @torch.no_grad()
    def teacher_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher's side before normalisation: matched to the student's layout, or pooled."""
        t = self.teacher(images)  # in eval mode always (Teacher.train): no drop path, no dropout
        if self.target == "avg":
            t = t[:, self.teacher.num_prefix_tokens:].mean(dim=1, keepdim=True)
        else:
            t = match_token_grid(t, self.teacher.grid, self.teacher.num_prefix_tokens, self.student.grid,
                                 getattr(self.student, "num_prefix_tokens", 1))
            if self.target == "cls":
                t = t[:, :1]
        return t

    def student_tokens(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The student's side of the target: all tokens, the class token, or the mean patch token; with a
        ``mask`` [B, N], of the image whose masked patches are the mask token (``masking``)."""
        if mask is None:
            s = self.student.forward_features(images)
        else:
            s = self.student.forward_features(images, mask=mask, mask_token=self.masking.mask_token)
        if self.target == "cls":
            return s[:, :1]
        if self.target == "avg":
            return s[:, self.student.num_prefix_tokens:].mean(dim=1, keepdim=True)
        return s

    def loss_of(self, student_tokens: torch.Tensor, target: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """The loss of this teacher's target given the student's side (:meth:`student_tokens`); with a
        ``mask``, over the positions ``masking`` chooses."""
        if mask is None:
            return distill_loss(self.loss, self.projection(student_tokens), target, self.beta)
        return masked_distill_loss(self.loss, self.projection(student_tokens), target, mask, self.masking.over,
                                   self.beta)

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        target = self.targets(images)
        return self.loss_of(self.student_tokens(images, mask), target, mask)
