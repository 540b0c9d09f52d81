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
the model's defaults and ``build_optimizer``'s choice, plus, like train.py, the teacher cast to bf16
outright when training in bf16 (CPU and CUDA). ``--compile`` adds *compiled*, the optimised configuration
under ``torch.compile``, next to the eager one. ``--timm`` adds *timm*: the same FD step built from timm's
own ``Beit`` student (shared relative position bias, layer scale 0.1, the student preset's width and depth)
and timm's ``VisionTransformer`` as teacher (the teacher preset's shape), with the same projection, whitened
target, smooth-L1 and optimiser; every row's ``vs timm`` is timm's step time / its own, in the same round.
``--levers`` adds one configuration per single lever applied to the baseline. ``--precision fp32 bf16``
runs every configuration in each precision, in one run; each row's ``% peak`` is against the matmul rate of
its own precision, and on CUDA ``MFU`` against the GPU's datasheet peak.

    python bench/throughput.py                                   # ViT-S/16 <- ViT-S/16, 224 px, batch 16, fp32
    python bench/throughput.py --precision fp32 bf16 --timm --compile --no-baseline
    python bench/throughput.py --levers --steps 3 --warmup 1
    python bench/throughput.py --device cuda --student vit_base --teacher vit_base --batch 128 --precision bf16 \
        --compile --no-baseline
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fd_ref.distill import FeatureDistillation  # noqa: E402
from fd_ref.flops import count_flops  # noqa: E402
from fd_ref.loss import smooth_l1  # noqa: E402
from fd_ref.optim import build_optimizer, param_groups  # noqa: E402
from fd_ref.teachers import build_teacher  # noqa: E402
from fd_ref.vit import create_vit  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# -- configurations ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Knobs:
    """Everything that differs between two configurations of the same step."""
    student_fused_attn: bool = False     # student attention: SDPA (True) or the explicit formula
    teacher_fused_attn: bool = False     # same for the teacher
    force_sdpa: bool = False             # SDPA even where fd_ref takes the explicit formula (CPU training)
    teacher_cast: bool = False           # bf16: teacher weights cast to bf16 (True) or run under autocast
    teacher_inference_mode: bool = False  # teacher under inference_mode instead of no_grad
    optimizer: str = "plain"             # AdamW implementation: plain (foreach=False) | foreach | fused | library
    channels_last: bool = False          # images and patch-embedding weight in channels-last layout
    threads: int = 0                     # torch.set_num_threads for this configuration (0: the run's setting)
    compile: bool = False                # torch.compile the whole distillation module
    grad_checkpointing: bool = False     # recompute student blocks in the backward pass
    impl: str = "fd_ref"                 # whose student and teacher: fd_ref | timm (Beit student, ViT teacher)
    precision: str = ""                  # fp32 | bf16 (autocast); "" until the run sets it


BASELINE = Knobs()

# One lever at a time, applied to the baseline (``--levers``).
LEVERS: dict[str, dict] = {
    "sdpa (student+teacher)": dict(student_fused_attn=True, teacher_fused_attn=True, force_sdpa=True),
    "sdpa teacher only": dict(teacher_fused_attn=True),
    "adamw foreach": dict(optimizer="foreach"),
    "adamw fused": dict(optimizer="fused"),
    "teacher inference_mode": dict(teacher_inference_mode=True),
    "channels-last patch embed": dict(channels_last=True),
    "1 thread": dict(threads=1),
}
BF16_LEVERS: dict[str, dict] = {"teacher cast to bf16": dict(teacher_cast=True)}


def optimised_knobs(args: argparse.Namespace, precision: str) -> Knobs:
    """fd_ref as shipped: the model's own defaults, build_optimizer's choice, and, like train.py, the frozen
    teacher cast to bf16 outright when training in bf16 (CPU and CUDA)."""
    probe = create_vit(args.student, img_size=args.img_size, depth=1)
    return Knobs(student_fused_attn=probe.blocks[0].attn.fused, teacher_fused_attn=probe.blocks[0].attn.fused,
                 teacher_cast=precision == "bf16", optimizer="library",
                 grad_checkpointing=args.grad_checkpointing, precision=precision)


def timm_knobs(precision: str) -> Knobs:
    """timm's own models as shipped (fused attention on), the same optimiser and bf16 teacher as fd_ref."""
    return Knobs(student_fused_attn=True, teacher_fused_attn=True, teacher_cast=precision == "bf16",
                 optimizer="library", impl="timm", precision=precision)


