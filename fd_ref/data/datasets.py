"""Datasets: :class:`SyntheticImages` (a tiny built-in, procedurally generated classification set, so that
every script runs and learns something with no download at all), :func:`build_dataset` (``synthetic`` /
``cifar10`` / ``cifar100`` / a folder path -> a ``Dataset``) and :func:`split_indices` (fixed-seed hold-outs).
Image loading lives in :mod:`fd_ref.data.images`, batching in :mod:`fd_ref.data.sampler`."""
from __future__ import annotations

import colorsys
import math
import os
import urllib.error
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from fd_ref.data.images import RobustImageFolder, Transform, class_folders
from fd_ref.data.shards import shard_dataset
from fd_ref.errors import UserError

# ---------------------------------------------------------------------------------------------------------
# Synthetic images
# ---------------------------------------------------------------------------------------------------------

_PATTERNS: tuple[str, ...] = ("vstripes", "hstripes", "checker", "rings")


class SyntheticImages(Dataset):
    """A deterministic, procedurally generated image classification set (no download needed).

    Class ``c`` fixes a *hue* (``c / num_classes`` of the colour wheel) and a *pattern* (vertical stripes,
    horizontal stripes, checkerboard or concentric rings, ``c % 4``), so classes with neighbouring hues
    differ in pattern. Each image then draws, from a
    generator seeded by ``(seed, index)``: the pattern's frequency and phase, the rings' centre, the
    colour's exact hue / saturation / value, a dark background colour, a randomly placed occluding
    rectangle and pixel noise. Class structure depends only on ``(c, num_classes)``, never on ``seed``, so
    sets built with different seeds share their classes but not their images. Both cues survive horizontal
    flips and crops, so a tiny ViT learns it well above chance in minutes on a CPU.

    Labels are ``index % num_classes`` (balanced). Items are ``(PIL RGB image, int label)``, or
    ``(transform(image), label)`` when a transform is given. Images are generated on the fly in
    ``__getitem__`` (numpy, well under a millisecond at 32 px).
    """

    def __init__(
        self,
        num_images: int,
        num_classes: int = 10,
        image_size: int = 32,
        seed: int = 0,
        transform: Transform | None = None,
    ) -> None:
        if num_images < 1:
            raise UserError(f"synthetic dataset needs at least 1 image, got {num_images}; pass a positive size")
        if num_classes < 2:
            raise UserError(f"synthetic dataset needs at least 2 classes, got {num_classes}; pass 2 or more")
        if image_size < 8:
            raise UserError(f"synthetic image size must be at least 8 pixels, got {image_size}; pass 8 or more")
        self.num_images = num_images
        self.num_classes = num_classes
        self.image_size = image_size
        self.seed = seed
        self.transform = transform
        self._hues = [c / num_classes for c in range(num_classes)]
        self.classes: list[str] = [
            f"{_PATTERNS[c % len(_PATTERNS)]}_hue{round(360 * self._hues[c]):03d}" for c in range(num_classes)
        ]

    def __len__(self) -> int:
        return self.num_images

    @property
    def targets(self) -> list[int]:
        """All labels, in index order (like torchvision datasets)."""
        return [i % self.num_classes for i in range(self.num_images)]

    def generate(self, index: int) -> tuple[Image.Image, int]:
        """Return image ``index`` and its label, before any transform."""
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} images")
        label = index % self.num_classes
        rng = np.random.default_rng([self.seed, index])
        s = self.image_size
        v, u = np.meshgrid(np.arange(s) / s, np.arange(s) / s, indexing="ij")  # rows (v), columns (u) in [0, 1)
        freq = rng.uniform(2.5, 4.5)  # cycles per image side
        phase = rng.uniform(0.0, 2 * math.pi, size=2)
        pattern = _PATTERNS[label % len(_PATTERNS)]
        if pattern == "vstripes":
            wave = np.sin(2 * math.pi * freq * u + phase[0])
        elif pattern == "hstripes":
            wave = np.sin(2 * math.pi * freq * v + phase[0])
        elif pattern == "checker":
            wave = np.sin(2 * math.pi * freq * u + phase[0]) * np.sin(2 * math.pi * freq * v + phase[1])
            wave = np.clip(2.0 * wave, -1.0, 1.0)
        else:  # rings around a random centre
            cu, cv = rng.uniform(0.2, 0.8, size=2)
            wave = np.sin(2 * math.pi * freq * np.hypot(u - cu, v - cv) + phase[0])
        weight = (0.5 + 0.5 * wave)[..., None]  # [s, s, 1] in [0, 1]

        hue = (self._hues[label] + rng.normal(0.0, 0.02)) % 1.0
        fg = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.7, 1.0)))
        bg = rng.uniform(0.0, 0.35) + rng.uniform(-0.05, 0.05, size=3)
        img = bg * (1.0 - weight) + fg * weight

        # A randomly placed occluder of random colour covering at most ~1/4 of the image.
        h, w = rng.integers(s // 8, s // 2 + 1, size=2)
        y0, x0 = rng.integers(0, s - h + 1), rng.integers(0, s - w + 1)
        img[y0:y0 + h, x0:x0 + w] = rng.uniform(0.0, 1.0, size=3)

        img = img + rng.normal(0.0, 0.06, size=img.shape)
        pixels = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(pixels, mode="RGB"), label

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, label = self.generate(index)
        return (self.transform(image) if self.transform is not None else image), label


# ---------------------------------------------------------------------------------------------------------
# Dataset factory and splits
# ---------------------------------------------------------------------------------------------------------

_CIFAR = {"cifar10": "CIFAR10", "cifar100": "CIFAR100"}


def _build_cifar(name: str, train: bool, transform: Transform | None, root_cache: Path) -> Dataset:
    import torchvision.datasets as tvd

    cls = getattr(tvd, _CIFAR[name])
    try:
        return cls(root=str(root_cache), train=train, transform=transform, download=False)
    except (RuntimeError, OSError):
        pass  # not downloaded yet
    try:
        return cls(root=str(root_cache), train=train, transform=transform, download=True)
    except (urllib.error.URLError, OSError, RuntimeError, ValueError) as err:
        raise UserError(
            f"could not download {name} into {root_cache} ({type(err).__name__}: {err}); when offline, pass an "
            "ImageFolder path (<root>/<class>/<image> or <root>/train + <root>/val) with --data instead"
        ) from err


def build_dataset(
    data: str,
    train: bool,
    transform: Transform | None,
    *,
    root_cache: str | os.PathLike[str] = "~/.cache/fd_ref",
    synthetic_size: int = 5000,
    synthetic_val_size: int | None = None,
    synthetic_classes: int = 10,
    synthetic_image_size: int = 32,
    seed: int = 0,
    verify: bool = False,
    in_memory: bool = False,
) -> Dataset:
    """Build the train (``train=True``) or validation dataset named by ``data``.

    ``data`` is one of

    * ``synthetic``: :class:`SyntheticImages` with ``synthetic_size`` training images and
      ``synthetic_val_size`` (default ``synthetic_size // 5``, at least 1) validation images. Train uses
      seed ``2 * seed`` and val ``2 * seed + 1``, so their images never coincide.
    * ``cifar10`` / ``cifar100``: torchvision's CIFAR, downloaded into ``root_cache`` if needed; failing
      to download (offline) raises :class:`UserError` pointing to ``--data <folder>``.
    * a folder path: if it has a ``train/`` sub-folder, ``train/`` is the training set and ``val/`` the
      validation set (ImageNet layout; both must have the same class folders). If it has ``train/`` but no
      ``val/``, or no ``train/`` at all, the one folder is returned for both, and the caller should carve a
      validation split with :func:`split_indices`. Folders are :class:`RobustImageFolder`\\ s (``verify``
      and ``in_memory`` are passed on).
    * shards (:mod:`fd_ref.data.shards`): a folder of ``train-*.tar`` (and ``val-*.tar``), a wids ``.json``
      description, or a brace pattern / URL of tar files -> a :class:`~fd_ref.data.shards.ShardDataset`
      (validation: the ``val`` shards, else the training shards, to be split as a folder's).

    The names ``synthetic``, ``cifar10``, ``cifar100`` (case-insensitive) win over same-named folders.
    """
    name = data.strip().lower()
    if name == "synthetic":
        if train:
            return SyntheticImages(synthetic_size, synthetic_classes, synthetic_image_size, 2 * seed, transform)
        val_size = synthetic_val_size if synthetic_val_size is not None else max(1, synthetic_size // 5)
        return SyntheticImages(val_size, synthetic_classes, synthetic_image_size, 2 * seed + 1, transform)
    if name in _CIFAR:
        return _build_cifar(name, train, transform, Path(root_cache).expanduser())

    shards = shard_dataset(data, train, transform)
    if shards is not None:
        return shards
    root = Path(data).expanduser()
    if not root.is_dir():
        raise UserError(
            f"--data {data!r} is neither synthetic, cifar10, cifar100, an existing folder nor tar shards; pass one of those"
        )
    train_dir, val_dir = root / "train", root / "val"
    if not train_dir.is_dir():
        return RobustImageFolder(root, transform, verify=verify, in_memory=in_memory)
    if train or not val_dir.is_dir():
        return RobustImageFolder(train_dir, transform, verify=verify, in_memory=in_memory)
    dataset = RobustImageFolder(val_dir, transform, verify=verify, in_memory=in_memory)
    if dataset.classes != class_folders(train_dir):
        raise UserError(
            f"{val_dir} and {train_dir} have different class folders, so their labels would not match; "
            "give both the same class sub-folders"
        )
    return dataset


def split_indices(n: int, val_size: int, seed: int) -> tuple[list[int], list[int]]:
    """Split ``range(n)`` into (train, val) index lists: shuffle with ``seed``, the last ``val_size`` are val.

    Deterministic for given arguments; the two lists are disjoint, cover ``range(n)`` and are each sorted.
    """
    if n < 0 or not 0 <= val_size <= n:
        raise UserError(f"cannot take {val_size} validation images out of {n}; pass a size between 0 and {n}")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator).tolist()
    return sorted(order[: n - val_size]), sorted(order[n - val_size:])
