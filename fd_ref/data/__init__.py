"""Data: one import for the scripts and users, the pieces in their own modules.

* :mod:`fd_ref.data.datasets` -- :class:`SyntheticImages` (a tiny built-in, procedurally generated classification set
  so that every script runs, and learns something, with no download at all), :func:`build_dataset`
  (``synthetic`` / ``cifar10`` / ``cifar100`` / a folder path -> a ``Dataset``), :func:`split_indices`
  (fixed-seed hold-outs).
* :mod:`fd_ref.data.images` -- :class:`RobustImageFolder`, an ``ImageFolder`` that never crashes on a bad file and
  converts every image mode (grayscale, CMYK, palette, alpha, 16-bit) to 8-bit RGB correctly.
* :mod:`fd_ref.data.transforms` -- the transform pipelines (ending in normalised floats, or in uint8 images that
  :class:`DeviceNormalize` finishes on the device): distillation (Sec. 3 / App. A: RandomResizedCrop + flip +
  normalisation; teacher and student see the same crop because the model feeds one image to both),
  fine-tuning (timm's ``create_transform`` with the BEiT/FD recipe: RandAugment "rand-m9-mstd0.5-inc1",
  random erasing 0.25), linear probing (single-draw crop + flip) and evaluation (resize + centre crop), each
  as the published code builds it.
* :mod:`fd_ref.data.mixing` -- :func:`build_mixup` / :func:`build_criterion`: timm's Mixup/CutMix and fine-tuning
  losses.

Batching lives in :mod:`fd_ref.data.sampler`, train/validation splits of a ``--data`` value in :mod:`fd_ref.data.splits`.
"""
from fd_ref.data.datasets import SyntheticImages, build_dataset, split_indices
from fd_ref.data.images import IMAGE_EXTENSIONS, ImageSkipped, RobustImageFolder, Transform, load_rgb, to_rgb
from fd_ref.data.mixing import build_criterion, build_mixup
from fd_ref.data.transforms import (CLIP_MEAN, CLIP_STD, EVAL_NORMS, IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS,
                                    DeviceNormalize, SingleDrawResizedCrop, eval_transform, finetune_transform,
                                    pretrain_transform, probe_transform)

__all__ = ["CLIP_MEAN", "CLIP_STD", "DeviceNormalize", "EVAL_NORMS", "IMAGENET_MEAN", "IMAGENET_STD",
           "IMAGE_EXTENSIONS", "INTERPOLATIONS", "ImageSkipped", "RobustImageFolder", "SingleDrawResizedCrop",
           "SyntheticImages", "Transform", "build_criterion", "build_dataset", "build_mixup", "eval_transform", "finetune_transform",
           "load_rgb", "pretrain_transform", "probe_transform", "split_indices", "to_rgb"]