# -- memory ---------------------------------------------------------------------------------------------
class CpuPeakMemory:
    """Peak resident memory of one step above the resident memory at its start (Linux only).

    Freed heap memory is handed back (malloc_trim) and the kernel's high-water mark reset
    (``5 > /proc/self/clear_refs``) before the step; VmHWM after the step is its peak.
    """

    def __init__(self) -> None:
        try:
            self.libc = ctypes.CDLL("libc.so.6")
        except OSError:
            self.libc = None
        self.ok = self._reset()

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise KeyError(key)

    def _reset(self) -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def map_large_blocks(self, threshold: int = 1 << 20) -> None:
        """Serve every allocation from ``threshold`` bytes up with its own mmap, returned on free (glibc
        mallopt M_MMAP_THRESHOLD, which also stops glibc from adapting it): resident memory then follows the
        live tensors instead of the heap's history, so two configurations compare. Slower (page faults on
        every large allocation): only for the untimed memory steps."""
        if self.libc is not None:
            self.libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD

    def start(self) -> None:
        if self.libc is not None:
            self.libc.malloc_trim(0)
        if self.ok:
            self._reset()
            self.rss0 = self._status("VmRSS")

    def peak(self) -> Optional[int]:
        if not self.ok:
            return None
        return self._status("VmHWM") - self.rss0


class CudaPeakMemory:
    def __init__(self, device: torch.device) -> None:
        self.device = device

    def start(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.base = torch.cuda.memory_allocated(self.device)

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device) - self.base


