"""bench/throughput.py's configurations: the knobs (baseline, optimised, single levers), the FD step built
from fd_ref and from timm's Beit + ViT, the fine-tuning step (a classifier with per-block position bias
tables) built from both, and one timed configuration (:class:`Config`)."""
from __future__ import annotations

import argparse
import contextlib
import copy
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fd_ref.method.distill import FeatureDistillation  # noqa: E402
from fd_ref.method.loss import smooth_l1  # noqa: E402
from fd_ref.optim.groups import build_optimizer, param_groups  # noqa: E402
from fd_ref.models.teachers import build_teacher  # noqa: E402
from fd_ref.models.vit import create_vit  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# -- configurations ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Knobs:
    """Everything that differs between two configurations of the same step."""
    student_fused_attn: bool = False     # student attention: SDPA (True) or the explicit formula
    teacher_fused_attn: bool = False     # same for the teacher
    force_sdpa: bool = False             # SDPA even where fd_ref takes the explicit formula (CPU training)
    teacher_cast: bool = False           # bf16: teacher matrices in bf16 (True, Teacher.set_precision) or autocast
    teacher_inference_mode: bool = False  # teacher under inference_mode instead of no_grad
    optimizer: str = "plain"             # AdamW implementation: plain (foreach=False) | foreach | fused | library
    channels_last: bool = False          # images and patch-embedding weight in channels-last layout
    threads: int = 0                     # torch.set_num_threads for this configuration (0: the run's setting)
    compile: bool = False                # torch.compile the whole distillation module
    grad_checkpointing: bool = False     # recompute student blocks in the backward pass
    impl: str = "fd_ref"                 # whose student and teacher: fd_ref | timm (Beit student, ViT teacher)
    attention: str = "auto"              # fd_ref's attention kernel when fused: auto | flex | sdpa (models.attention)
    task: str = "fd"                     # fd: the distillation step | finetune: the fine-tuning step
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
    teacher's matrix layers in bf16 (``Teacher.set_precision``) when training in bf16 (CPU and CUDA)."""
    probe = create_vit(args.student, img_size=args.img_size, depth=1)
    return Knobs(student_fused_attn=probe.blocks[0].attn.fused, teacher_fused_attn=probe.blocks[0].attn.fused,
                 teacher_cast=precision == "bf16", optimizer="library",
                 grad_checkpointing=args.grad_checkpointing, precision=precision)


def timm_knobs(precision: str) -> Knobs:
    """timm's own models as shipped (fused attention on), the same optimiser and bf16 teacher as fd_ref."""
    return Knobs(student_fused_attn=True, teacher_fused_attn=True, teacher_cast=precision == "bf16",
                 optimizer="library", impl="timm", precision=precision)


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


FINETUNE_CLASSES = 1000


