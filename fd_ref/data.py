"""Datasets, transforms, Mixup/CutMix and the fine-tuning loss.

What lives here:

* :class:`SyntheticImages` -- a tiny built-in, procedurally generated classification set so that every
  script runs (and learns something) with no download at all.
* :class:`RobustImageFolder` -- an ``ImageFolder`` that never crashes on a bad file and converts every
  image mode (grayscale, CMYK, palette, alpha, 16-bit) to 8-bit RGB correctly.
* :func:`build_dataset` -- ``synthetic`` / ``cifar10`` / ``cifar100`` / a folder path -> a ``Dataset``.
* The transform pipelines: distillation (Sec. 3 / App. A: RandomResizedCrop + flip only, one crop shared
  by teacher and student), fine-tuning (timm's ``create_transform`` with the BEiT/FD recipe: RandAugment
  "rand-m9-mstd0.5-inc1", random erasing 0.25), linear probing (single-draw crop + flip) and evaluation
  (resize + centre crop), each as the published code builds it.
* :func:`build_mixup` / :func:`build_criterion`: timm's Mixup/CutMix and fine-tuning losses.
* :func:`split_indices` (fixed-seed hold-outs). Batching lives in :mod:`fd_ref.sampler`.
"""
from __future__ import annotations

import colorsys
import logging
import math
import os
import threading
import urllib.error
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2

from fd_ref.errors import UserError

log = logging.getLogger(__name__)

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: File name endings that :class:`RobustImageFolder` treats as images (case-insensitive).
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".tif", ".tiff", ".webp", ".gif",
)

Transform = Callable[[Any], Any]


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
# Robust image folder
# ---------------------------------------------------------------------------------------------------------

_PIL_LIMIT_LOCK = threading.Lock()


class ImageSkipped(Exception):
    """Raised by :func:`load_rgb` for an image we refuse to decode (e.g. too many pixels)."""


