"""Sharded datasets: tar files in webdataset's layout, read by index through ``wids`` (webdataset's indexed
reader), so the seeded sampler of :mod:`fd_ref.data.sampler` and its exact resume work on them unchanged.

A shard is a tar file whose members come in pairs, ``<key>.<image extension>`` (the image file's bytes)
and ``<key>.cls`` (its label as decimal text), in sample order. A dataset is a list of shards read as one
sequence of samples: sample ``i`` is member pair ``i - start[s]`` of shard ``s``, where ``start`` is the
running sum of the shards' sample counts. What ``--data`` may name:

* a folder holding ``train-*.tar`` (and ``val-*.tar``), with or without the ``train.json`` / ``val.json``
  index ``python -m fd_ref.data.make_shards`` writes beside them;
* a wids dataset description (a ``.json`` file or URL: ``{"wids_version": 1, "shardlist": [{"url", "nsamples"},
  ...]}``; fd-ref adds ``classes`` and each shard's ``filesize``);
* a brace pattern or a single tar file, local or a URL wids downloads (``/data/train-{000000..000999}.tar``,
  ``https://host/shards/train-{000..099}.tar``).

Without an index, every shard is opened once at start to count its samples (a URL is downloaded for that).

What is checked, and when (docs/data_at_scale.md):

* at start, a shard that is missing, whose size differs from the size its index records, or whose last
  member ends past the end of the file (truncated) stops the run with one line naming it: skipping it
  would change the numbering of every later sample, and with it the order and a resume;
* while loading, an image that does not decode is skipped and counted like a bad file of a folder (the next
  readable sample of the same split comes instead); a shard that cannot be opened any more (deleted or
  damaged after the start) is reported once in one line, and its samples are skipped and counted the
  same way.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence
from urllib.parse import quote, urlparse

import numpy as np
import torch
from torch.utils.data import Dataset

from fd_ref.data.images import IMAGE_EXTENSIONS, Transform, load_rgb
from fd_ref.errors import UserError

log = logging.getLogger("fd_ref.data")

#: Where shards named by a URL are downloaded to (one copy per machine; ``FD_REF_SHARD_CACHE`` overrides).
DEFAULT_CACHE = "~/.cache/fd_ref/shards"


@dataclass(frozen=True)
class Shard:
    url: str                        # a local path or a URL
    nsamples: int
    filesize: Optional[int] = None  # bytes, when an index records it


def is_url(name: str) -> bool:
    return urlparse(name).scheme not in ("", "file") or name.startswith("pipe:")


def _expand(pattern: str) -> list[str]:
    from braceexpand import braceexpand  # installed with wids
    return list(braceexpand(pattern))


def _split_of_folder(root: Path, split: str) -> Optional[tuple[list[Shard], list[str]]]:
    """The shards of ``split`` (``train`` / ``val``) in a local folder, from its index or its tar files."""
    index = root / f"{split}.json"
    if index.is_file():
        return read_index(str(index))
    tars = sorted(root.glob(f"{split}-*.tar"))
    if not tars:
        return None
    return [Shard(str(p), count_samples(str(p))) for p in tars], []


def read_index(source: str) -> tuple[list[Shard], list[str]]:
    """Shards and class names from a wids dataset description (a local file or a URL); shard URLs are
    resolved against the description's own folder."""
    from wids.wids_specs import load_dsdesc_and_resolve, urldir
    try:
        desc = load_dsdesc_and_resolve(source, base=urldir(source))
    except (OSError, AssertionError, ValueError, KeyError) as err:
        raise UserError(f"cannot read the shard index {source} ({type(err).__name__}: {err}); check the "
                        "path, or pass the shards' folder or a brace pattern instead") from err
    shards = [Shard(s["url"], int(s["nsamples"]), s.get("filesize")) for s in desc["shardlist"]]
    return shards, list(desc.get("classes", []))


def shard_source(data: str, train: bool) -> Optional[tuple[list[Shard], list[str]]]:
    """``(shards, class names)`` of the split (``train`` or validation) that ``data`` names, or ``None``
    when ``data`` is not sharded. A source without a validation split gives its training shards for
    both, as a folder without ``val/`` does (the caller carves the validation split with ``--val-split``)."""
    name = data.strip()
    if name.endswith(".json"):
        return read_index(name)
    if name.endswith(".tar") or (".tar" in name and "{" in name):
        urls = _expand(name)
        return [Shard(u, count_samples(u)) for u in urls], []
    root = Path(name).expanduser()
    if not root.is_dir():
        return None
    train_split = _split_of_folder(root, "train")
    if train_split is None:
        return None
    if train:
        return train_split
    return _split_of_folder(root, "val") or train_split