def tensor_peak_bytes(fn: Callable[[], object]) -> Optional[int]:
    """Run ``fn`` once and return the peak of CPU tensor memory it allocated above its start, exactly: the
    running sum of the allocation / free events torch.profiler records with ``profile_memory=True``."""
    from torch.profiler import ProfilerActivity, profile
    sys.stderr.flush()
    saved = os.dup(2)
    try:  # the profiler's C++ side logs start/stop lines on stderr
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                fn()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    try:
        events = [e for e in prof.profiler.kineto_results.events()
                  if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")]
    except AttributeError:  # private API of torch.profiler: give up quietly if it moves
        return None
    current = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        current += e.nbytes()
        peak = max(peak, current)
    return peak


def process_peak_rss() -> int:
    """Process-wide resident high-water mark since start (ru_maxrss, KiB on Linux)."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# -- matmul peak ----------------------------------------------------------------------------------------
def matmul_rate(dtype: torch.dtype, device: torch.device, n: int, reps: int) -> float:
    """FLOP/s of an n x n x n matmul: the better of ``a @ b`` and ``a @ b.T`` (F.linear's layout), each
    the median of ``reps`` timed calls after one untimed call. (On a CPU without native bf16 the two take
    different kernels: ``a @ b.T`` measured ~5x faster than ``a @ b`` in bf16 on the AVX2 EPYC.)"""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    best = 0.0
    for fn in (lambda: a @ b, lambda: a @ b.T):
        fn()
        sync()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        best = max(best, 2 * n ** 3 / statistics.median(times))
    return best


# -- one configuration ----------------------------------------------------------------------------------
@dataclass
class Config:
    name: str
    knobs: Knobs
    step: Callable[[], torch.Tensor] = field(repr=False, default=None)
    eager_step: Callable[[], torch.Tensor] = field(repr=False, default=None)
    times: list[float] = field(default_factory=list)
    mems: list[int] = field(default_factory=list)
    tensor_peak: Optional[int] = None
    flops: int = 0


def build_base(args: argparse.Namespace, device: torch.device) -> FeatureDistillation:
    torch.manual_seed(0)
    student = create_vit(args.student, img_size=args.img_size)
    teacher = build_teacher(args.teacher, img_size=args.img_size)
    return FeatureDistillation(student, teacher).to(device)


class TimmDistillation(nn.Module):
    """The same FD step built from timm's own models, an independent implementation of the same networks:
    student ``timm.models.beit.Beit`` (shared relative position bias, no absolute embedding, layer scale 0.1,
    q/v bias, class token, final LayerNorm over all tokens), teacher ``timm``'s ``VisionTransformer`` of the
    teacher preset's shape (frozen, eval mode), a linear projection, and the loss written out with plain torch:

        target = layer_norm(teacher.forward_features(x).float())          (no affine, eps 1e-5)
        loss   = smooth_l1(projection(student.forward_features(x)).float(), target, beta=2.0)

    Random weights, like fd_ref's side (speed does not depend on the values)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, beta: float = 2.0) -> None:
        super().__init__()
        self.student, self.teacher, self.beta = student, teacher, beta
        self.projection = nn.Linear(student.embed_dim, teacher.embed_dim)
        self.teacher.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.teacher.eval()
        with torch.no_grad():
            t = self.teacher.forward_features(x.to(next(self.teacher.parameters()).dtype))
            target = nn.functional.layer_norm(t.float(), (t.shape[-1],), eps=1e-5)
        pred = self.projection(self.student.forward_features(x))
        return nn.functional.smooth_l1_loss(pred.float(), target, beta=self.beta)


def build_timm_base(args: argparse.Namespace, device: torch.device) -> TimmDistillation:
    """timm's Beit student and ViT teacher with the widths, depths, heads and patch sizes of fd_ref's presets."""
    from timm.models.beit import Beit
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    from fd_ref.vit import PRESETS
    if args.student not in PRESETS or args.teacher not in PRESETS:
        raise SystemExit(f"--timm needs fd_ref preset names for --student and --teacher ({', '.join(PRESETS)})")
    s, t = PRESETS[args.student], PRESETS[args.teacher]
    shape = lambda p: dict(img_size=args.img_size, patch_size=p["patch_size"], embed_dim=p["embed_dim"],  # noqa: E731
                           depth=p["depth"], num_heads=p["num_heads"], mlp_ratio=4.0, qkv_bias=True,
                           num_classes=0)
    torch.manual_seed(0)
    student = Beit(**shape(s), use_abs_pos_emb=False, use_rel_pos_bias=False, use_shared_rel_pos_bias=True,
                   init_values=0.1, global_pool="token", drop_path_rate=0.0)
    teacher = TimmViT(**shape(t), global_pool="token")
    student.embed_dim, teacher.embed_dim = s["embed_dim"], t["embed_dim"]
    return TimmDistillation(student, teacher).to(device)


def set_timm_fused_attn(model: nn.Module, enabled: bool) -> None:
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = enabled


def make_optimizer(model: nn.Module, kind: str) -> torch.optim.Optimizer:
    trainable = nn.ModuleDict({"student": model.student, "projection": model.projection})
    lr, wd = 1.5e-4, 0.05
    if kind == "library":
        return build_optimizer(trainable, lr=lr, weight_decay=wd)
    kernel = {"plain": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}[kind]
    return torch.optim.AdamW(param_groups(trainable, wd), lr=lr, weight_decay=wd, **kernel)


def build_config(name: str, knobs: Knobs, base: nn.Module, images: torch.Tensor,
                 args: argparse.Namespace, device: torch.device) -> Config:
    if knobs.impl == "timm":
        return build_timm_config(name, knobs, base, images, device)
    model = copy.deepcopy(base)
    model.student.set_fused_attn(knobs.student_fused_attn)
    if hasattr(model.teacher.model, "set_fused_attn"):
        model.teacher.model.set_fused_attn(knobs.teacher_fused_attn)
    if knobs.force_sdpa:
        for module in model.modules():
            if hasattr(module, "explicit_on_cpu_training"):
                module.explicit_on_cpu_training = False
    dtype = DTYPES[knobs.precision]
    if knobs.teacher_cast and dtype != torch.float32:
        model.teacher.to(dtype)
    if knobs.grad_checkpointing:
        model.student.set_grad_checkpointing(True)
    x = images
    if knobs.channels_last:
        x = images.contiguous(memory_format=torch.channels_last)
        for m in (model.student.patch_embed.proj, getattr(model.teacher.model, "patch_embed", None)):
            conv = getattr(m, "proj", m)
            if isinstance(conv, nn.Conv2d):
                conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last)
    model.train()
    opt = make_optimizer(model, knobs.optimizer)
    autocast = (contextlib.nullcontext if dtype == torch.float32
                else lambda: torch.autocast(device.type, dtype=dtype))

    def loss_fn(m: FeatureDistillation) -> torch.Tensor:
        if not knobs.teacher_inference_mode:
            return m(x)
        with torch.inference_mode():
            target = m.targets(x)
        pred = m.projection(m.student.forward_features(x))
        return smooth_l1(pred, target.clone(), m.beta)  # an inference tensor cannot be saved for backward

    forward = torch.compile(loss_fn) if knobs.compile else loss_fn

    def run(fn) -> Callable[[], torch.Tensor]:
        def step() -> torch.Tensor:
            with autocast():
                loss = fn(model)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()
        return step

    return Config(name, knobs, step=run(forward), eager_step=run(loss_fn))


def build_timm_config(name: str, knobs: Knobs, base: TimmDistillation, images: torch.Tensor,
                      device: torch.device) -> Config:
    model = copy.deepcopy(base)
    set_timm_fused_attn(model.student, knobs.student_fused_attn)
    set_timm_fused_attn(model.teacher, knobs.teacher_fused_attn)
    dtype = DTYPES[knobs.precision]
    if knobs.teacher_cast and dtype != torch.float32:
        model.teacher.to(dtype)
    model.train()
    opt = make_optimizer(model, knobs.optimizer)
    autocast = (contextlib.nullcontext if dtype == torch.float32
                else lambda: torch.autocast(device.type, dtype=dtype))
    forward = torch.compile(model) if knobs.compile else model

    def run(fn) -> Callable[[], torch.Tensor]:
        def step() -> torch.Tensor:
            with autocast():
                loss = fn(images)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()
        return step

    return Config(name, knobs, step=run(forward), eager_step=run(model))


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


# -- the run --------------------------------------------------------------------------------------------
def cpu_flags() -> list[str]:
    """The CPU's matrix-relevant flags as lscpu shows them (Linux /proc/cpuinfo): which kernels oneDNN can use."""
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "amx_int8")
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [w for w in wanted if w in have]
    except OSError:
        pass
    return []


