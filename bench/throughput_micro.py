"""bench/throughput.py --micro: component levers (attention paths, ...) timed side by side, interleaved."""
from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fd_ref.method.drop_path import add_branch, drop_path  # noqa: E402
from fd_ref.optim.groups import param_groups  # noqa: E402
from throughput_configs import DTYPES, build_base  # noqa: E402
from throughput_measure import CpuPeakMemory, CudaPeakMemory  # noqa: E402

# -- component levers, side by side (--micro) -------------------------------------------------------------
def _interleaved(fns: dict[str, Callable[[], object]], reps: int, sync: Callable[[], None]) -> dict[str, dict]:
    """Run every fn once untimed, then ``reps`` rounds of one timed call each (rotating order).

    Returns per name the median time and the median of the per-round ratios first/this."""
    names = list(fns)
    for n in names:
        fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        for n in names[r % len(names):] + names[:r % len(names)]:
            sync()
            t0 = time.perf_counter()
            fns[n]()
            sync()
            times[n].append(time.perf_counter() - t0)
    first = names[0]
    return {n: dict(time_s=statistics.median(times[n]),
                    speedup=statistics.median(a / b for a, b in zip(times[first], times[n])))
            for n in names}


def micro_levers(args: argparse.Namespace, device: torch.device, reps: int) -> list[dict]:
    """Each lever on the one component it touches, at the benchmark's shapes: a few ms to a few s per call,
    so many more side-by-side repetitions than full steps allow. The first entry of each group is its
    baseline."""
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    memory = CudaPeakMemory(device) if cuda else CpuPeakMemory()
    dtype = DTYPES[args.precision]
    autocast = (contextlib.nullcontext() if dtype == torch.float32
                else torch.autocast(device.type, dtype=dtype))
    base = build_base(args, device)
    student, teacher = base.student, base.teacher
    x_img = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    groups: list[tuple[str, dict[str, Callable[[], object]], int]] = []

    # Student attention (one block, forward + backward, the shared bias trainable): explicit vs SDPA.
    attn = copy.deepcopy(student.blocks[0].attn)
    attn.explicit_on_cpu_training = False  # "sdpa" means SDPA here, also where fd_ref avoids it (CPU training)
    tokens = torch.randn(args.batch, student.grid[0] * student.grid[1] + 1, student.embed_dim, device=device)
    table = student.rel_pos_bias

    def attention_step(fused: bool) -> Callable[[], None]:
        def run() -> None:
            attn.fused = fused
            x = tokens.detach().requires_grad_()
            with autocast:
                out, _ = attn(x, table())
            out.float().sum().backward()
            attn.zero_grad(set_to_none=True)
            table.zero_grad(set_to_none=True)
        return run
    groups.append(("student attention fwd+bwd (1 block)",
                   {"explicit softmax": attention_step(False), "sdpa": attention_step(True)}, reps))

    # Teacher attention (no grad): explicit vs SDPA.
    tattn = teacher.model.blocks[0].attn if hasattr(teacher.model, "blocks") else None
    if isinstance(tattn, type(attn)):
        tbias = teacher.model.rel_pos_bias() if teacher.model.rel_pos_bias is not None else None
        ttokens = torch.randn(args.batch, tokens.shape[1], teacher.embed_dim, device=device)

        def teacher_attention(fused: bool) -> Callable[[], None]:
            def run() -> None:
                tattn.fused = fused
                with torch.no_grad(), autocast:
                    tattn(ttokens, tbias)
            return run
        groups.append(("teacher attention fwd, no_grad (1 block)",
                       {"explicit softmax": teacher_attention(False), "sdpa": teacher_attention(True)}, reps))

    # Patch embedding forward + backward: contiguous vs channels-last images and weight.
    pe = copy.deepcopy(student.patch_embed)
    pe_cl = copy.deepcopy(student.patch_embed)
    pe_cl.proj.weight.data = pe_cl.proj.weight.data.contiguous(memory_format=torch.channels_last)
    x_cl = x_img.contiguous(memory_format=torch.channels_last)

    def patch_step(module: nn.Module, x: torch.Tensor) -> Callable[[], None]:
        def run() -> None:
            with autocast:
                out = module(x)
            out.float().sum().backward()
            module.zero_grad(set_to_none=True)
        return run
    groups.append(("patch embedding fwd+bwd (student)",
                   {"contiguous": patch_step(pe, x_img), "channels-last": patch_step(pe_cl, x_cl)}, reps))

    # Residual update of a student block, x + drop_path(gamma * branch), forward + backward: the three
    # separate ops (layer scale, drop path, add) vs fd_ref's one addcmul (add_branch). The branch comes out
    # of a linear layer, so under autocast it is in the compute dtype while x and gamma stay fp32.
    block = student.blocks[-1]
    gamma_p, rate = block.ls1.gamma.detach().clone().requires_grad_(), max(block.drop_path1.p, 0.1)
    n_tokens = student.grid[0] * student.grid[1] + 1
    x_res = torch.randn(args.batch, n_tokens, student.embed_dim, device=device)
    y_res = torch.randn_like(x_res).to(dtype)

    def residual_step(fused: bool) -> Callable[[], None]:
        def run() -> None:
            x, y = x_res.clone().requires_grad_(), y_res.clone().requires_grad_()
            out = add_branch(x, y, gamma_p, rate, True) if fused else x + drop_path(gamma_p * y, rate, True)
            out.sum().backward()
            gamma_p.grad = None
        return run
    groups.append((f"residual update fwd+bwd (drop path {rate:g})",
                   {"3 ops (scale, drop, add)": residual_step(False), "addcmul (add_branch)": residual_step(True)},
                   reps))

    # Teacher forward: no_grad vs inference_mode (whole teacher; fewer repetitions).
    def teacher_forward(mode) -> Callable[[], None]:
        def run() -> None:
            with mode(), autocast:
                teacher(x_img)
        return run
    groups.append(("teacher forward (whole network)",
                   {"no_grad": teacher_forward(torch.no_grad),
                    "inference_mode": teacher_forward(torch.inference_mode)},
                   max(3, reps // 4)))

    # AdamW step over the student's parameters: for-loop vs foreach vs fused.
    trainable = nn.ModuleDict({"student": copy.deepcopy(student), "projection": copy.deepcopy(base.projection)})
    for prm in trainable.parameters():
        prm.grad = torch.randn_like(prm)
    opts = {kind: torch.optim.AdamW(param_groups(trainable, 0.05), lr=1.5e-4, weight_decay=0.05, **kw)
            for kind, kw in (("for-loop (foreach=False)", dict(foreach=False)),
                             ("foreach", dict(foreach=True)), ("fused", dict(fused=True)))}
    groups.append(("AdamW step (student + projection)", {k: o.step for k, o in opts.items()}, reps))

    results = []
    for group, fns, n in groups:
        for name, r in _interleaved(fns, n, sync).items():
            results.append(dict(group=group, variant=name, **r))
    # Memory afterwards, one untimed call each (see CpuPeakMemory.map_large_blocks).
    if not cuda:
        memory.map_large_blocks()
    peaks = {}
    for group, fns, _ in groups:
        for name, fn in fns.items():
            memory.start()
            fn()
            sync()
            peaks[group, name] = memory.peak()
    for r in results:
        r["peak_bytes"] = peaks[r["group"], r["variant"]]
    return results


def print_micro(results: list[dict], args: argparse.Namespace, device: torch.device) -> None:
    threads = torch.get_num_threads()
    print(f"component levers: {args.student} <- {args.teacher}, {args.img_size} px, batch {args.batch}, "
          f"{args.precision}, {device}, {threads} thread{'s' if threads > 1 else ''}")
    header = f"{'component':<42} {'variant':<26} {'ms':>9} {'speed-up':>8} {'peak MiB':>9}"
    print(header)
    print("-" * len(header))
    for r in results:
        mem = r["peak_bytes"]
        print(f"{r['group']:<42} {r['variant']:<26} {1e3 * r['time_s']:>9.1f} {r['speedup']:>7.2f}x "
              f"{mem / 2**20 if mem is not None else float('nan'):>9.1f}")