class FinetuneStep(nn.Module):
    """The fine-tuning step's model: ``cross_entropy(student(x), labels)`` for a classifier ``student``
    (fixed random labels; speed does not depend on them). Mixing and label smoothing cost next to nothing
    and are left out."""

    def __init__(self, student: nn.Module, batch: int) -> None:
        super().__init__()
        self.student = student
        self.register_buffer("labels", torch.randint(0, FINETUNE_CLASSES, (batch,),
                                                     generator=torch.Generator().manual_seed(2)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(self.student(x).float(), self.labels)


def build_finetune_base(args: argparse.Namespace, device: torch.device) -> FinetuneStep:
    """The fine-tuning network FD students become: the student preset with one position bias table per
    block (``pos_embed="rpb"``), mean-pooled patch tokens, ``fc_norm``, a 1000-class head, drop path 0.1."""
    torch.manual_seed(0)
    student = create_vit(args.student, img_size=args.img_size, pos_embed="rpb", global_pool="avg",
                         num_classes=FINETUNE_CLASSES, drop_path_rate=0.1)
    return FinetuneStep(student, args.batch).to(device)


def build_timm_finetune_base(args: argparse.Namespace, device: torch.device) -> FinetuneStep:
    """timm's Beit of the student preset's shape as the same fine-tuning network (per-block tables, mean
    pooling, fc_norm, 1000 classes, layer scale 0.1, drop path 0.1)."""
    from timm.models.beit import Beit

    from fd_ref.models.vit import PRESETS
    if args.student not in PRESETS:
        raise SystemExit(f"--timm needs an fd_ref preset name for --student ({', '.join(PRESETS)})")
    s = PRESETS[args.student]
    torch.manual_seed(0)
    student = Beit(img_size=args.img_size, patch_size=s["patch_size"], embed_dim=s["embed_dim"], depth=s["depth"],
                   num_heads=s["num_heads"], mlp_ratio=4.0, qkv_bias=True, num_classes=FINETUNE_CLASSES,
                   use_abs_pos_emb=False, use_rel_pos_bias=True, use_shared_rel_pos_bias=False, init_values=0.1,
                   global_pool="avg", drop_path_rate=0.1)
    return FinetuneStep(student, args.batch).to(device)


def build_bases(impls_tasks: set[tuple[str, str]], args: argparse.Namespace,
                device: torch.device) -> dict[tuple[str, str], nn.Module]:
    """One model per (implementation, task) the configurations need, each configuration a copy of it."""
    builders = {("fd_ref", "fd"): build_base, ("timm", "fd"): build_timm_base,
                ("fd_ref", "finetune"): build_finetune_base, ("timm", "finetune"): build_timm_finetune_base}
    return {key: builders[key](args, device) for key in sorted(impls_tasks)}


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

    from fd_ref.models.vit import PRESETS
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
    trainable = nn.ModuleDict({"student": model.student, **({"projection": model.projection}
                                                            if hasattr(model, "projection") else {})})
    lr, wd = 1.5e-4, 0.05
    if kind == "library":
        return build_optimizer(trainable, lr=lr, weight_decay=wd)
    kernel = {"plain": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}[kind]
    return torch.optim.AdamW(param_groups(trainable, wd), lr=lr, weight_decay=wd, **kernel)


def build_config(name: str, knobs: Knobs, base: nn.Module, images: torch.Tensor,
                 args: argparse.Namespace, device: torch.device) -> Config:
    if knobs.impl == "timm":
        return build_timm_config(name, knobs, base, images, device)
    if knobs.task == "finetune":
        return build_finetune_config(name, knobs, base, images, device)
    model = copy.deepcopy(base)
    model.student.set_fused_attn(knobs.student_fused_attn)
    if hasattr(model.teacher.model, "set_fused_attn"):
        model.teacher.model.set_fused_attn(knobs.teacher_fused_attn)
    for vit, fused in ((model.student, knobs.student_fused_attn), (model.teacher.model, knobs.teacher_fused_attn)):
        if fused and knobs.attention != "auto" and hasattr(vit, "set_attention_kernel"):
            vit.set_attention_kernel(knobs.attention)
    if knobs.force_sdpa:
        for module in model.modules():
            if hasattr(module, "explicit_on_cpu_training"):
                module.explicit_on_cpu_training = False
    dtype = DTYPES[knobs.precision]
    if knobs.teacher_cast and dtype != torch.float32:
        model.teacher.set_precision(dtype)  # as train.py (before issue #23: the whole teacher cast to bf16)
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

    return Config(name, knobs, step=training_step(forward, model, opt, autocast),
                  eager_step=training_step(loss_fn, model, opt, autocast))


def training_step(fn: Callable, arg, opt: torch.optim.Optimizer, autocast: Callable) -> Callable[[], torch.Tensor]:
    """One timed training step: ``fn(arg)`` under ``autocast``, backward, optimiser step; returns the loss."""
    def step() -> torch.Tensor:
        with autocast():
            loss = fn(arg)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()
    return step


def build_finetune_config(name: str, knobs: Knobs, base: FinetuneStep, images: torch.Tensor,
                          device: torch.device) -> Config:
    """fd_ref's fine-tuning step: the classifier with ``knobs``' attention kernel, autocast, AdamW."""
    model = copy.deepcopy(base)
    model.student.set_fused_attn(knobs.student_fused_attn)
    if knobs.student_fused_attn and knobs.attention != "auto":
        model.student.set_attention_kernel(knobs.attention)
    model.train()
    opt = make_optimizer(model, knobs.optimizer)
    dtype = DTYPES[knobs.precision]
    autocast = (contextlib.nullcontext if dtype == torch.float32
                else lambda: torch.autocast(device.type, dtype=dtype))
    forward = torch.compile(model) if knobs.compile else model
    return Config(name, knobs, step=training_step(forward, images, opt, autocast),
                  eager_step=training_step(model, images, opt, autocast))


def build_timm_config(name: str, knobs: Knobs, base: nn.Module, images: torch.Tensor,
                      device: torch.device) -> Config:
    model = copy.deepcopy(base)
    set_timm_fused_attn(model.student, knobs.student_fused_attn)
    dtype = DTYPES[knobs.precision]
    if hasattr(model, "teacher"):  # the FD step (the fine-tuning step has none)
        set_timm_fused_attn(model.teacher, knobs.teacher_fused_attn)
        if knobs.teacher_cast and dtype != torch.float32:
            model.teacher.to(dtype)
    model.train()
    opt = make_optimizer(model, knobs.optimizer)
    autocast = (contextlib.nullcontext if dtype == torch.float32
                else lambda: torch.autocast(device.type, dtype=dtype))
    forward = torch.compile(model) if knobs.compile else model

    return Config(name, knobs, step=training_step(forward, images, opt, autocast),
                  eager_step=training_step(model, images, opt, autocast))
