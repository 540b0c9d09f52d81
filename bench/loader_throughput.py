"""Data loading speed: images per second per loader worker, from an image folder and from its tar shards.

    python bench/loader_throughput.py                          # 2000 ImageNet-sized JPEGs, 1 and 2 workers
    python bench/loader_throughput.py --images 500 --workers 1 --json out.jsonl

The images are made once in ``--work`` (kept for later runs): ``--images`` JPEGs of 500x375 pixels (ImageNet's
median size), quality 90, of smooth random colour fields (so that they compress like photographs, not like
noise), in 10 class folders, and their shards (``python -m fd_ref.data.make_shards``, ``--shard-size``). Each
*source* is then read through what training uses: ``fd_ref.data.sampler.make_loader`` over the dataset
``--data`` builds, shuffled, with the distillation transform (RandomResizedCrop to ``--img-size``, flip), one
pass after a warm-up of ``--warmup`` batches; img/s and img/s per worker are printed per (source, workers) and
the last line is a JSON summary.

``--pipeline`` says where the transform stops: ``uint8`` (the default, as train.py: the workers hand over 8-bit
images and the training step normalises them on the device) or ``float`` (the workers also convert and
normalise, float32 batches through shared memory). bench/loader_uint8.py compares the two per worker.
A *mode* is one way of producing the batch from the dataset (``MODES``); add one by adding a function that
takes the dataset and the run's settings and returns a loader.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from PIL import Image  # noqa: E402

from fd_ref.data import build_dataset, pretrain_transform  # noqa: E402
from fd_ref.data.make_shards import make_shards  # noqa: E402
from fd_ref.data.sampler import make_loader  # noqa: E402


def make_images(root: Path, n: int, seed: int = 0) -> None:
    """``n`` JPEGs of 500x375, quality 90, in 10 class folders: a low-resolution random field upsampled
    (smooth, photograph-like detail) plus mild noise."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = root / f"class{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        small = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((500, 375),
                                                                                          Image.BICUBIC)
        pixels = np.asarray(small, dtype=np.int16) + rng.integers(-8, 9, (375, 500, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i:06d}.jpg", quality=90)


def standard_loader(dataset, a: argparse.Namespace, workers: int):
    """train.py's seeded, sharded batch sampler over the dataset."""
    loader, _ = make_loader(dataset, a.batch, seed=0, shuffle=True, num_workers=workers)
    return loader


MODES: dict[str, Callable] = {"standard": standard_loader}


def measure(loader, warmup: int) -> tuple[int, float, str]:
    """(images, seconds, the batches' dtype) of one pass after ``warmup`` batches."""
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    count, images, t0 = 0, None, time.perf_counter()
    for images, _ in it:
        count += len(images)
    seconds = time.perf_counter() - t0
    return count, seconds, "" if images is None else str(images.dtype).removeprefix("torch.")


def machine() -> dict:
    flags = ""
    try:
        flags = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        pass
    with open("/proc/loadavg") as f:
        load = [float(x) for x in f.read().split()[:3]]
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags, "load_average": load}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--shard-size", type=int, default=500)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--warmup", type=int, default=2, help="batches read before the clock starts")
    p.add_argument("--mode", choices=sorted(MODES), default="standard")
    p.add_argument("--pipeline", choices=["uint8", "float"], default="uint8",
                   help="where the workers' transform stops (uint8: as train.py; float: normalised in the workers)")
    p.add_argument("--work", default="/tmp/fd_loader_bench", help="where the images and shards are kept")
    p.add_argument("--json", default=None, help="also append the summary to this JSON-lines file")
    a = p.parse_args(argv)
    import torch
    torch.set_num_threads(1)
    work = Path(a.work) / f"{a.images}"
    folder, shards = work / "folder", work / f"shards{a.shard_size}"
    if not folder.is_dir():
        print(f"making {a.images} JPEGs in {folder} ...", flush=True)
        make_images(folder.with_name("folder.partial"), a.images)
        os.replace(folder.with_name("folder.partial"), folder)
    if not shards.is_dir():
        make_shards(str(folder), shards, a.shard_size)
    transform = pretrain_transform(a.img_size, uint8=a.pipeline == "uint8")
    rows = []
    for source, path in (("folder", folder), ("shards", shards)):
        dataset = build_dataset(str(path), True, transform)
        for workers in a.workers:
            count, seconds, dtype = measure(MODES[a.mode](dataset, a, workers), a.warmup)
            rate = count / seconds
            rows.append({"source": source, "workers": workers, "images": count, "dtype": dtype,
                         "seconds": round(seconds, 2), "img_per_s": round(rate, 1),
                         "img_per_s_per_worker": round(rate / max(workers, 1), 1)})
            print(f"{source:<7} {workers} worker(s): {rate:7.1f} img/s, {rate / max(workers, 1):7.1f} per worker "
                  f"({count} images in {seconds:.1f} s)", flush=True)
    summary = {"bench": "loader_throughput", "mode": a.mode, "pipeline": a.pipeline, "images": a.images,
               "shard_size": a.shard_size, "batch": a.batch, "img_size": a.img_size, "rows": rows,
               "machine": machine()}
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps(summary) + "\n")
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
