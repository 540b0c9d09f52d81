"""What the teacher's precision does to the distillation target, and what it buys (issue #23).

A ViT-B/16 teacher (timm ``vit_base_patch16_224``: the DINO / DeiT geometry, 768 wide, 12 blocks, 197 tokens)
with random weights sees one batch of random images in five precision choices. Each choice's target
``whiten(teacher(x))`` (paper Sec. 3.1) is compared with the float32 one, token by token:

    err(token) = || w - w_fp32 || / || w_fp32 ||      (L2 over the 768 channels)

and the forward pass is timed (median of interleaved rounds after one warm-up round). Choices:

    fp32                   float32 weights, no autocast (the reference)
    bf16 whole             every parameter and the input cast to bf16, no autocast: fd-ref before issue #23
    bf16 matrices          Linear / Conv weights in bf16, everything else fp32, bf16 autocast:
                           fd-ref now (``Teacher.set_precision(torch.bfloat16)``); norms, embeddings, the
                           residual stream and the returned tokens in fp32
    fp32 weights autocast  float32 weights under bf16 autocast (published DINO / DeiT teachers)
    bf16, fp32 norms       every parameter bf16 except the LayerNorms, bf16 autocast: norms computed in fp32
                           but a bf16 residual stream (the published CLIP teacher's choice, fp16 there)

    python bench/teacher_precision.py --json bench/results/teacher_precision.json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fd_ref.models.teachers import Teacher  # noqa: E402
from fd_ref.method.whitening import whiten  # noqa: E402


def build(seed: int) -> Teacher:
    import timm

    torch.manual_seed(seed)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    return Teacher(model, model.num_features, tuple(model.patch_embed.grid_size), model.num_prefix_tokens)


def choices(seed: int) -> dict:
    """name -> (forward fn images -> tokens, bytes of the teacher's parameters)."""
    bf16 = torch.bfloat16
    out = {}

    fp32 = build(seed)
    out["fp32"] = (fp32, contextlib.nullcontext)

    whole = build(seed)
    whole.model.to(bf16)
    out["bf16 whole"] = (lambda x: whole.model.forward_features(x.to(bf16)), contextlib.nullcontext, whole)

    matrices = build(seed).set_precision(bf16)
    out["bf16 matrices"] = (matrices, contextlib.nullcontext)

    out["fp32 weights autocast"] = (fp32, lambda: torch.autocast("cpu", dtype=bf16))

    norms = build(seed)
    norms.model.to(bf16)
    for m in norms.model.modules():
        if isinstance(m, nn.LayerNorm):  # computed in fp32, returned in the input's dtype (published CLIP)
            m.float()
            m.register_forward_pre_hook(lambda mod, args: setattr(mod, "in_dtype", args[0].dtype) or (args[0].float(),))
            m.register_forward_hook(lambda mod, args, out: out.to(mod.in_dtype))
    out["bf16, fp32 norms"] = (norms, lambda: torch.autocast("cpu", dtype=bf16))
    return out


def param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return sorted(f for f in flags if "bf16" in f or f.startswith("amx") or f == "avx512f")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    x = torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(args.seed + 1))
    table = choices(args.seed)
    fns = {}
    sizes = {}
    for name, entry in table.items():
        fn, ctx = entry[0], entry[1]
        owner = entry[2] if len(entry) > 2 else fn
        sizes[name] = param_bytes(owner)

        def run(fn=fn, ctx=ctx):
            with torch.no_grad(), ctx():
                return fn(x)
        fns[name] = run

    targets = {name: whiten(fn()) for name, fn in fns.items()}  # also the warm-up round
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)

    ref = targets["fp32"]
    ref_norm = ref.norm(dim=-1)
    t_fp32 = statistics.median(times["fp32"])
    rows = []
    for name in names:
        err = (targets[name] - ref).norm(dim=-1) / ref_norm
        t = statistics.median(times[name])
        rows.append(dict(choice=name, max_rel_err=float(err.max()), mean_rel_err=float(err.mean()),
                         max_abs_err=float((targets[name] - ref).abs().max()), time_s=t,
                         img_per_s=args.batch / t, speedup_vs_fp32=t_fp32 / t, weights_mb=sizes[name] / 2**20))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    result = dict(model="timm vit_base_patch16_224, random weights (seed %d)" % args.seed,
                  batch=args.batch, rounds=args.rounds, img_size=224, threads=torch.get_num_threads(),
                  torch=torch.__version__, cpu_flags=cpu_flags(), load_avg_1m=os.getloadavg()[0],
                  commit=commit, rows=rows)
    print(f"{'choice':24s} {'max rel err':>11s} {'mean rel err':>12s} {'max abs err':>11s} {'s/batch':>8s} "
          f"{'img/s':>6s} {'x fp32':>6s} {'MB':>6s}")
    for row in rows:
        print(f"{row['choice']:24s} {row['max_rel_err']:11.2e} {row['mean_rel_err']:12.2e} {row['max_abs_err']:11.2e} "
              f"{row['time_s']:8.2f} {row['img_per_s']:6.1f} {row['speedup_vs_fp32']:6.2f} {row['weights_mb']:6.0f}")
    print(f"batch {args.batch}, {args.rounds} timed rounds, {result['threads']} threads, torch {torch.__version__}, "
          f"CPU flags {' '.join(result['cpu_flags'])}, load {result['load_avg_1m']:.1f}, commit {commit}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
