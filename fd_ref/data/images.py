"""Robust image loading: :class:`RobustImageFolder`, an ``ImageFolder`` that never crashes on a bad file and
converts every image mode (grayscale, CMYK, palette, alpha, 16-bit) to 8-bit RGB correctly."""
from __future__ import annotations

import logging
import math
import os
import stat
import threading
from pathlib import Path
from typing import Any, BinaryIO, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset

from fd_ref.errors import UserError

log = logging.getLogger("fd_ref.data")  # the name users filter data-loading warnings by

#: File name endings that :class:`RobustImageFolder` treats as images (case-insensitive).
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".tif", ".tiff", ".webp", ".gif",
)

Transform = Callable[[Any], Any]


# ---------------------------------------------------------------------------------------------------------
# Robust image folder
# ---------------------------------------------------------------------------------------------------------

_PIL_LIMIT_LOCK = threading.Lock()


class ImageSkipped(Exception):
    """Raised by :func:`load_rgb` for an image we refuse to decode (e.g. too many pixels)."""


def _open_unlimited(path: str | os.PathLike[str] | BinaryIO) -> Image.Image:
    """``Image.open`` with PIL's decompression-bomb check switched off; :func:`load_rgb` applies its own.
    Only a regular file is opened: a named pipe (or a device) with an image name would block the open,
    and so the run, for good; it raises :class:`ImageSkipped`. An open binary stream (a member of a
    shard) is read as it is."""
    if isinstance(path, (str, os.PathLike)) and not stat.S_ISREG(os.stat(path).st_mode):
        raise ImageSkipped("not a regular file (a named pipe, a device or a folder)")
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
    path: str | os.PathLike[str] | BinaryIO, *, max_pixels: int = 178_956_970, downscale_pixels: int = 4096 * 4096
) -> Image.Image:
    """Decode ``path`` (a file, or an open binary stream) fully into an 8-bit RGB image.

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


def class_folders(root: Path) -> list[str]:
    """Sorted names of the non-hidden sub-folders of ``root``."""
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def skipped_images(loader) -> int:
    """Unreadable files skipped so far by the dataset behind ``loader`` (its ``num_skipped``, looked up
    through wrappers such as SeededDataset and Subset); 0 for datasets that never skip."""
    dataset = getattr(loader, "dataset", None)
    for _ in range(8):
        if dataset is None:
            break
        count = getattr(dataset, "num_skipped", None)
        if count is not None:
            return int(count)
        dataset = getattr(dataset, "dataset", None)
    return 0


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
      Symbolic links are followed, but a folder reached again (a link to its own folder: a loop) is
      listed once, so no image is listed twice. Only regular files are opened (a named pipe is skipped).
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
        self.classes: list[str] = class_folders(self.root)
        if not self.classes:
            raise UserError(
                f"image folder {self.root} has no class sub-folders; lay it out as <root>/<class>/<image>"
            )
        self.class_to_idx: dict[str, int] = {name: i for i, name in enumerate(self.classes)}
        self.samples: list[tuple[str, int]] = []
        for name in self.classes:
            seen: set[tuple[int, int]] = set()  # folders of this class listed so far (device, inode)
            for dirpath, dirnames, filenames in os.walk(self.root / name, followlinks=True):
                where = os.stat(dirpath)
                if (where.st_dev, where.st_ino) in seen:  # reached again through a symlink (a loop): once
                    dirnames[:] = []
                    continue
                seen.add((where.st_dev, where.st_ino))
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
        return self.item_within(range(len(self.samples)), index)

    def item_within(self, indices: Sequence[int], position: int) -> tuple[Any, int]:
        """Sample ``indices[position]``; for a bad file the next readable sample *of* ``indices``
        (``position + 1``, ... wrapping around), never one outside them (see :class:`FolderSubset`)."""
        n = len(indices)
        for offset in range(n):
            index = indices[(position + offset) % n]
            path, label = self.samples[index]
            image = self._try_load(path, index)
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


class FolderSubset(Subset):
    """A ``Subset`` of a :class:`RobustImageFolder` that replaces a bad file by the next readable file of
    the subset, so a training split never borrows a held-out validation image (nor the other way round),
    and each split's skips count only its own files."""

    def __getitem__(self, position: int) -> tuple[Any, int]:
        return self.dataset.item_within(self.indices, position)

    def __getitems__(self, positions: list[int]) -> list[tuple[Any, int]]:
        return [self[p] for p in positions]


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