def _open_unlimited(path: str | os.PathLike[str]) -> Image.Image:
    """``Image.open`` with PIL's decompression-bomb check switched off; :func:`load_rgb` applies its own."""
    with _PIL_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            return Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL image to 8-bit RGB.

    * 16-bit / 32-bit integer grayscale (``I;16*``, ``I``): values are taken as 16-bit (clipped to
      ``[0, 65535]``) and *scaled* to 8 bits (``round(v / 257)``: 65535 -> 255, 32768 -> 128), not clipped.
    * Float (``F``): values in ``[0, 1]`` if the maximum is at most 1, else in ``[0, 255]``.
    * Anything with transparency (``RGBA``, ``LA``, ``PA``, palette with a transparent colour) is composited
      onto white, so transparent areas do not turn into whatever colour hides under alpha 0.
    * Everything else (``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ...) goes through PIL's ``convert("RGB")``.
    """
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I"):
        values = np.asarray(image).astype(np.float64)
        gray = np.rint(np.clip(values, 0, 65535) / 257.0).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if image.mode == "F":
        values = np.asarray(image).astype(np.float64)
        values = np.nan_to_num(values)
        if values.size and values.max() <= 1.0:
            values = values * 255.0
        gray = np.rint(np.clip(values, 0, 255)).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def load_rgb(
    path: str | os.PathLike[str], *, max_pixels: int = 178_956_970, downscale_pixels: int = 4096 * 4096
) -> Image.Image:
    """Decode ``path`` fully into an 8-bit RGB image.

    Large images: PIL's own decompression-bomb limit is bypassed and replaced by ours. An image with more
    than ``downscale_pixels`` pixels is shrunk by an integer factor to at most that many: JPEGs cheaply
    while decoding (``Image.draft``, DCT scaling), other formats with ``Image.reduce`` after decoding. An
    image that would still need more than ``max_pixels`` pixels decoded raises :class:`ImageSkipped`.
    Corrupt, truncated or unknown files raise whatever PIL raises (``OSError``, ``SyntaxError``, ...).
    """
    with _open_unlimited(path) as image:
        width, height = image.size
        if width * height > downscale_pixels:
            factor = math.sqrt(width * height / downscale_pixels)
            image.draft(None, (max(1, int(width / factor)), max(1, int(height / factor))))  # JPEG only
        width, height = image.size
        if width * height > max_pixels:
            raise ImageSkipped(f"{width}x{height} pixels is more than the limit of {max_pixels}")
        image.load()
        rgb = to_rgb(image)
    pixels = rgb.width * rgb.height
    if pixels > downscale_pixels:
        rgb = rgb.reduce(math.ceil(math.sqrt(pixels / downscale_pixels)))
    return rgb


def _class_folders(root: Path) -> list[str]:
    """Sorted names of the non-hidden sub-folders of ``root``."""
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


class RobustImageFolder(Dataset):
    """Like ``torchvision.datasets.ImageFolder`` (``root/<class>/**/<image>``), but never crashes on a file.

    * Bad files (unreadable, corrupt, truncated, zero bytes, too large) are found *when loaded*: the
      failure is logged once per file, counted in :attr:`num_skipped`, and the next readable sample is
      returned instead (``index + 1``, ``index + 2``, ... wrapping around), so a ``DataLoader`` keeps going.
      The count is kept in shared memory (one byte per file), so it includes the files that
      ``DataLoader`` worker processes met (each file counted once).
    * :meth:`scan` (or ``verify=True``) checks every file upfront (``Image.verify()`` and a full decode) and
      drops the bad ones; it returns how many. Affordable for small datasets only.
    * Every image mode becomes 8-bit RGB (see :func:`to_rgb`); large images are downscaled or skipped (see
      :func:`load_rgb`).
    * Classes are all non-hidden sub-folders, sorted, even empty ones (so train and val folders with the
      same class folders agree on label indices). Hidden files and non-image extensions are ignored.
    * A missing folder, a folder without class sub-folders or without any image raises :class:`UserError`.
    * ``in_memory=True`` decodes every file once, at construction, into one shared uint8 buffer (bad files
      dropped as by :meth:`scan`), so each epoch reads pixels from memory instead of decoding files: for
      small images (CIFAR's 32 px JPEGs) the decoding, not the model, would starve a GPU. Loader workers
      share the buffer. Folders whose decoded pixels exceed ``max_memory_bytes`` are refused.
      Datasets of the same folder built in one process share one decoding.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        transform: Transform | None = None,
        *,
        verify: bool = False,
        max_pixels: int = 178_956_970,
        downscale_pixels: int = 4096 * 4096,
        in_memory: bool = False,
        max_memory_bytes: int = 8 << 30,
    ) -> None:
        self.root = Path(root).expanduser()
        self.transform = transform
        self.max_pixels = max_pixels
        self.downscale_pixels = downscale_pixels
        if not self.root.is_dir():
            raise UserError(
                f"image folder {self.root} does not exist or is not a folder; pass an existing folder laid out "
                "as <root>/<class>/<image>"
            )
        self.classes: list[str] = _class_folders(self.root)
        if not self.classes:
            raise UserError(
                f"image folder {self.root} has no class sub-folders; lay it out as <root>/<class>/<image>"
            )
        self.class_to_idx: dict[str, int] = {name: i for i, name in enumerate(self.classes)}
        self.samples: list[tuple[str, int]] = []
        for name in self.classes:
            for dirpath, dirnames, filenames in os.walk(self.root / name, followlinks=True):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for filename in sorted(filenames):
                    if not filename.startswith(".") and filename.lower().endswith(IMAGE_EXTENSIONS):
                        self.samples.append((os.path.join(dirpath, filename), self.class_to_idx[name]))
        if not self.samples:
            raise UserError(
                f"image folder {self.root} contains no images (looked for {', '.join(IMAGE_EXTENSIONS)} files in "
                "its class sub-folders); check the path"
            )
        self._bad: set[str] = set()
        self._scan_dropped = 0
        # one flag per sample, in shared memory: loader workers' skips count in the main process too
        self._bad_flags = torch.zeros(len(self.samples), dtype=torch.uint8).share_memory_()
        self._decoded: _Decoded | None = None
        if verify:
            self.scan()
        if in_memory:
            self._decoded = _decode_folder(self, max_memory_bytes)

    @property
    def targets(self) -> list[int]:
        """The label of every sample, in index order."""
        return [label for _, label in self.samples]

    @property
    def num_skipped(self) -> int:
        """How many distinct bad files were met (while loading, also in loader workers, or in :meth:`scan`)."""
        return self._scan_dropped + int(self._bad_flags.sum())

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, path: str) -> Image.Image:
        """Decode one file into RGB (raises on a bad file); from memory when decoded already."""
        if self._decoded is not None:
            return self._decoded.image(path)
        return load_rgb(path, max_pixels=self.max_pixels, downscale_pixels=self.downscale_pixels)

    def _try_load(self, path: str, index: int | None = None) -> Image.Image | None:
        """Decode ``path`` (sample ``index``); on failure log (once per file), count it, return ``None``."""
        if path in self._bad:
            return None
        try:
            return self.load(path)
        except Exception as err:  # noqa: BLE001 -- any decoder failure means "skip this file"
            self._bad.add(path)
            if index is not None:
                self._bad_flags[index] = 1
            log.warning("skipping unreadable image %s (%s: %s)", path, type(err).__name__, err)
            return None

    def __getitem__(self, index: int) -> tuple[Any, int]:
        n = len(self.samples)
        for offset in range(n):
            path, label = self.samples[(index + offset) % n]
            image = self._try_load(path, (index + offset) % n)
            if image is not None:
                return (self.transform(image) if self.transform is not None else image), label
        raise UserError(f"none of the {n} images in {self.root} can be read; check the files")

    def scan(self) -> int:
        """Check every file now (``Image.verify()`` plus a full decode), drop the bad ones, return how many."""
        good: list[tuple[str, int]] = []
        dropped = 0
        for path, label in self.samples:
            ok = path not in self._bad
            if ok:
                try:
                    with _open_unlimited(path) as image:
                        image.verify()
                except Exception as err:  # noqa: BLE001
                    self._bad.add(path)
                    log.warning("skipping unreadable image %s (%s: %s)", path, type(err).__name__, err)
                    ok = False
            ok = ok and self._try_load(path) is not None
            if ok:
                good.append((path, label))
            else:
                dropped += 1
        self.samples = good
        # the dropped files (also those flagged while loading) are counted here; the flags restart
        self._scan_dropped += dropped
        self._bad_flags = torch.zeros(len(self.samples), dtype=torch.uint8).share_memory_()
        if not self.samples:
            raise UserError(f"none of the images in {self.root} can be read; check the files")
        return dropped


