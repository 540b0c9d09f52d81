"""Feature distillation pre-training (paper Sec. 3): a fresh student learns to predict a frozen teacher's
whitened feature map.

    python train.py                       # quickstart: tiny student and teacher, built-in synthetic images
    python train.py --config configs/fd_clip_vit_base.yaml --data /data/imagenet/train
    torchrun --nproc_per_node 8 train.py --config configs/fd_clip_vit_base.yaml --data /data/imagenet/train

Settings: DEFAULTS below <- --config YAML <- flags (``python train.py --help`` lists them all). Outputs in
--output: checkpoint.pt (resume state), student.pt (what finetune.py loads), config.yaml, log.jsonl.
Rerunning the same command resumes from checkpoint.pt (fd_ref.engine.resume checks that it is the same run).
The loop is fd_ref.engine.trainer.Trainer, the same one finetune.py runs.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from fd_ref.checkpoint.io import save_atomic
from fd_ref.cli import run_main
from fd_ref.config import help_from_source, resolve_config
from fd_ref.data import DeviceNormalize, pretrain_transform
from fd_ref.data.splits import train_val_datasets
from fd_ref.engine import setup
from fd_ref.engine.job import Job
from fd_ref.engine.resume import resume_or_start
from fd_ref.engine.trainer import Trainer
from fd_ref.errors import UserError
from fd_ref.eval.target_fit import fit_phi_s
from fd_ref.method.distill import FeatureDistillation
from fd_ref.method.masking import MASK_LOSSES, MASK_STYLES, PatchMasking
from fd_ref.method.multi_teacher import MultiTeacherDistillation
from fd_ref.models.teacher_list import TEACHER_KEYS, teacher_settings
from fd_ref.models.teachers import build_teacher
from fd_ref.models.timm_backbone import TimmBackbone, check_timm_name, is_timm_name, parse_kwargs
from fd_ref.models.vit import PRESETS, create_vit
from fd_ref.optim.groups import build_optimizer

# ----------------------------------------------------------------------------------------------------------
# Defaults: the offline quickstart. The published recipes live in configs/*.yaml.
DEFAULTS = dict(
    # data
    data="synthetic",            # synthetic | cifar10 | cifar100 | path to an ImageFolder (ImageNet train/)
    synthetic_size=1024,         # images in the built-in synthetic set
    img_size=32,
    val_split=0,                 # leave out this many images (the validation hold-out finetune.py uses)
    split_seed=0,                # the hold-out is fixed by this seed, not by --seed
    train_subset=0,              # distil on a fixed random subset of this size (0: all)
    num_workers=2,
    data_in_memory=False,        # decode an image folder once into memory (small images: keeps a GPU fed)
    crop_min_scale=0.08,         # RandomResizedCrop area range (min, 1): published 0.08 (300-epoch configs) / 0.67
    crop_interpolation="bilinear",  # bilinear (published: torchvision's default) | bicubic | nearest
    # teacher
    teacher="vit_tiny",          # dino_vit_base | deit_vit_base | clip_vit_base | clip_vit_large | timm:<name> | fd_ref preset; several: --teacher A B
    teacher_checkpoint=None,     # local weights (.pth/.pt/.safetensors): nothing is downloaded; one per teacher (none: no file)
    teacher_kwargs=None,         # timm arguments of a timm:<name> teacher: 'embed_dim=16,depths=[1,1]' or JSON / YAML mapping; one per teacher
    teacher_weight=1.0,          # weight of each teacher's loss in the sum, one per teacher
    teacher_patch_size=8,        # shape of an fd_ref preset teacher built without a recorded config
    teacher_depth=4,
    # student
    model="vit_tiny",            # vit_tiny | vit_small | vit_base | vit_large | vit_large_patch14 | timm:<name> (any timm backbone)
    model_kwargs=None,           # timm arguments of a timm:<name> student: 'depths=[2,2,18,2],window_size=14' or JSON / YAML mapping
    patch_size=8,
    depth=4,                     # override the preset's depth (None: the preset's)
    embed_dim=None,
    num_heads=None,
    pos_embed="shared_rpb",      # shared_rpb (FD) | rpb | abs
    drop_path=0.1,               # student's maximum drop-path rate (the teacher never drops)
    layer_scale=0.1,
    # objective
    target_norm="whiten",        # target normalisation: whiten (published) | none | phi_s (PHI-S, fd-ref's own)
    phi_s_images=2048,           # training images the PHI-S mean and covariance are estimated on, once
    loss="smooth_l1",            # smooth_l1 (published, --beta) | mse | cosine (fd-ref's own)
    target="full",               # distillation target: full (every token) | cls (class token) | avg (mean patch token)
    teacher_feat_after_norm=True,  # the teacher's tokens after its final norm (published configs) or before
    beta=2.0,                    # smooth-L1 threshold
    mask_ratio=0.0,              # fraction of the student's patches replaced by a learnable mask token (0: FD; >0: masked FD, fd-ref's own)
    mask_style="block",          # block (BEiT's block-wise masking) | random (uniform positions)
    mask_loss="masked",          # with --mask-ratio > 0: masked (loss on the masked patches only, MaskDistill) | all (every token)
    # optimisation
    epochs=4,
    batch_size=64,               # per process, per micro-batch
    accum_steps=1,
    lr=1e-3,                     # per 512 images (the paper: 3e-4); scaled by batch_size * accum_steps * world_size / 512
    min_lr=5e-6,                 # per 512 images, scaled like lr
    warmup_lr=5e-7,              # per 512 images, scaled like lr
    warmup_epochs=1,
    weight_decay=0.05,
    clip_grad=3.0,
    precision="auto",            # auto (bf16 on GPU and on CPUs with native bf16, else fp32) | fp32 | bf16 | fp16
    grad_checkpointing=False,
    compile=False,
    attention="auto",            # attention kernel: auto (FlexAttention on a CUDA GPU; SDPA, or the explicit formula where faster, on the CPU) | flex | sdpa | explicit
    nan_policy="stop",           # stop | skip
    # run
    output="out/quickstart",
    resume=None,                 # a checkpoint to continue from (default: --output/checkpoint.pt if present)
    allow_config_change=False,   # resume even though settings other than run control differ from the checkpoint's
    max_steps=0,                 # stop after this many optimiser steps (0: all epochs)
    save_every=0,                # also checkpoint every N steps (0: at epoch ends)
    log_every=10,
    seed=0,
    progress=None,               # None: a progress bar on a terminal, plain lines otherwise
    tensorboard=False,           # also write loss, lr, grad norm, img/s, MFU to OUTPUT/tensorboard (rank 0)
)
# ----------------------------------------------------------------------------------------------------------
# Old switches that are now a value of one setting (config files and commands that use them keep working).
ALIASES = dict(
    whiten=("target_norm", "none"),  # --no-whiten (whiten: false) is --target-norm none; --whiten changes nothing
)


def build_student(cfg: dict) -> nn.Module:
    """fd_ref's ViT (the default), or ``timm:<name>``: a timm backbone (``fd_ref.models.timm_backbone``) built
    with ``--model-kwargs``, ``--img-size`` and ``--drop-path``; the ViT shape flags (patch size, depth,
    widths, position embedding, layer scale) do not apply to it."""
    if is_timm_name(cfg["model"]):
        return TimmBackbone(cfg["model"], cfg["img_size"], parse_kwargs(cfg["model_kwargs"], "--model-kwargs"),
                            drop_path_rate=cfg["drop_path"])
    if cfg["model_kwargs"]:
        raise UserError(f"--model-kwargs applies to a timm:<name> student, not to {cfg['model']}")
    return create_vit(cfg["model"], img_size=cfg["img_size"], patch_size=cfg["patch_size"],
                      depth=cfg["depth"], embed_dim=cfg["embed_dim"], num_heads=cfg["num_heads"],
                      drop_path_rate=cfg["drop_path"], pos_embed=cfg["pos_embed"],
                      layer_scale_init=cfg["layer_scale"], num_classes=0)


def main(argv=None) -> None:
    cfg = resolve_config(DEFAULTS, argv, prog="train.py", description=__doc__.splitlines()[0],
                         help_text=help_from_source(__file__), multi=TEACHER_KEYS, aliases=ALIASES)
    run = setup.start_run(cfg, DEFAULTS)
    info = run.info
    if cfg["nan_policy"] not in ("stop", "skip"):
        raise UserError(f"--nan-policy must be stop or skip, got {cfg['nan_policy']!r}")
    if cfg["mask_style"] not in MASK_STYLES or cfg["mask_loss"] not in MASK_LOSSES:
        raise UserError(f"--mask-style must be one of {', '.join(MASK_STYLES)} and --mask-loss one of "
                        f"{', '.join(MASK_LOSSES)}, got {cfg['mask_style']!r} and {cfg['mask_loss']!r}")

    # the loader yields uint8 images; DeviceNormalize converts and normalises them on the device in the step
    transform = pretrain_transform(cfg["img_size"], min_scale=cfg["crop_min_scale"],
                                   interpolation=cfg["crop_interpolation"], uint8=True)
    normalize = DeviceNormalize()
    dataset, _ = train_val_datasets(cfg["data"], transform, None,
                                    val_split=cfg["val_split"], split_seed=cfg["split_seed"],
                                    train_subset=cfg["train_subset"], need_val=False,
                                    synthetic_size=cfg["synthetic_size"], img_size=cfg["img_size"],
                                    seed=cfg["seed"], in_memory=cfg["data_in_memory"])
    if is_timm_name(cfg["model"]):
        check_timm_name(cfg["model"], "student")  # a bad name fails before any teacher download
    settings = teacher_settings(cfg)
    teachers = [build_teacher(t["teacher"], img_size=cfg["img_size"], checkpoint=t["teacher_checkpoint"],
                              feat_after_norm=cfg["teacher_feat_after_norm"],
                              timm_kwargs=parse_kwargs(t["teacher_kwargs"], "--teacher-kwargs") or None,
                              patch_size=cfg["teacher_patch_size"], depth=cfg["teacher_depth"]) for t in settings]
    student = build_student(cfg)
    options = dict(beta=cfg["beta"], target=cfg["target"], target_norm=cfg["target_norm"], loss=cfg["loss"])
    try:
        masking = (PatchMasking(student, cfg["mask_ratio"], cfg["mask_style"], cfg["mask_loss"])
                   if cfg["mask_ratio"] != 0 else None)  # r = 0: FD itself, nothing built or drawn
        if len(teachers) == 1 and settings[0]["teacher_weight"] == 1.0:  # the paper's FD
            model = FeatureDistillation(student, teachers[0], masking=masking, **options)
            branches = [model]
            trainable = nn.ModuleDict({"student": student, "projection": model.projection,
                                       "target_norm": model.target_norm})  # (whiten, none: no state)
        else:  # several teachers (fd_ref.method.multi_teacher): one projection and one target normalisation each
            model = MultiTeacherDistillation(student, teachers, [t["teacher_weight"] for t in settings],
                                             masking=masking, **options)
            branches = list(model.branches)
            trainable = nn.ModuleDict({"student": student, "projections": model.projections,
                                       "target_norms": model.target_norms})
    except ValueError as e:  # the objective's settings
        raise UserError(f"{e} (--target, --target-norm, --loss, --teacher-weight, --mask-ratio, --mask-style, "
                        f"--mask-loss)") from None
    if masking is not None:  # the mask token: trained and checkpointed, never part of student.pt
        trainable["masking"] = masking
    model.to(info.device)
    if run.precision == "bf16":
        for teacher in teachers:  # bf16 matrix products; norms and the returned features in fp32
            teacher.set_precision(torch.bfloat16)
    if cfg["grad_checkpointing"]:
        student.set_grad_checkpointing(True)
    ddp, forward = setup.wrap_model(model, run, broadcast_buffers=False)

    lr = run.lrs["base_lr"]
    optimizer = build_optimizer(trainable, lr=lr, weight_decay=cfg["weight_decay"])

    def step_fn(batch) -> torch.Tensor:
        images = normalize(batch[0].to(info.device, non_blocking=True))
        if masking is None:
            return forward(images)
        return forward(images, masking.draw(images.shape[0]).to(info.device, non_blocking=True))

    def export(folder: Path) -> None:
        save_atomic({"model": student.state_dict(), "model_config": student.config,
                     "teacher": cfg["teacher"]}, folder / "student.pt")

    def teacher_losses() -> dict:  # several teachers: each one's loss beside the total in log.jsonl
        return {k: float(v) for k, v in model.last_losses.items()}

    trainer = Trainer(run, Job(step_fn, trainable, optimizer, dataset, deliverable=Path(cfg["output"]) / "student.pt",
                               network=model, model_config=student.config, ddp=ddp, export=export,
                               log_extra=teacher_losses if isinstance(model, MultiTeacherDistillation) else None))
    if not resume_or_start(trainer):
        return  # that run already finished
    fitted = fit_phi_s(branches, dataset, cfg["phi_s_images"], cfg["batch_size"], cfg["seed"], info.device,
                       run.precision, normalize)  # nothing on a resume: the statistics are in checkpoint.pt
    if info.is_main and fitted:
        print(f"PHI-S: teacher mean and covariance estimated on {fitted} training images", flush=True)
    if info.is_main:
        n_student = sum(p.numel() for p in student.parameters())
        described = " + ".join(f"{t.name} ({t.embed_dim}-d, grid {t.grid})" for t in teachers)
        print(f"distilling {described} into {cfg['model']} "
              f"({n_student / 1e6:.1f}M params, grid {student.grid}) on {len(dataset)} images, "
              f"{info.world_size} process(es), {run.precision}, batch {run.total_batch}, lr {lr:.2e}", flush=True)
        if masking is not None:
            print(f"masked FD: {masking.count} of {masking.grid[0] * masking.grid[1]} patches masked per image "
                  f"({masking.style}), loss over {'the masked patches' if masking.over == 'masked' else 'every token'}",
                  flush=True)
        random = [t["teacher"] for t in settings if t["teacher"] in PRESETS and not t["teacher_checkpoint"]]
        random_teacher = bool(random)
        if random_teacher:
            print(f"note: the teacher {' '.join(random)} is randomly initialised (no --teacher-checkpoint): this "
                  f"checks the machinery, not the method", flush=True)
        if random_teacher and cfg["data"].strip().lower() != "synthetic":
            print(f"warning: distilling a random teacher on {cfg['data']}; for a real run pass --config "
                  f"configs/fd_*.yaml or --teacher dino_vit_base|deit_vit_base|clip_vit_base|clip_vit_large",
                  flush=True)
    trainer.fit()
    if info.is_main:
        print(f"done: {Path(cfg['output']) / 'student.pt'}", flush=True)


if __name__ == "__main__":
    run_main(main)
