"""Write an ImageFolder of ImageNet-like JPEGs: about 500 x 375 pixels (the ImageNet median), quality 90, in
``--classes`` class folders, for loader and end-to-end benchmarks where no real data set can be downloaded.

    python bench/jpeg_folder.py /tmp/jpegs --images 4000                # 4000 images, 10 classes
    python bench/jpeg_folder.py /tmp/jpegs --images 10240 --workers 16  # in parallel

Each image is smooth random colour structure (a coarse random grid resized bicubically) plus fine noise,
so that it decodes like a photograph (a JPEG of a few tens of kB at quality 90, not a flat colour that
decodes for nothing, not pure noise that no photograph resembles); widths and heights vary by up to 10%
around 500 x 375, landscape and portrait. Image i depends only on (``--seed``, i): the same command writes
the same files. Images already there are kept, so rerunning completes an interrupted folder. The last line
printed is JSON: the folder, the image count, the mean file size and the seconds taken.
"""
from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image


def image(index: int, seed: int) -> Image.Image:
    """The ``index``-th image of the folder drawn with ``seed``."""
    rng = np.random.default_rng([seed, index])
    w, h = (int(500 * f) for f in rng.uniform(0.9, 1.1, size=2) * [1.0, 0.75])
    if rng.random() < 0.2:  # some portrait images
        w, h = h, w
    coarse = rng.integers(0, 256, size=(int(rng.integers(4, 24)), int(rng.integers(4, 24)), 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.float32)
    noisy = smooth + rng.normal(0.0, 9.0, size=smooth.shape).astype(np.float32)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def write(path: Path, index: int, seed: int, quality: int) -> int:
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        image(index, seed).save(tmp, format="JPEG", quality=quality)
        tmp.replace(path)
    return path.stat().st_size


def _write_range(args: tuple[str, int, int, int, int, int]) -> int:
    root, start, stop, classes, seed, quality = args
    return sum(write(Path(root) / f"class_{i % classes:03d}" / f"img_{i:06d}.jpg", i, seed, quality)
               for i in range(start, stop))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder")
    p.add_argument("--images", type=int, default=4000)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="processes writing in parallel")
    args = p.parse_args(argv)
    root = Path(args.folder)
    for c in range(args.classes):
        (root / f"class_{c:03d}").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    chunks = [(str(root), a, min(a + 64, args.images), args.classes, args.seed, args.quality)
              for a in range(0, args.images, 64)]
    if args.workers > 1:
        with ProcessPoolExecutor(args.workers) as pool:
            total = sum(pool.map(_write_range, chunks))
    else:
        total = sum(map(_write_range, chunks))
    report = {"folder": str(root), "images": args.images, "classes": args.classes, "quality": args.quality,
              "mean_bytes": total / max(args.images, 1), "seconds": time.perf_counter() - t0}
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