# ---------------------------------------------------------------------------------------------------------
# Dataset factory and splits
# ---------------------------------------------------------------------------------------------------------

_CIFAR = {"cifar10": "CIFAR10", "cifar100": "CIFAR100"}


class _Decoded:
    """Every image of a folder as RGB pixels in one shared uint8 buffer, found by path."""

    def __init__(self, pixels: torch.Tensor, index: dict[str, tuple[int, int, int]]) -> None:
        self.pixels, self.index = pixels, index  # path -> (offset, height, width)

    def image(self, path: str) -> Image.Image:
        offset, h, w = self.index[path]
        return Image.fromarray(self.pixels[offset:offset + h * w * 3].view(h, w, 3).numpy())


_DECODED_FOLDERS: dict[tuple, _Decoded] = {}


def _decode_folder(folder: "RobustImageFolder", max_memory_bytes: int) -> _Decoded:
    """Decode every readable file of ``folder`` once (dropping bad ones from its samples), or reuse the
    decoding of the same folder made earlier in this process."""
    key = (str(folder.root), tuple(folder.samples), folder.max_pixels, folder.downscale_pixels)
    if key not in _DECODED_FOLDERS:
        arrays: dict[str, np.ndarray] = {}
        total = 0
        for i, (path, _) in enumerate(folder.samples):
            image = folder._try_load(path, i)
            if image is None:
                continue
            arrays[path] = np.array(image, dtype=np.uint8)  # a writable copy
            total += arrays[path].size
            if total > max_memory_bytes:
                raise UserError(f"the images of {folder.root} take more than {max_memory_bytes / 2**30:.1f} GiB "
                                "decoded; turn off --data-in-memory for this folder")
        pixels = torch.empty(total, dtype=torch.uint8)
        index, offset = {}, 0
        for path, array in arrays.items():
            pixels[offset:offset + array.size] = torch.from_numpy(array.reshape(-1))
            index[path] = (offset, array.shape[0], array.shape[1])
            offset += array.size
        _DECODED_FOLDERS[key] = _Decoded(pixels.share_memory_(), index)
    decoded = _DECODED_FOLDERS[key]
    dropped = len(folder.samples) - len(decoded.index)
    if dropped:
        folder.samples = [(p, label) for p, label in folder.samples if p in decoded.index]
        folder._scan_dropped += dropped
        folder._bad_flags = torch.zeros(len(folder.samples), dtype=torch.uint8).share_memory_()
    return decoded


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

    root = Path(data).expanduser()
    if not root.is_dir():
        raise UserError(
            f"--data {data!r} is neither synthetic, cifar10, cifar100 nor an existing folder; pass one of those"
        )
    train_dir, val_dir = root / "train", root / "val"
    if not train_dir.is_dir():
        return RobustImageFolder(root, transform, verify=verify, in_memory=in_memory)
    if train or not val_dir.is_dir():
        return RobustImageFolder(train_dir, transform, verify=verify, in_memory=in_memory)
    dataset = RobustImageFolder(val_dir, transform, verify=verify, in_memory=in_memory)
    if dataset.classes != _class_folders(train_dir):
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


