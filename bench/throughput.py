"""Throughput of one full feature-distillation training step, baseline and optimised side by side.

One step = teacher forward (frozen) + student forward + projection + smooth-L1 + backward + AdamW step, on
random weights and random images (speed does not depend on the values). For every configuration the
script reports, after warm-up, the median over ``--steps`` timed steps of

    img/s              = batch / median step time
    GFLOP/step         = FLOPs counted by FlopCounterMode on one real step (a multiply-add counts 2)
    GFLOP/s            = GFLOP/step / median step time
    % peak             = GFLOP/s / the machine's own matmul FLOP rate in the same precision, measured in
                         the same run (an n x n x n matmul before every round of steps: the best round,
                         for the best thread count used)
    tensor memory      = CPU: the exact peak of tensor bytes allocated by the step above its start (the
                         running sum of torch.profiler's allocation events, in the same untimed step)
    memory             = CPU: the step's peak resident memory above the resident memory at its start
                         (Linux VmHWM, reset through /proc/self/clear_refs, after malloc_trim, in one
                         extra untimed step with every block >= 1 MiB mmapped so that resident memory
                         follows the live tensors; the profiler's own buffers, a few MiB, included);
                         CUDA: torch.cuda.max_memory_allocated during the timed steps above the memory
                         allocated before the step (largest)
    speed-up           = median over rounds of (baseline step time / this step time) in the same round
    min s, min su      = the fastest timed step, and baseline's fastest / this one's fastest (on a loaded
                         machine the noise only ever adds time, so the fastest steps are a second estimate)

Configurations run interleaved, one step each per round (the order rotates every round), so a change of
load on a shared machine hits all of them alike; every number is a ratio measured side by side.

The *baseline* is the straightforward step: explicit ``softmax(q k^T * scale + B) v`` attention
(``set_fused_attn(False)``), q/v bias concatenated on every call (fd_ref itself still does that: 3 x C
numbers per call, next to a [B*N, C] x [C, 3C] matmul), the teacher run under autocast (bf16)
rather than cast, a for-loop AdamW (``foreach=False``). The *optimised* configuration is fd_ref as shipped:
the model's defaults and ``build_optimizer``'s choice, plus, like train.py, the teacher's matrix layers in
bf16 (``Teacher.set_precision``) when training in bf16 (CPU and CUDA). ``--compile`` adds *compiled*, the optimised configuration
under ``torch.compile``, next to the eager one. ``--timm`` adds *timm*: the same FD step built from timm's
own ``Beit`` student (shared relative position bias, layer scale 0.1, the student preset's width and depth)
and timm's ``VisionTransformer`` as teacher (the teacher preset's shape), with the same projection, whitened
target, smooth-L1 and optimiser; every row's ``vs timm`` is timm's step time / its own, in the same round.
``--kernels flex sdpa explicit`` runs fd_ref's optimised step once per attention kernel
(``fd_ref.models.attention``; rows ``optimised <kernel>``, compiled ``compiled <kernel>``, for the kernels of
``--compile-kernels``, default all), and ``--finetune`` adds the fine-tuning step (the student preset as a
1000-class classifier with one position bias table per block, cross-entropy, AdamW; rows ``finetune
<kernel>``, ``finetune compiled <kernel>``, with ``--timm`` beside timm's Beit as the same classifier, ``timm
finetune``); with ``--timm --compile`` timm's steps are compiled too (``timm compiled``; ``--compile-tasks``
picks the steps that get compiled rows), and every row's
``vs timm`` compares it with timm's step of the same task, eager with eager and compiled with compiled.
``--levers`` adds one configuration per single lever applied to the baseline. ``--precision fp32 bf16``
runs every configuration in each precision, in one run; each row's ``% peak`` is against the matmul rate of
its own precision, and on CUDA ``MFU`` against the GPU's datasheet peak.

    python bench/throughput.py                                   # ViT-S/16 <- ViT-S/16, 224 px, batch 16, fp32
    python bench/throughput.py --precision fp32 bf16 --timm --compile --no-baseline
    python bench/throughput.py --levers --steps 3 --warmup 1
    python bench/throughput.py --device cuda --student vit_base --teacher vit_base --batch 128 --precision bf16 \
        --compile --no-baseline
    python bench/throughput.py --device cuda ... --no-baseline --timm --compile --finetune --kernels flex sdpa explicit

The configurations live in throughput_configs.py, the measurement helpers (memory, matmul peaks) in
throughput_measure.py, ``--micro`` in throughput_micro.py; this file times the configurations and reports.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fd_ref.engine.flops import count_flops  # noqa: E402
from throughput_configs import (BASELINE, BF16_LEVERS, DTYPES, LEVERS, Config, Knobs,  # noqa: E402
                                build_bases, build_config, optimised_knobs, timm_knobs)
from throughput_measure import (CpuPeakMemory, CudaPeakMemory, cpu_flags, datasheet_peak,  # noqa: E402
                                default_peak_n, matmul_rate, process_peak_rss, tensor_peak_bytes)
from throughput_micro import micro_levers, print_micro  # noqa: E402

def ratio_to(ref: Optional[Config], c: Config) -> tuple[Optional[float], Optional[float]]:
    """(median over rounds of ref time / c time in the same round, ref's fastest / c's fastest)."""
    if ref is None:
        return None, None
    return (statistics.median(b / x for b, x in zip(ref.times, c.times)), min(ref.times) / min(c.times))


def main(argv: Optional[list[str]] = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", default="vit_small")
    p.add_argument("--teacher", default="vit_small",
                   help="an fd_ref preset (random weights) or any build_teacher name")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--precision", choices=sorted(DTYPES), nargs="+", default=["fp32"],
                   help="one or more: every configuration runs in each (names then end in the precision)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per configuration first")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave torch's default)")
    p.add_argument("--compile", action="store_true",
                   help="add 'compiled': the optimised configuration under torch.compile, next to the eager one")
    p.add_argument("--timm", action="store_true",
                   help="add 'timm': the same FD step with timm's Beit student and ViT teacher")
    p.add_argument("--kernels", nargs="+", default=None, choices=["flex", "sdpa", "explicit"],
                   help="one optimised row per attention kernel instead of the default (auto) one")
    p.add_argument("--compile-kernels", nargs="*", default=None,
                   help="with --compile and --kernels: the kernels compiled rows are added for (default: all)")
    p.add_argument("--compile-tasks", nargs="*", default=["fd", "finetune"], choices=["fd", "finetune"],
                   help="with --compile and --kernels: the steps compiled rows are added for (fd_ref's and timm's)")
    p.add_argument("--finetune", action="store_true",
                   help="add the fine-tuning step (per-block bias tables, 1000 classes) beside the FD step")
    p.add_argument("--grad-checkpointing", action="store_true", help="gradient checkpointing in the optimised config")
    p.add_argument("--levers", action="store_true", help="also run the baseline with each single lever")
    p.add_argument("--only", nargs="*", default=None, help="run only these configurations (names as printed)")
    p.add_argument("--no-baseline", action="store_true", help="skip the baseline (no speed-up column)")
    p.add_argument("--peak-n", type=int, default=0,
                   help="matmul size for the peak (default 4096 on CUDA; on CPU 2048, 256 for emulated bf16)")
    p.add_argument("--micro", type=int, default=0, metavar="REPS",
                   help="instead of full steps, time each lever on its own component, REPS rounds side by side")
    p.add_argument("--json", default=None, help="append one JSON line per configuration to this file")
    args = p.parse_args(argv)
    precisions = list(dict.fromkeys(args.precision))
    args.precision = precisions[0]  # --micro measures in the first one

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    cuda = device.type == "cuda"
    peak_n = {prec: args.peak_n or default_peak_n(DTYPES[prec], cuda) for prec in precisions}
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32, on both sides of the ratio
        torch.backends.cudnn.allow_tf32 = False
    flags = [] if cuda else cpu_flags()

    if args.micro:
        load_before = os.getloadavg()
        results = micro_levers(args, device, args.micro)
        load_after = os.getloadavg()
        print_micro(results, args, device)
        print(f"load {load_before[0]:.2f} -> {load_after[0]:.2f}")
        if args.json:
            with open(args.json, "a") as f:
                for r in results:
                    f.write(json.dumps(dict(r, kind="micro", student=args.student, teacher=args.teacher,
                                            img_size=args.img_size, batch=args.batch, precision=args.precision,
                                            device=str(device), threads=threads, reps=args.micro,
                                            cpu_flags=flags, loadavg_before=load_before,
                                            loadavg_after=load_after, torch=torch.__version__,
                                            utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))) + "\n")
        return results

    configs_wanted: list[tuple[str, Knobs]] = []
    suffix = (lambda prec: f" {prec}") if len(precisions) > 1 else (lambda prec: "")
    for prec in precisions:
        if not args.no_baseline:
            configs_wanted.append(("baseline" + suffix(prec), replace(BASELINE, precision=prec)))
        optimised = optimised_knobs(args, prec)
        tasks = ["fd"] + (["finetune"] if args.finetune else [])
        kernels = args.kernels or ["auto"]
        compiled = args.compile_kernels if args.compile_kernels is not None else kernels
        for task in tasks:
            eager, comp = {"fd": ("optimised", "compiled"), "finetune": ("finetune", "finetune compiled")}[task]
            for kernel in kernels:
                name = "" if kernel == "auto" else f" {kernel}"
                knobs = replace(optimised, attention=kernel, task=task,
                                student_fused_attn=optimised.student_fused_attn and kernel != "explicit")
                configs_wanted.append((eager + name + suffix(prec), knobs))
                if args.compile and kernel in compiled and (not args.kernels or task in args.compile_tasks):
                    configs_wanted.append((comp + name + suffix(prec), replace(knobs, compile=True)))
            if args.timm:
                timm_name = "timm" + (" finetune" if task == "finetune" else "")
                configs_wanted.append((timm_name + suffix(prec), replace(timm_knobs(prec), task=task)))
                if args.compile and args.kernels and task in args.compile_tasks:
                    configs_wanted.append((timm_name + " compiled" + suffix(prec),
                                           replace(timm_knobs(prec), task=task, compile=True)))
        if args.levers:
            levers = {**LEVERS, **(BF16_LEVERS if prec != "fp32" else {})}
            configs_wanted += [(name + suffix(prec), replace(BASELINE, precision=prec, **delta))
                               for name, delta in levers.items()]
    if args.only:
        names = [n for n, _ in configs_wanted]
        configs_wanted = [(n, k) for n, k in configs_wanted if n in args.only]
        if not configs_wanted:
            raise SystemExit(f"--only matched nothing; names: {', '.join(names)}")

    load_before = os.getloadavg()
    bases = build_bases({(k.impl, k.task) for _, k in configs_wanted}, args, device)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=g).to(device)
    configs = [build_config(n, k, bases[k.impl, k.task], images, args, device) for n, k in configs_wanted]
    memory = CudaPeakMemory(device) if cuda else CpuPeakMemory()
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)

    def set_threads(c: Config) -> None:
        torch.set_num_threads(c.knobs.threads or threads)

    # Model FLOPs: one eager step per implementation under FlopCounterMode, attention written out (explicit
    # softmax) so that the counter sees every matmul (the CPU flash kernel is not counted). Every
    # configuration of one implementation does the same arithmetic; no recomputation from gradient
    # checkpointing is counted (MFU convention).
    for impl, task in {(c.knobs.impl, c.knobs.task) for c in configs}:
        knobs = replace(BASELINE, precision=precisions[0], impl=impl, task=task, optimizer="library")
        counter = build_config("flops", knobs, bases[impl, task], images, args, device)
        model_flops = count_flops(counter.eager_step)
        for c in configs:
            if (c.knobs.impl, c.knobs.task) == (impl, task):
                c.flops = model_flops
        del counter
    del bases
    # Warm-up (compilation happens here for compiled configurations).
    t_warm = time.perf_counter()
    for _ in range(args.warmup):
        for c in configs:
            set_threads(c)
            c.step()
    sync()
    warmup_seconds = time.perf_counter() - t_warm

    # The machine's matmul rate for every (precision, thread count) used; the peak is the best of them.
    keys = sorted({(c.knobs.precision, c.knobs.threads or threads) for c in configs})
    peaks: dict[tuple[str, int], list[float]] = {k: [] for k in keys}

    def measure_peaks() -> None:
        for prec, n in keys:
            torch.set_num_threads(n)
            peaks[prec, n].append(matmul_rate(DTYPES[prec], device, peak_n[prec], reps=3))

    t_start = time.perf_counter()
    for r in range(args.steps):
        measure_peaks()
        order = configs[r % len(configs):] + configs[:r % len(configs)]
        for c in order:
            set_threads(c)
            if cuda:
                memory.start()
            sync()
            t0 = time.perf_counter()
            c.step()
            sync()
            c.times.append(time.perf_counter() - t0)
            if cuda:
                c.mems.append(memory.peak())
    measure_peaks()
    if not cuda:
        # Memory in one more, untimed, round: handing freed memory back to the system before a step (so
        # that its peak shows) would make the step pay for page faults a running training does not pay.
        memory.map_large_blocks()
        for c in configs:
            set_threads(c)
            memory.start()
            c.tensor_peak = tensor_peak_bytes(c.step)
            c.mems.append(memory.peak())
    torch.set_num_threads(threads)
    bench_seconds = time.perf_counter() - t_start
    load_after = os.getloadavg()
    # Load on a shared machine only ever slows a matmul down: the peak is the best round (each round's
    # rate being the median of 3 matmuls), for the best thread count, per precision.
    peak_by_key = {k: max(v) for k, v in peaks.items()}
    peak = {prec: max(v for (pr, _), v in peak_by_key.items() if pr == prec) for prec in precisions
            if any(pr == prec for pr, _ in peak_by_key)}

    def first(name: str, prec: str) -> Optional[Config]:
        return next((c for c in configs if c.name == name + suffix(prec)), None)

    records = []
    for c in configs:
        prec = c.knobs.precision
        t = statistics.median(c.times)
        mem = max(m for m in c.mems) if c.mems and c.mems[0] is not None else None
        speedup, speedup_min = ratio_to(first("baseline", prec), c)
        timm_ref = "timm" + (" finetune" if c.knobs.task == "finetune" else "")
        timm_ref += " compiled" if c.knobs.compile and first(timm_ref + " compiled", prec) else ""
        vs_timm, vs_timm_min = ratio_to(first(timm_ref, prec), c)
        sheet = datasheet_peak(DTYPES[prec], device)
        records.append(dict(
            config=c.name, impl=c.knobs.impl, task=c.knobs.task, attention=c.knobs.attention, student=args.student, teacher=args.teacher,
            img_size=args.img_size, batch=args.batch, precision=prec, device=str(device),
            device_name=torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine(),
            cpu_flags=flags, threads=c.knobs.threads or threads, step_s_median=t, step_s_all=c.times,
            step_s_min=min(c.times), img_per_s=args.batch / t, flops_per_step=c.flops, flops_per_s=c.flops / t,
            matmul_peak_flops_per_s=peak[prec], matmul_peak_n=peak_n[prec],
            matmul_peak_by_threads={str(n): v for (pr, n), v in peaks.items() if pr == prec},
            fraction_of_peak=c.flops / t / peak[prec], datasheet_peak_flops_per_s=sheet,
            mfu_datasheet=c.flops / t / sheet if sheet else None, peak_step_memory_bytes=mem,
            peak_step_tensor_bytes=c.tensor_peak,
            memory_kind="cuda max_memory_allocated above step start" if cuda
            else "VmHWM above VmRSS at step start (after malloc_trim; blocks >= 1 MiB mmapped)",
            speedup_vs_baseline=speedup, speedup_of_fastest_steps=speedup_min,
            speedup_vs_timm=vs_timm, speedup_vs_timm_of_fastest_steps=vs_timm_min, knobs=asdict(c.knobs),
            steps=args.steps, warmup=args.warmup, warmup_seconds=warmup_seconds,
            loadavg_before=load_before, loadavg_after=load_after, bench_seconds=bench_seconds,
            process_peak_rss_bytes=process_peak_rss(), torch=torch.__version__,
            utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            command="python bench/throughput.py " + " ".join(sys.argv[1:] if argv is None else argv)))

    print(f"{args.student} <- {args.teacher}, {args.img_size} px, batch {args.batch}, {device}"
          + (f" (flags: {' '.join(flags) or 'none of note'})" if not cuda else f" ({records[0]['device_name']})")
          + f", {threads} threads; load {load_before[0]:.2f} -> {load_after[0]:.2f}; warm-up "
          f"{warmup_seconds:.0f} s")
    for prec in peak:
        print(f"{prec} matmul {peak_n[prec]}^3 (best of {args.steps + 1} rounds): "
              + ", ".join(f"{v / 1e9:.1f} GFLOP/s at {n} thread{'s' if n > 1 else ''}"
                          for (pr, n), v in peak_by_key.items() if pr == prec)
              + f"; % peak of {prec} rows is of the best, {peak[prec] / 1e9:.1f}")
    header = (f"{'config':<28} {'step s':>7} {'img/s':>7} {'GFLOP/step':>10} {'GFLOP/s':>8} {'% peak':>7} "
              f"{'mem MiB':>8} {'tensor MiB':>10} {'speed-up':>8} {'min s':>7} {'min su':>7} {'vs timm':>7}")
    print(header)
    print("-" * len(header))
    for rec in records:
        mem = rec["peak_step_memory_bytes"]
        sp, spm, vt = rec["speedup_vs_baseline"], rec["speedup_of_fastest_steps"], rec["speedup_vs_timm"]
        tmem = rec["peak_step_tensor_bytes"]
        print(f"{rec['config']:<28} {rec['step_s_median']:>7.2f} {rec['img_per_s']:>7.2f} "
              f"{rec['flops_per_step'] / 1e9:>10.1f} {rec['flops_per_s'] / 1e9:>8.1f} "
              f"{100 * rec['fraction_of_peak']:>6.1f}% {mem / 2**20 if mem is not None else float('nan'):>8.0f} "
              f"{tmem / 2**20 if tmem is not None else float('nan'):>10.1f} "
              f"{'' if sp is None else f'{sp:.2f}x':>8} {rec['step_s_min']:>7.2f} "
              f"{'' if spm is None else f'{spm:.2f}x':>7} {'' if vt is None else f'{vt:.2f}x':>7}"
              + (f"  MFU {100 * rec['mfu_datasheet']:.1f}% of the datasheet {rec['datasheet_peak_flops_per_s'] / 1e12:.0f} "
                 f"TFLOP/s" if rec["mfu_datasheet"] else ""))
    if args.json:
        with open(args.json, "a") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")
    return records


if __name__ == "__main__":
    main()
