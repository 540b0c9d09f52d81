"""The projection head g(.) of feature distillation (paper Sec. 3.1).

A 1x1 convolution maps the student's width C_s to the teacher's width C_t, token by token:

    g(s)[b, n, :] = weight[:, :, 0] @ s[b, n, :] + bias        (token maps [B, N, C_s])
    g(s)[b, :, y, x] = weight[:, :, 0] @ s[b, :, y, x] + bias  (CNN feature maps [B, C_s, H, W])

It is only used during distillation and thrown away before fine-tuning. The parameter is stored with
``nn.Conv1d``'s shape [C_t, C_s, 1] so the state-dict keys read ``proj.weight`` / ``proj.bias``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Projection(nn.Module):
    """g: R^{C_s} -> R^{C_t}, applied independently at every token / pixel."""

    def __init__(self, student_dim: int, teacher_dim: int) -> None:
        super().__init__()
        self.student_dim, self.teacher_dim = student_dim, teacher_dim
        self.proj = nn.Conv1d(student_dim, teacher_dim, kernel_size=1)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        weight, bias = self.proj.weight[:, :, 0], self.proj.bias
        if s.dim() == 3:  # [B, N, C_s] tokens: a linear layer on the last dim is the 1x1 conv
            if s.shape[-1] != self.student_dim:
                raise ValueError(f"Projection expects {self.student_dim} channels, got {s.shape[-1]}")
            return F.linear(s, weight.to(s.dtype), bias.to(s.dtype))
        if s.dim() == 4:  # [B, C_s, H, W] feature map of a CNN student
            if s.shape[1] != self.student_dim:
                raise ValueError(f"Projection expects {self.student_dim} channels, got {s.shape[1]}")
            return F.conv2d(s, weight[:, :, None, None].to(s.dtype), bias.to(s.dtype))
        raise ValueError(f"Projection takes [B, N, C] or [B, C, H, W], got shape {tuple(s.shape)}")