# ---------------------------------------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------------------------------------

#: OpenAI CLIP's normalisation: what the published evaluation transform uses (see :func:`eval_transform`).
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

#: Interpolation names accepted by the crop settings.
INTERPOLATIONS: dict[str, v2.InterpolationMode] = {
    "bilinear": v2.InterpolationMode.BILINEAR,
    "bicubic": v2.InterpolationMode.BICUBIC,
    "nearest": v2.InterpolationMode.NEAREST,
}
#: ``eval_transform(norm=...)``: our consistent ImageNet statistics, or the published evaluation's CLIP ones.
EVAL_NORMS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "published": (CLIP_MEAN, CLIP_STD),
}
_BICUBIC = v2.InterpolationMode.BICUBIC


def _interpolation(name: str) -> v2.InterpolationMode:
    if name not in INTERPOLATIONS:
        raise UserError(f"crop interpolation must be one of {', '.join(INTERPOLATIONS)}, got {name!r}")
    return INTERPOLATIONS[name]


def _to_normalized_tensor(mean: tuple[float, ...] = IMAGENET_MEAN,
                          std: tuple[float, ...] = IMAGENET_STD) -> list[Any]:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]


def pretrain_transform(size: int, *, min_scale: float = 0.08, interpolation: str = "bilinear") -> v2.Compose:
    """Pre-training (distillation) augmentation: RandomResizedCrop + flip + ImageNet normalisation.

    FD uses only this light augmentation (Sec. 3, App. A). The crop covers a fraction of the image area drawn
    from ``[min_scale, 1]`` with aspect ratio in ``[3/4, 4/3]``, resized with ``interpolation``. The published
    code (``data/data_fd.py``) uses torchvision's default interpolation (bilinear) and ``min_scale`` = 0.08 in
    its 300-epoch configs, 0.67 (its ``config.py`` default) in the CLIP ViT-B 100-epoch one. The dataset
    yields one crop per image and the training loop feeds *the same tensor* to teacher and student.
    Output: float32 ``[3, size, size]``.
    """
    if not 0 < min_scale <= 1:
        raise UserError(f"crop min scale must be in (0, 1], got {min_scale}; the published values are 0.08 and 0.67")
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=(min_scale, 1.0), ratio=(3 / 4, 4 / 3),
                             interpolation=_interpolation(interpolation), antialias=True),
        v2.RandomHorizontalFlip(),
        *_to_normalized_tensor(),
    ])


