"""Estimating the statistics of ``--target-norm phi_s`` (fd_ref.method.target_norm.PhiS) before training.

    images  = a fixed random sample of ``num_images`` training images (seeded: every rank draws the same
              images and the same augmentations, so every rank estimates the same transform, and the
              training run's own random streams are left untouched)
    tokens  = each teacher's target tokens before normalisation (FeatureDistillation.teacher_tokens)
    PhiS.fit_moments(mean and covariance of those tokens)

Only teachers whose PHI-S is not estimated yet are run: a resumed run finds the statistics in
checkpoint.pt and estimates nothing.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Subset

from fd_ref.engine.precision import autocast
from fd_ref.method.distill import FeatureDistillation
from fd_ref.method.target_norm import Moments, PhiS


def fit_phi_s(branches: Sequence[FeatureDistillation], dataset, num_images: int, batch_size: int, seed: int,
              device: torch.device, precision: str = "fp32",
              normalize: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> int:
    """Estimate the PHI-S of every branch that needs it; returns the number of images used (0: none).
    ``normalize``: what the training step applies to the loader's images on the device (uint8 batches)."""
    todo = [b for b in branches if isinstance(b.target_norm, PhiS) and not b.target_norm.fitted]
    if not todo:
        return 0
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        picked = torch.randperm(len(dataset))[:max(1, num_images)].tolist()
        loader = DataLoader(Subset(dataset, picked), batch_size=batch_size, shuffle=False, num_workers=0)
        moments = [Moments(b.teacher.embed_dim) for b in todo]
        for batch in loader:
            images = batch[0].to(device)
            images = normalize(images) if normalize is not None else images
            with autocast(precision, device):
                for branch, m in zip(todo, moments):
                    m.add(branch.teacher_tokens(images))
    for branch, m in zip(todo, moments):
        branch.target_norm.fit_moments(m)
    return len(picked)
