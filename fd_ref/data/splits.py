"""Train / validation datasets for the scripts, with validation carved out of a training folder when
no separate split exists (CIFAR-10's training zip: the test split is reserved, so validation is a
fixed-seed hold-out of train and is never trained on, by distillation or fine-tuning).

    order = randperm(len(folder), split_seed);  val = sorted(order[-val_split:]);  train = sorted(order[:-val_split])
    train_subset > 0 keeps a fixed random subset of train: the positions sorted(o[-train_subset:]) of train,
    o = randperm(len(train), split_seed + 1) (the same rule as the hold-out, seeded one further).

An unreadable file of a folder's (or shards') split is replaced by the next readable file of the same split
(fd_ref.data.images.FolderSubset): training never sees a held-out image in its place.
"""
from __future__ import annotations

import os
from typing import Optional

from torch.utils.data import Dataset, Subset

from fd_ref.data.datasets import build_dataset, split_indices
from fd_ref.data.images import FolderSubset, RobustImageFolder
from fd_ref.data.shards import ShardDataset, has_val_shards
from fd_ref.errors import UserError


def _has_val_folder(data: str) -> bool:
    return (os.path.isdir(data) and os.path.isdir(os.path.join(data, "val"))) or has_val_shards(data)


def train_val_datasets(data: str, train_transform, val_transform, *, val_split: int = 0,
                       split_seed: int = 0, train_subset: int = 0, need_val: bool = True,
                       synthetic_size: int = 1024, img_size: int = 32, seed: int = 0,
                       in_memory: bool = False) -> tuple[Dataset, Optional[Dataset]]:
    kw = dict(synthetic_size=synthetic_size, synthetic_image_size=img_size, seed=seed, in_memory=in_memory)
    builtin = data.strip().lower() in ("synthetic", "cifar10", "cifar100")
    train = build_dataset(data, train=True, transform=train_transform, **kw)
    val: Optional[Dataset] = None
    if val_split > 0:
        if len(train) <= val_split:
            raise UserError(f"--val-split {val_split} leaves no training images out of {len(train)}")
        train_idx, val_idx = split_indices(len(train), val_split, split_seed)
        if need_val:
            val = _subset(build_dataset(data, train=True, transform=val_transform, **kw), val_idx)
        train = _subset(train, train_idx)
    elif need_val:
        if not builtin and not _has_val_folder(data):
            raise UserError(f"{data} has no val/ folder; pass --val-split N to hold out N training images")
        val = build_dataset(data, train=False, transform=val_transform, **kw)
    if 0 < train_subset < len(train):
        _, keep = split_indices(len(train), train_subset, split_seed + 1)  # a fixed random subset
        if isinstance(train, Subset):
            train = _subset(train.dataset, [train.indices[i] for i in keep])
        else:
            train = _subset(train, keep)
    return train, val


def _subset(dataset: Dataset, indices: list[int]) -> Subset:
    """A folder's (or shards') split replaces a bad file from within the split (:class:`FolderSubset`)."""
    robust = isinstance(dataset, (RobustImageFolder, ShardDataset))
    return FolderSubset(dataset, indices) if robust else Subset(dataset, indices)


def class_count(dataset: Dataset) -> int:
    """The number of classes a (possibly subset) dataset names; 0 when it names none."""
    base = dataset.dataset if isinstance(dataset, Subset) else dataset
    return len(getattr(base, "classes", None) or [])
