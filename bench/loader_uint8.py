"""Loader throughput per worker: the float pipeline (each worker converts and normalises, float32 batches
through shared memory) against the uint8 one (workers stop at the 8-bit image; the training step normalises
on the device with fd_ref.data.DeviceNormalize), for the distillation and the fine-tuning transforms.

    python bench/loader_uint8.py                      # 2000 JPEGs (~500 x 375, quality 90), 1 worker
    python bench/loader_uint8.py --images 500 --workers 2 --json results.jsonl

The images come from bench/jpeg_folder.py, written once into ``--folder`` and reused. For each pipeline a
DataLoader with ``--workers`` workers and batches of ``--batch`` images reads a share of the folder and the
main process receives the batches, as training does; its rate is

    img/s per worker = images received / seconds / workers     (after the first batch: workers started)

The four configurations (2 transforms x 2 pipelines) run in ``--rounds`` rounds over disjoint parts of the
folder, one after another in a rotating order, so that a change of load on a shared machine hits them alike;
each figure is the median over rounds, each ratio (uint8 / float) the median of the rounds' ratios. The last
line printed is JSON with both figures, their ratio, the machine's load before and after and its CPU flags.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jpeg_folder  # noqa: E402
from fd_ref.data import RobustImageFolder, finetune_transform, pretrain_transform  # noqa: E402
from throughput_measure import cpu_flags  # noqa: E402

TRANSFORMS = {"distill": lambda size, uint8: pretrain_transform(size, uint8=uint8),
              "finetune": lambda size, uint8: finetune_transform(size, uint8=uint8)}


def rate(dataset, workers: int, batch: int) -> tuple[float, int]:
    """(img/s per worker after the first batch, bytes of one image as delivered)."""
    loader = DataLoader(dataset, batch_size=batch, num_workers=workers, shuffle=False, drop_last=False,
                        persistent_workers=False)
    images, t0, nbytes = 0, None, 0
    for x, _ in loader:
        if t0 is None:  # workers started and the first batch made: the clock starts
            t0, nbytes = time.perf_counter(), x[0].numel() * x.element_size()
            continue
        images += len(x)
    seconds = time.perf_counter() - t0
    return images / seconds / max(workers, 1), nbytes


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=2000, help="JPEGs in the folder (each round reads a share)")
    p.add_argument("--folder", default="/tmp/fd_ref_loader_jpegs")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--json", default=None, help="also append the result line to this file")
    args = p.parse_args(argv)
    jpeg_folder.main([args.folder, "--images", str(args.images), "--workers", str(os.cpu_count() or 1)])
    folder = RobustImageFolder(args.folder)
    if len(folder) < args.images:
        raise SystemExit(f"{args.folder} has {len(folder)} images, fewer than --images {args.images}")
    torch.manual_seed(0)
    load_before = os.getloadavg()
    configs = [(t, u) for t in TRANSFORMS for u in (False, True)]
    rates: dict[tuple[str, bool], list[float]] = {c: [] for c in configs}
    sizes: dict[tuple[str, bool], int] = {}
    share = args.images // (args.rounds * len(configs))
    start = 0
    for r in range(args.rounds):
        for i in range(len(configs)):
            name, uint8 = configs[(i + r) % len(configs)]
            data = RobustImageFolder(args.folder, TRANSFORMS[name](args.img_size, uint8))
            part = Subset(data, range(start, start + share))
            start += share
            per_worker, sizes[name, uint8] = rate(part, args.workers, args.batch)
            rates[name, uint8].append(per_worker)
            print(f"round {r + 1} {name:<8} {'uint8' if uint8 else 'float'}: {per_worker:.1f} img/s per worker",
                  flush=True)
    load_after = os.getloadavg()
    result = {"images": args.images, "images_per_config_round": share, "workers": args.workers, "batch": args.batch,
              "img_size": args.img_size, "rounds": args.rounds, "cpu_count": os.cpu_count(),
              "cpu_flags": cpu_flags(), "processor": platform.processor() or platform.machine(),
              "loadavg_before": load_before, "loadavg_after": load_after, "torch": torch.__version__,
              "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "command": "python bench/loader_uint8.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    for name in TRANSFORMS:
        old, new = rates[name, False], rates[name, True]
        result[name] = {"float_img_per_s_per_worker": statistics.median(old),
                        "uint8_img_per_s_per_worker": statistics.median(new),
                        "ratio": statistics.median(n / o for n, o in zip(new, old)),
                        "float_bytes_per_image": sizes[name, False], "uint8_bytes_per_image": sizes[name, True],
                        "float_rounds": old, "uint8_rounds": new}
    line = json.dumps(result)
    if args.json:
        with open(args.json, "a") as f:
            f.write(line + "\n")
    print(line)
    return result


if __name__ == "__main__":
    main()