def has_val_shards(data: str) -> bool:
    """Whether ``data`` is a folder of shards with a validation split of its own."""
    root = Path(data.strip()).expanduser()
    return root.is_dir() and ((root / "val.json").is_file() or any(root.glob("val-*.tar")))


def _local_copy(url: str, cache_dir: str) -> str:
    """The local file of shard ``url``: the path itself, or wids' download of a URL into ``cache_dir``."""
    if not is_url(url):
        return url[len("file://"):] if url.startswith("file://") else url
    from wids.wids_dl import download_and_open
    os.makedirs(cache_dir, exist_ok=True)
    local = os.path.join(cache_dir, quote(url, safe="+-"))
    try:
        with download_and_open(url, local):
            pass
    except (AssertionError, ValueError, OSError) as err:  # wids asserts that its download command succeeded
        raise OSError(f"could not download it ({type(err).__name__}: {err})") from err
    return local


def _open_tar(url: str, cache_dir: str):
    """wids' indexed view of one shard; raises ``OSError`` when its last member ends past the end of the
    file (a truncated copy) or its headers cannot be read."""
    from wids.wids import IndexedTarSamples
    path = _local_copy(url, cache_dir)
    try:
        tar = IndexedTarSamples(path=path)
    except (ValueError, AssertionError, UnicodeDecodeError, struct.error) as err:
        raise OSError(f"unreadable tar headers ({type(err).__name__}: {err})") from err
    members = tar.reader.by_index
    if members:
        _, offset, size = members[-1]
        end, length = offset + 512 + size, len(tar.reader.mmapped_file)
        if end > length:
            tar.close()
            raise OSError(f"truncated: its last member ends at byte {end}, the file has {length}")
    return tar


def count_samples(url: str, cache_dir: Optional[str] = None) -> int:
    """Samples in shard ``url`` (opened once); a missing or damaged shard is a :class:`UserError`."""
    try:
        tar = _open_tar(url, cache_dir or _cache_dir())
    except OSError as err:
        raise UserError(f"cannot read shard {url} ({err}); copy it again or rebuild the shards") from err
    n = len(tar)
    tar.close()
    return n


def _cache_dir() -> str:
    return os.path.expanduser(os.environ.get("FD_REF_SHARD_CACHE", DEFAULT_CACHE))


def check_shards(shards: Sequence[Shard]) -> None:
    """Stop with one line if a local shard is missing or its size differs from its index's record."""
    for shard in shards:
        if is_url(shard.url):
            continue
        path = _local_copy(shard.url, "")
        if not os.path.isfile(path):
            raise UserError(f"shard {shard.url} is missing; copy it again or rebuild the shards")
        size = os.path.getsize(path)
        if shard.filesize is not None and size != shard.filesize:
            raise UserError(f"shard {shard.url} has {size} bytes but its index records {shard.filesize} "
                            f"(truncated or replaced); copy it again or rebuild the shards")