def default_peak_n(dtype: torch.dtype, cuda: bool) -> int:
    if cuda:
        return 4096
    if dtype == torch.float32:
        return 2048
    from fd_ref.precision import cpu_has_native_bf16
    return 2048 if cpu_has_native_bf16() else 256  # emulated bf16 is slow: a smaller matmul keeps it quick


def datasheet_peak(dtype: torch.dtype, device: torch.device) -> Optional[float]:
    """A known GPU's dense datasheet FLOP/s in ``dtype`` (fd_ref.flops' table), else None."""
    if device.type != "cuda":
        return None
    from fd_ref.flops import _GPU_PEAK
    name = torch.cuda.get_device_name(device)
    return next((v for (fragment, dt), v in _GPU_PEAK.items() if fragment in name and dt == dtype), None)


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
        configs_wanted.append(("optimised" + suffix(prec), optimised))
        if args.compile:
            configs_wanted.append(("compiled" + suffix(prec), replace(optimised, compile=True)))
        if args.timm:
            configs_wanted.append(("timm" + suffix(prec), timm_knobs(prec)))
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
    bases: dict[str, nn.Module] = {"fd_ref": build_base(args, device)}
    if any(k.impl == "timm" for _, k in configs_wanted):
        bases["timm"] = build_timm_base(args, device)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=g).to(device)
    configs = [build_config(n, k, bases[k.impl], images, args, device) for n, k in configs_wanted]
    memory = CudaPeakMemory(device) if cuda else CpuPeakMemory()
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)

    def set_threads(c: Config) -> None:
        torch.set_num_threads(c.knobs.threads or threads)

    # Model FLOPs: one eager step per implementation under FlopCounterMode, attention written out (explicit
    # softmax) so that the counter sees every matmul (the CPU flash kernel is not counted). Every
    # configuration of one implementation does the same arithmetic; no recomputation from gradient
    # checkpointing is counted (MFU convention).
    for impl in {c.knobs.impl for c in configs}:
        knobs = replace(BASELINE, precision=precisions[0], impl=impl, optimizer="library")
        counter = build_config("flops", knobs, bases[impl], images, args, device)
        model_flops = count_flops(counter.eager_step)
        for c in configs:
            if c.knobs.impl == impl:
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
        vs_timm, vs_timm_min = ratio_to(first("timm", prec), c)
        sheet = datasheet_peak(DTYPES[prec], device)
        records.append(dict(
            config=c.name, impl=c.knobs.impl, student=args.student, teacher=args.teacher,
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
