"""Where one FD training step spends its time: torch.profiler over a few steps of bench/throughput.py's
configurations, kernels grouped into what they do.

    python bench/profile_step.py --device cuda --student vit_base --teacher vit_base --batch 128 --precision bf16
    python bench/profile_step.py ... --timm --json profile.json     # timm's Beit + ViT step beside fd_ref's

For each configuration (fd_ref as shipped, ``optimised``; with ``--timm`` also ``timm``) it warms up, then
profiles ``--steps`` steps and reports the device time per step (CUDA kernels on a GPU, CPU operators on a
CPU) split into groups by kernel name: matrix products, attention, normalisation, softmax, elementwise
activations and arithmetic, reductions, copies and casts, optimiser, other; and the slowest kernels. The
groups are read off kernel names, so they are an aid to reading, not an exact accounting.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput_configs import (DTYPES, build_base, build_config, build_timm_base,  # noqa: E402
                                optimised_knobs, timm_knobs)

# (group, pattern on the lower-cased kernel or operator name); the first match wins
GROUPS = [
    ("attention", r"flash|fmha|attention|efficient_attention|sdpa|cudnn.*(mha|sdp)"),
    ("optimizer", r"adam|multi_tensor|foreach|_fused_adam"),
    ("matmul", r"gemm|matmul|\bmm\b|addmm|bmm|linear|cutlass|sm90_xmma|nvjet|wgmma|conv|dot"),
    ("normalisation", r"layer_norm|layernorm|norm"),
    ("softmax", r"softmax"),
    ("copy/cast", r"copy|cast|to_copy|contiguous|cat|index|gather|scatter|memcpy|memset|fill|transpose|clone"),
    ("reduction", r"reduce|sum|mean|max|min"),
    ("elementwise", r"elementwise|gelu|mul|add|div|sub|exp|sqrt|pow|where|abs|smooth_l1|vectorized|unrolled|"
                    r"triton_poi|triton_per|triton_red"),
]


def group_of(name: str) -> str:
    lowered = name.lower()
    for group, pattern in GROUPS:
        if re.search(pattern, lowered):
            return group
    return "other"


def profile_config(config, steps: int, cuda: bool) -> dict:
    """Device time per step of ``config`` by group, and its ten slowest kernels (ms per step)."""
    for _ in range(2):
        config.step()
    if cuda:
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            config.step()
        if cuda:
            torch.cuda.synchronize()
    by_group: dict[str, float] = defaultdict(float)
    kernels = []
    if cuda:
        for event in prof.events():
            if event.device_type == torch.autograd.DeviceType.CUDA:
                kernels.append((event.name, event.device_time_total))
    else:  # the CPU: leaf operators' own time (children subtracted), so nothing is counted twice
        for avg in prof.key_averages():
            if avg.self_cpu_time_total > 0 and avg.key.startswith("aten::"):
                kernels.append((avg.key, avg.self_cpu_time_total))
    totals: dict[str, float] = defaultdict(float)
    for name, us in kernels:
        totals[name] += us
        by_group[group_of(name)] += us
    total = sum(by_group.values())
    ms = lambda us: us / 1000 / steps  # noqa: E731
    return {"config": config.name, "device_ms_per_step": ms(total),
            "groups_ms_per_step": {g: ms(v) for g, v in sorted(by_group.items(), key=lambda kv: -kv[1])},
            "groups_fraction": {g: v / total for g, v in by_group.items()} if total else {},
            "top_kernels_ms_per_step": [(n[:120], ms(v)) for n, v in sorted(totals.items(), key=lambda kv: -kv[1])[:10]]}


def main(argv: list | None = None) -> list:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--student", default="vit_small")
    p.add_argument("--teacher", default="vit_small")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--precision", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--steps", type=int, default=3, help="profiled steps per configuration")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--timm", action="store_true", help="also profile timm's Beit + ViT step")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--json", default=None, help="write the report to this file")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=torch.Generator().manual_seed(1))
    images = images.to(device)
    configs = [build_config("optimised", optimised_knobs(args, args.precision), build_base(args, device), images,
                            args, device)]
    if args.timm:
        configs.append(build_config("timm", timm_knobs(args.precision), build_timm_base(args, device), images,
                                    args, device))
    reports = []
    for config in configs:
        report = profile_config(config, args.steps, cuda)
        reports.append(report)
        print(f"{report['config']}: {report['device_ms_per_step']:.2f} ms of device time per step")
        for group, value in report["groups_ms_per_step"].items():
            print(f"  {group:<14} {value:8.2f} ms  {100 * report['groups_fraction'][group]:5.1f}%")
        for name, value in report["top_kernels_ms_per_step"]:
            print(f"    {value:8.2f} ms  {name}")
    if args.json:
        setup = {k: getattr(args, k) for k in ("student", "teacher", "img_size", "batch", "precision", "steps")}
        Path(args.json).write_text(json.dumps({"setup": dict(setup, device=str(device),
                                                             torch=torch.__version__), "configs": reports},
                                              indent=1) + "\n")
    return reports


if __name__ == "__main__":
    main()
