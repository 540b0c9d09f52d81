"""Convert an image folder (or the built-in synthetic set) into tar shards in webdataset's layout.

    python -m fd_ref.data.make_shards /data/imagenet /data/imagenet_shards --shard-size 1000
    python -m fd_ref.data.make_shards synthetic /tmp/synthetic_shards --shard-size 256 --synthetic-size 1024

SRC is read as ``--data`` reads it (fd_ref.data.datasets.build_dataset): a folder with ``train/`` (and
``val/``) gives ``train-NNNNNN.tar`` (and ``val-NNNNNN.tar``), a folder of class folders gives
``train-*.tar`` only, ``synthetic`` gives both splits of the synthetic set. Samples keep the folder's order
(class folders sorted, then files sorted), so sample ``i`` of the shards is image ``i`` of the folder: a
``--val-split`` holds out the same images on both, and evaluation gives the same numbers. Each sample is
``<index>.<ext>`` (the file's own bytes, unchanged, bad files included: the loader skips them as it skips
them in a folder; synthetic images as PNG, lossless) and ``<index>.cls`` (the label). Beside the shards,
``train.json`` / ``val.json`` index them (wids' dataset description, plus the class names and each shard's
size, which the loader checks to refuse a truncated copy).

The same input gives the same bytes: members carry no time, owner or permission of the source files. OUT
must not exist yet (the conversion writes into ``OUT.partial`` and renames it at the end, so an interrupted
conversion leaves no half-made OUT).
"""
from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tarfile
from pathlib import Path
from typing import Iterator, Sequence

from tqdm import tqdm

from fd_ref.data.datasets import SyntheticImages
from fd_ref.data.images import RobustImageFolder, class_folders
from fd_ref.data.shards import Shard, describe
from fd_ref.errors import UserError


def folder_samples(root: Path) -> Iterator[tuple[bytes, str, int]]:
    """``(file bytes, extension, label)`` of every image of a folder, in RobustImageFolder's order."""
    for path, label in RobustImageFolder(root).samples:
        yield Path(path).read_bytes(), Path(path).suffix.lower().lstrip("."), label


def synthetic_samples(dataset: SyntheticImages) -> Iterator[tuple[bytes, str, int]]:
    for i in range(len(dataset)):
        image, label = dataset.generate(i)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        yield buffer.getvalue(), "png", label


def _member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = len(payload), 0, 0o444, 0, 0, "", ""
    tar.addfile(info, io.BytesIO(payload))


def write_split(samples: Iterator[tuple[bytes, str, int]], total: int, out: Path, split: str,
                shard_size: int, classes: Sequence[str]) -> list[Shard]:
    """Write ``samples`` as ``split-NNNNNN.tar`` shards of ``shard_size`` samples and their index."""
    shards: list[Shard] = []
    tar, count = None, 0
    with tqdm(total=total, desc=split, unit="img", mininterval=1.0) as bar:
        for index, (payload, ext, label) in enumerate(samples):
            if index % shard_size == 0:
                if tar is not None:
                    tar.close()
                    shards.append(_finished(out, split, len(shards), count))
                name = f"{split}-{len(shards):06d}.tar"
                tar, count = tarfile.open(out / name, "w", format=tarfile.USTAR_FORMAT), 0
            key = f"{index:09d}"
            _member(tar, f"{key}.{ext}", payload)
            _member(tar, f"{key}.cls", str(label).encode("ascii"))
            count += 1
            bar.update(1)
    if tar is not None:
        tar.close()
        shards.append(_finished(out, split, len(shards), count))
    (out / f"{split}.json").write_text(describe(shards, classes, split))
    return shards


def _finished(out: Path, split: str, number: int, count: int) -> Shard:
    name = f"{split}-{number:06d}.tar"
    return Shard(name, count, (out / name).stat().st_size)


def make_shards(src: str, out: str | os.PathLike[str], shard_size: int, *, synthetic_size: int = 1024,
                img_size: int = 32, seed: int = 0) -> dict[str, list[Shard]]:
    """Convert ``src`` into shards in the new folder ``out`` (module docstring); returns each split's shards."""
    out = Path(out).expanduser()
    if shard_size < 1:
        raise UserError(f"--shard-size must be at least 1, got {shard_size}")
    if out.exists():
        raise UserError(f"{out} already exists; make_shards writes a new folder only: pass another OUT or "
                        "delete it")
    splits: dict[str, tuple[Iterator, int, list[str]]] = {}
    if src.strip().lower() == "synthetic":
        train = SyntheticImages(synthetic_size, image_size=img_size, seed=2 * seed)
        val = SyntheticImages(max(1, synthetic_size // 5), image_size=img_size, seed=2 * seed + 1)
        for split, dataset in (("train", train), ("val", val)):
            splits[split] = (synthetic_samples(dataset), len(dataset), dataset.classes)
    else:
        root = Path(src).expanduser()
        if not root.is_dir():
            raise UserError(f"SRC {src!r} is neither synthetic nor an existing folder; pass one of those")
        folders = {"train": root / "train", "val": root / "val"} if (root / "train").is_dir() else {"train": root}
        for split, folder in folders.items():
            if folder.is_dir():
                listed = RobustImageFolder(folder)
                splits[split] = (folder_samples(folder), len(listed), class_folders(folder))
        if "val" in splits and splits["val"][2] != splits["train"][2]:
            raise UserError(f"{root / 'val'} and {root / 'train'} have different class folders; give both the "
                            "same class sub-folders")
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)  # left by an interrupted conversion
    partial.mkdir(parents=True)
    written = {split: write_split(samples, total, partial, split, shard_size, classes)
               for split, (samples, total, classes) in splits.items()}
    os.replace(partial, out)
    return written


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fd_ref.data.make_shards", description=__doc__.splitlines()[0])
    parser.add_argument("src", help="an image folder (<root>/<class>/<image>, or <root>/train + <root>/val) or "
                                    "synthetic")
    parser.add_argument("out", help="the new folder to write the shards into")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    parser.add_argument("--synthetic-size", type=int, default=1024, help="training images of synthetic")
    parser.add_argument("--img-size", type=int, default=32, help="image size of synthetic")
    parser.add_argument("--seed", type=int, default=0, help="seed of synthetic (as train.py's --seed)")
    args = parser.parse_args(argv)
    try:
        written = make_shards(args.src, args.out, args.shard_size, synthetic_size=args.synthetic_size,
                              img_size=args.img_size, seed=args.seed)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    for split, shards in written.items():
        print(f"{split}: {sum(s.nsamples for s in shards)} images in {len(shards)} shard(s) -> "
              f"{Path(args.out) / f'{split}.json'}", flush=True)


if __name__ == "__main__":
    main()
