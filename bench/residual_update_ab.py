"""Full FD training step with fd_ref's fused residual update (``add_branch``, one addcmul) against the same
step with the three separate ops it replaced (layer scale, drop path, add), interleaved in one process.

    python bench/residual_update_ab.py                  # ViT-S/16 <- ViT-S/16, 224 px, batch 16, bf16, 10 rounds
    python bench/residual_update_ab.py --busy 3         # the same with 3 busy processes beside it (a shared CPU)

Both sides are ``bench/throughput.py``'s "optimised" configuration; the three-op side replaces each student
block's forward by ``x + drop_path(ls(branch))`` twice. ``--busy N`` starts N single-threaded processes that
alternate a 1024^2 matmul and an elementwise pass over 4M floats for as long as the measurement runs.
Prints the median and fastest step of each side and the median of the paired ratios (3 ops / add_branch).
"""
from __future__ import annotations

import argparse
import copy
import multiprocessing as mp
import os
import statistics
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput_configs import build_base, build_config, optimised_knobs  # noqa: E402


def three_op_forward(self, x, shared_bias=None, return_attn=False):
    y, attn = self.attn(self.norm1(x), shared_bias, return_attn)
    x = x + self.drop_path1(self.ls1(y))
    x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
    return x, attn


def busy() -> None:
    torch.set_num_threads(1)
    a, b = torch.randn(1024, 1024), torch.randn(4_000_000)
    while True:
        a @ a
        (b * 1.01 + 0.5).sum()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--student", default="vit_small")
    p.add_argument("--teacher", default="vit_small")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--busy", type=int, default=0, help="busy processes beside the measurement")
    args = p.parse_args()
    args.grad_checkpointing = False
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    base = build_base(args, device)
    images = torch.randn(args.batch, 3, args.img_size, args.img_size)
    fused = build_config("add_branch", optimised_knobs(args, args.precision), base, images, args, device)
    plain_base = copy.deepcopy(base)
    for block in plain_base.student.blocks:
        block.forward = types.MethodType(three_op_forward, block)
    plain = build_config("3 ops", optimised_knobs(args, args.precision), plain_base, images, args, device)
    workers = [mp.get_context("fork").Process(target=busy, daemon=True) for _ in range(args.busy)]
    for w in workers:
        w.start()
    try:
        load0 = os.getloadavg()[0]
        for c in (fused, plain):
            c.step()
        times: dict[str, list[float]] = {"add_branch": [], "3 ops": []}
        for r in range(args.rounds):
            for c in ((plain, fused) if r % 2 == 0 else (fused, plain)):
                t0 = time.perf_counter()
                c.step()
                times[c.name].append(time.perf_counter() - t0)
        load1 = os.getloadavg()[0]
    finally:
        for w in workers:
            w.terminate()
    print(f"{args.student} <- {args.teacher}, {args.img_size} px, batch {args.batch}, {args.precision}, "
          f"{args.threads} thread(s), {args.busy} busy process(es), load {load0:.2f} -> {load1:.2f}")
    for name, t in times.items():
        print(f"{name:<11} median {statistics.median(t):.3f} s   fastest {min(t):.3f} s")
    ratio = statistics.median(a / b for a, b in zip(times["3 ops"], times["add_branch"]))
    print(f"paired 3 ops / add_branch: {ratio:.3f}x")


if __name__ == "__main__":
    main()