def finetune_transform(
    size: int,
    *,
    auto_augment: str = "rand-m9-mstd0.5-inc1",
    color_jitter: float = 0.4,
    random_erasing: float = 0.25,
    erasing_mode: str = "pixel",
    erasing_count: int = 1,
) -> Callable[[Any], torch.Tensor]:
    """Fine-tuning augmentation: timm's ``create_transform`` with the BEiT/FD settings (App. A), as the
    published ``data/data_finetune.py`` builds it.

    In order: RandomResizedCrop(0.08-1, ratio 3/4-4/3, bicubic) + flip, timm's RandAugment ``auto_augment``
    ("rand-m9-mstd0.5-inc1": 2 ops from timm's 15, each applied with probability 0.5 at a magnitude drawn
    from N(9, 0.5) clipped to [0, 10], the "increasing" op variants, Invert and SolarizeAdd among them),
    ImageNet normalisation, and timm's RandomErasing (probability ``random_erasing``, ``erasing_mode``
    "pixel" = per-pixel normal noise). ``ColorJitter(color_jitter)`` is applied only when RandAugment is
    off (``auto_augment="none"``): timm drops colour jitter whenever RandAugment is on, so the published
    configuration (jitter 0.4 with RandAugment) applies none. 0 / "none" disables a piece.
    Takes PIL images (timm's RandAugment ops are PIL operations); randomness comes from Python's ``random``,
    NumPy and torch, which :class:`fd_ref.sampler.SeededDataset` seeds per sample.
    """
    from timm.data import create_transform

    aa = None if auto_augment.strip().lower() in ("", "none") else auto_augment.strip()
    if aa is not None and not aa.startswith("rand"):
        raise UserError(f"auto_augment must be a timm RandAugment string like rand-m9-mstd0.5-inc1, or none; "
                        f"got {auto_augment!r}")
    if not 0 <= random_erasing <= 1:
        raise UserError(f"random erasing probability must be in [0, 1], got {random_erasing}")
    try:
        transform = create_transform(
            size, is_training=True, color_jitter=color_jitter if color_jitter > 0 else None, auto_augment=aa,
            re_prob=random_erasing, re_mode=erasing_mode, re_count=erasing_count, interpolation="bicubic",
            mean=IMAGENET_MEAN, std=IMAGENET_STD)
    except (AssertionError, ValueError, KeyError) as err:
        raise UserError(f"timm could not build the fine-tuning transform from auto_augment={auto_augment!r} "
                        f"({type(err).__name__}: {err}); check the string") from err
    for step in transform.transforms:
        for op in getattr(step, "ops", ()):
            if op.name.startswith("Posterize"):
                op.aug_fn = _posterize_keep_bits
    return transform


