"""Several teachers at once (``train.py --teacher A B ...``): a thin layer over the paper's
single-teacher objective (:class:`fd_ref.method.distill.FeatureDistillation`), not a new one.

One student, K frozen teachers. Each teacher k keeps everything the single-teacher objective gives it: its
own 1x1 projection g_k (student width -> teacher k's width), its tokens brought to the student's grid by
``match_token_grid``, its own target normalisation (with its own PHI-S statistics) and the chosen loss.
The student runs once per batch; the loss is the weighted sum

    L = sum_k w_k * loss( g_k(s), norm_k(match(t_k)) )          (w_k: --teacher-weight, default 1 each)

so with one teacher of weight 1 it is FD's loss exactly. Teachers of different widths, grids and families
(ViT, CNN, Swin) mix freely: nothing is shared between them but the student's tokens. The RADIO family of
models (Ranzinger et al. 2024) trains a student on several teachers this way, with per-teacher heads.
A setting out of range is a ``ValueError`` in plain words (the scripts name their flags).
"""
from __future__ import annotations

import re
from typing import Sequence

import torch
import torch.nn as nn

from fd_ref.method.distill import FeatureDistillation, TeacherLike


def teacher_keys(names: Sequence[str]) -> list[str]:
    """One log key per teacher: ``loss_<k>_<name>`` with the name's non-alphanumerics as ``_``."""
    return [f"loss_{k}_" + re.sub(r"[^0-9A-Za-z]+", "_", name).strip("_") for k, name in enumerate(names)]


class MultiTeacherDistillation(nn.Module):
    """K :class:`FeatureDistillation` branches sharing one student (module docstring). ``options`` are
    FeatureDistillation's (``beta``, ``target``, ``target_norm``, ``loss``...), the same for every teacher.
    After each forward, :attr:`last_losses` holds each teacher's (unweighted) loss, for the log."""

    def __init__(self, student: nn.Module, teachers: Sequence[TeacherLike], weights: Sequence[float] | None = None,
                 **options) -> None:
        super().__init__()
        weights = [1.0] * len(teachers) if weights is None else [float(w) for w in weights]
        if len(weights) != len(teachers):
            raise ValueError(f"{len(teachers)} teachers but {len(weights)} weights: give one weight per "
                             f"teacher, in the same order")
        if not teachers or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"teacher weights must be >= 0 with a positive sum, got {weights}")
        self.student = student
        self.branches = nn.ModuleList(FeatureDistillation(student, t, **options) for t in teachers)
        self.weights = weights
        self.keys = teacher_keys([getattr(t, "name", "") or f"teacher{k}" for k, t in enumerate(teachers)])
        self.last_losses: dict[str, torch.Tensor] = {}

    @property
    def projections(self) -> nn.ModuleList:
        return nn.ModuleList(b.projection for b in self.branches)

    @property
    def target_norms(self) -> nn.ModuleList:
        return nn.ModuleList(b.target_norm for b in self.branches)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        targets = [b.targets(images) for b in self.branches]
        s = self.branches[0].student_tokens(images)  # the student once, whatever the number of teachers
        losses = [b.loss_of(s, t) for b, t in zip(self.branches, targets)]
        self.last_losses = {key: loss.detach() for key, loss in zip(self.keys, losses)}
        return sum(w * loss for w, loss in zip(self.weights, losses))