class ShardDataset(Dataset):
    """Samples of tar shards by index, like :class:`~fd_ref.data.images.RobustImageFolder` by file.

    Each process (each loader worker) keeps up to ``max_open`` shards open (wids' ``IndexedTarSamples``:
    the tar file memory-mapped, its members indexed once per opening), least recently used closed first.
    Images decode with :func:`~fd_ref.data.images.load_rgb` (every mode to 8-bit RGB, large images
    downscaled), so a folder and its shards give the same pixels. Bad samples are counted in
    :attr:`num_skipped` (one shared-memory flag per sample, so loader workers' skips count too).
    """

    def __init__(self, shards: Sequence[Shard], classes: Sequence[str] = (), transform: Transform | None = None,
                 *, name: str = "", max_open: int = 64, cache_dir: Optional[str] = None,
                 max_pixels: int = 178_956_970, downscale_pixels: int = 4096 * 4096) -> None:
        if not shards or sum(s.nsamples for s in shards) == 0:
            raise UserError(f"the shards of {name or 'the dataset'} hold no samples; check the path")
        self.shards, self.classes, self.transform = list(shards), list(classes), transform
        self.name, self.max_open, self.cache_dir = name, max_open, cache_dir or _cache_dir()
        self.max_pixels, self.downscale_pixels = max_pixels, downscale_pixels
        self.starts = np.cumsum([0] + [s.nsamples for s in self.shards])
        self._bad_flags = torch.zeros(int(self.starts[-1]), dtype=torch.uint8).share_memory_()
        self._open: collections.OrderedDict[int, Any] = collections.OrderedDict()
        self._dead: set[int] = set()  # shards this process could not open (reported once each)

    def __getstate__(self) -> dict:  # open shards (memory maps) stay in the process that opened them
        return {**self.__dict__, "_open": collections.OrderedDict()}

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def num_skipped(self) -> int:
        """How many distinct samples could not be read (in this process or its loader workers)."""
        return int(self._bad_flags.sum())

    def locate(self, index: int) -> tuple[int, int]:
        """``(shard, member pair within it)`` of sample ``index``."""
        shard = int(np.searchsorted(self.starts, index, side="right")) - 1
        return shard, index - int(self.starts[shard])

    def _tar(self, shard: int):
        if shard in self._open:
            self._open.move_to_end(shard)
            return self._open[shard]
        tar = _open_tar(self.shards[shard].url, self.cache_dir)
        if len(tar) != self.shards[shard].nsamples:
            tar.close()
            raise OSError(f"it holds {len(tar)} samples, its index {self.shards[shard].nsamples}")
        self._open[shard] = tar
        while len(self._open) > self.max_open:
            self._open.popitem(last=False)[1].close()
        return tar

    def decode(self, sample: dict) -> tuple[Any, int]:
        """Image (RGB) and label of one sample of a shard (its members by extension); raises if it is bad."""
        images = [k for k in sample if k.lower() in IMAGE_EXTENSIONS]
        if not images or ".cls" not in sample:
            raise ValueError(f"sample {sample['__key__']} lacks an image or a .cls member "
                             f"(members: {', '.join(k for k in sample if k != '__key__')})")
        label = int(sample[".cls"].read().decode("ascii").strip())
        image = load_rgb(sample[images[0]], max_pixels=self.max_pixels, downscale_pixels=self.downscale_pixels)
        return image, label

    def _try_read(self, index: int) -> Optional[tuple[Any, int]]:
        """Sample ``index``, or ``None`` (logged, counted) when it or its shard cannot be read."""
        if self._bad_flags[index]:
            return None
        shard, inner = self.locate(index)
        if shard not in self._dead:
            try:
                tar = self._tar(shard)
            except Exception as err:  # noqa: BLE001 -- a shard that cannot be opened: one line for all its samples
                self._dead.add(shard)
                log.warning("skipping unreadable shard %s (%s: %s); its %d images count as unreadable",
                            self.shards[shard].url, type(err).__name__, err, self.shards[shard].nsamples)
            else:
                try:
                    return self.decode(tar[inner])
                except Exception as err:  # noqa: BLE001 -- any decoder failure means "skip this sample"
                    log.warning("skipping unreadable image %d of shard %s (%s: %s)", index,
                                self.shards[shard].url, type(err).__name__, err)
        self._bad_flags[index] = 1
        return None

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self.item_within(range(len(self)), index)

    def item_within(self, indices: Sequence[int], position: int) -> tuple[Any, int]:
        """Sample ``indices[position]``; for a bad one the next readable sample of ``indices`` (wrapping
        around), as :meth:`RobustImageFolder.item_within <fd_ref.data.images.RobustImageFolder.item_within>`."""
        n = len(indices)
        for offset in range(n):
            item = self._try_read(indices[(position + offset) % n])
            if item is not None:
                image, label = item
                return (self.transform(image) if self.transform is not None else image), label
        raise UserError(f"none of the {n} samples of {self.name} can be read; check the shards")


def shard_dataset(data: str, train: bool, transform: Transform | None) -> Optional[ShardDataset]:
    """The :class:`ShardDataset` of ``data``'s training or validation split, or ``None`` when ``data`` does
    not name shards. The training and validation shards must list the same classes."""
    found = shard_source(data, train)
    if found is None:
        return None
    shards, classes = found
    check_shards(shards)
    if not train and has_val_shards(data):
        train_classes = shard_source(data, True)[1]
        if classes != train_classes:
            raise UserError(f"the val and train shards of {data} list different classes, so their labels would "
                            "not match; rebuild them from one folder")
    return ShardDataset(shards, classes, transform, name=data)


def describe(shards: Sequence[Shard], classes: Sequence[str], name: str) -> str:
    """A wids dataset description (JSON text) of ``shards``, with fd-ref's ``classes`` added."""
    return json.dumps({"wids_version": 1, "name": name, "classes": list(classes),
                       "shardlist": [{"url": s.url, "nsamples": s.nsamples, "filesize": s.filesize}
                                     for s in shards]}, indent=1) + "\n"