def _posterize_keep_bits(image: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's posterize op, but keeping 0 bits gives a black image instead of an error.

    timm's "PosterizeIncreasing" keeps ``4 - int(4 * m / 10)`` bits, so 0 at magnitude 10 (reached when the
    drawn N(9, 0.5) magnitude is clipped). The Pillow of the published runs turned such an image black;
    recent Pillow (13 here) raises ValueError instead, which would stop a run now and then.
    """
    from PIL import ImageOps

    if bits_to_keep >= 8:
        return image
    if bits_to_keep <= 0:
        return Image.new(image.mode, image.size)
    return ImageOps.posterize(image, bits_to_keep)


class SingleDrawResizedCrop(torch.nn.Module):
    """RandomResizedCrop with one draw and no retries (the crop of the published linear probe,
    ``data/data_linear.py``, after BYOL's TensorFlow code).

    Area fraction ``s ~ U(scale)`` and log aspect ratio ``log r ~ U(log ratio)``; then
    ``w = min(round(sqrt(s * A * r)), W)``, ``h = min(round(sqrt(s * A / r)), H)`` for an image of ``W x H``
    pixels and area ``A``, and the box's corner is uniform over the positions that keep it inside the image.
    torchvision's version instead retries up to 10 times for a box that fits and falls back to a centre crop.
    The box is resized to ``size x size``. Randomness: torch's generator.
    """

    def __init__(self, size: int, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), interpolation: str = "bicubic") -> None:
        super().__init__()
        self.size, self.scale, self.ratio = size, scale, ratio
        self.interpolation = _interpolation(interpolation)

    def box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """Draw ``(top, left, h, w)`` for an image of ``height x width`` pixels."""
        area = height * width * torch.empty(()).uniform_(*self.scale).item()
        log_ratio = torch.log(torch.tensor(self.ratio, dtype=torch.float64))
        aspect = math.exp(torch.empty((), dtype=torch.float64).uniform_(log_ratio[0].item(), log_ratio[1].item()).item())
        w = min(int(round(math.sqrt(area * aspect))), width)
        h = min(int(round(math.sqrt(area / aspect))), height)
        top = int(torch.randint(0, height - h + 1, ()).item())
        left = int(torch.randint(0, width - w + 1, ()).item())
        return top, left, h, w

    def forward(self, image: Any) -> Any:
        height, width = v2.functional.get_size(image)
        top, left, h, w = self.box(height, width)
        return v2.functional.resized_crop(image, top, left, max(h, 1), max(w, 1), [self.size, self.size],
                                          interpolation=self.interpolation, antialias=True)

    def extra_repr(self) -> str:
        return f"size={self.size}, scale={self.scale}, ratio={self.ratio}, interpolation={self.interpolation.value}"


def probe_transform(size: int) -> v2.Compose:
    """Linear-probe augmentation (published ``data/data_linear.py``): :class:`SingleDrawResizedCrop`
    (0.08-1, bicubic) + flip + ImageNet normalisation. No RandAugment, colour jitter, erasing or mixing."""
    return v2.Compose([SingleDrawResizedCrop(size), v2.RandomHorizontalFlip(), *_to_normalized_tensor()])


def eval_transform(size: int, crop_pct: float = 0.875, norm: str = "imagenet") -> v2.Compose:
    """Evaluation: resize the short side to ``int(size / crop_pct)`` (bicubic; 256 for 224), centre-crop
    ``size``, normalise.

    ``norm="imagenet"`` (default) normalises with the ImageNet statistics training uses. The published
    evaluation (``data/data_finetune.py`` and ``data/data_linear.py``, ``build_transform``) normalises with
    CLIP's mean/std although its training transforms use ImageNet's, and its published top-1 figures were
    measured that way: ``norm="published"`` reproduces it, for side-by-side comparison.
    """
    if not 0 < crop_pct <= 1:
        raise UserError(f"crop_pct must be in (0, 1], got {crop_pct}; 0.875 is the usual value")
    if norm not in EVAL_NORMS:
        raise UserError(f"eval normalisation must be one of {', '.join(EVAL_NORMS)}, got {norm!r}")
    return v2.Compose([
        v2.Resize(int(size / crop_pct), interpolation=_BICUBIC, antialias=True),
        v2.CenterCrop(size),
        *_to_normalized_tensor(*EVAL_NORMS[norm]),
    ])


# ---------------------------------------------------------------------------------------------------------
# Mixup / CutMix and the fine-tuning loss (timm's, as the published main_finetune.py uses them)
# ---------------------------------------------------------------------------------------------------------


def build_mixup(num_classes: int, mixup: float = 0.8, cutmix: float = 1.0, switch_prob: float = 0.5,
                label_smoothing: float = 0.1) -> Any:
    """timm's ``Mixup`` in "batch" mode (one ``lam`` per batch, each image mixed with the batch reversed),
    or ``None`` when both alphas are 0 (no mixing).

    Per batch: CutMix with probability ``switch_prob`` (when both alphas are positive), else Mixup, with
    ``lam ~ Beta(alpha, alpha)``; CutMix's ``lam`` is corrected to the kept area. Targets are
    ``lam * smooth(y) + (1 - lam) * smooth(y.flip(0))``, ``smooth(y) = one_hot(y) * (1 - eps) + eps / K``
    with ``eps = label_smoothing``. Needs an even batch. Randomness: NumPy's global generator.
    """
    if mixup < 0 or cutmix < 0:
        raise UserError(f"mixup/cutmix alphas must be >= 0 (0 disables), got {mixup}, {cutmix}")
    if not 0 <= switch_prob <= 1:
        raise UserError(f"mixup/cutmix switch probability must be in [0, 1], got {switch_prob}")
    if not 0 <= label_smoothing < 1:
        raise UserError(f"label smoothing must be in [0, 1), got {label_smoothing}")
    if mixup == 0 and cutmix == 0:
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=1.0, switch_prob=switch_prob, mode="batch",
                 label_smoothing=label_smoothing, num_classes=num_classes)


def build_criterion(mixing: bool, label_smoothing: float) -> torch.nn.Module:
    """The fine-tuning loss, chosen as the published ``main_finetune.py`` does, from timm:

    * with Mixup/CutMix: ``SoftTargetCrossEntropy``, ``mean_b( -sum_k t[b, k] * log_softmax(z[b])[k] )``
      (label smoothing is already in the mixed targets ``t``);
    * else with ``label_smoothing > 0``: ``LabelSmoothingCrossEntropy``,
      ``mean_b( (1 - eps) * -log_softmax(z[b])[y_b] + eps * mean_k -log_softmax(z[b])[k] )``;
    * else plain cross-entropy.
    """
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if mixing:
        return SoftTargetCrossEntropy()
    if label_smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=label_smoothing)
    return torch.nn.CrossEntropyLoss()
