"""The run setup train.py and finetune.py share: a script builds its model, data and ``step_fn``; these
helpers do the rest the same way for both jobs, around one typed :class:`Run`.

    run = start(cfg, DEFAULTS)                           # TensorBoard check, processes, seeds, precision, lrs
    ddp, forward = wrap_model(model, run)                # DistributedDataParallel (several ranks), compile
    loader, sampler = train_loader(dataset, run)
    scheduler = warmup_cosine(optimizer, run, sampler)
    trainer = begin(run, Job(step_fn, model, optimizer, scheduler, loader, sampler, deliverable, ...))
    history = fit(trainer)                               # the loop, then the TensorBoard file closed

``begin`` builds the :class:`~fd_ref.engine.trainer.Trainer`, locks ``--output``, resumes (fd_ref.engine.resume)
and writes config.yaml; it returns ``None`` when that run already finished.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
import torch.nn as nn

from fd_ref.data.sampler import make_loader
from fd_ref.engine.distributed import DistInfo, init_distributed, seed_everything
from fd_ref.engine.precision import resolve_precision
from fd_ref.engine.resume import begin_run
from fd_ref.engine.tensorboard import TensorBoardLog, require_tensorboard
from fd_ref.engine.job import Job, LoopSettings
from fd_ref.engine.trainer import Trainer
from fd_ref.models.attention import resolve_kernel
from fd_ref.models.vit import VisionTransformer
from fd_ref.optim.schedule import WarmupCosine, scale_lrs


@dataclass(frozen=True)
class Run:
    """What a run decides once, at start-up."""
    cfg: Mapping[str, Any]           # the command's settings (DEFAULTS < --config < flags)
    defaults: Mapping[str, Any]      # the script's DEFAULTS (a resumed run is compared against them)
    info: DistInfo                   # this process: rank, world size, device
    precision: str                   # --precision resolved (auto -> bf16 or fp32)
    lrs: dict[str, float]            # base_lr, warmup_lr, min_lr scaled to the total batch
    total_batch: int                 # batch_size * accum_steps * world_size

    @property
    def resolved(self) -> dict[str, Any]:
        """The settings as checkpoints and config.yaml record them."""
        return {**self.cfg, "precision": self.precision, "world_size": self.info.world_size,
                "total_batch": self.total_batch, "lr_scaled": self.lrs["base_lr"]}


def start(cfg: Mapping[str, Any], defaults: Mapping[str, Any], tensorboard: Optional[bool] = None) -> Run:
    """Check TensorBoard is importable when it is asked for (before anything is built or written), start
    the processes, seed every rank, resolve ``--precision auto`` and scale the learning rates (all given per
    512 images) to the total batch."""
    if cfg["tensorboard"] if tensorboard is None else tensorboard:
        require_tensorboard()
    info = init_distributed()
    seed_everything(cfg["seed"], info.rank)
    total_batch = cfg["batch_size"] * cfg["accum_steps"] * info.world_size
    return Run(cfg, defaults, info, resolve_precision(cfg["precision"], info.device),
               scale_lrs(cfg["lr"], cfg["warmup_lr"], cfg["min_lr"], total_batch), total_batch)


def wrap_model(model: nn.Module, run: Run, broadcast_buffers: bool = True) -> tuple[Optional[nn.Module], nn.Module]:
    """``(ddp, forward)``: the DistributedDataParallel wrapper when there are several ranks (else ``None``),
    and what the step calls (the wrapper or the model, under ``torch.compile`` with ``--compile``)."""
    info, ddp, forward = run.info, None, model
    resolve_kernel(run.cfg["attention"], info.device, 64, needs_grad=True)  # a kernel that cannot train: fail now
    for module in model.modules():  # every fd_ref ViT (student, teachers): --attention's kernel
        if isinstance(module, VisionTransformer):
            module.set_attention_kernel(run.cfg["attention"])
    if info.world_size > 1:
        ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None,
            broadcast_buffers=broadcast_buffers)
        forward = ddp
    if run.cfg["compile"]:
        forward = torch.compile(forward)
    return ddp, forward


def train_loader(dataset, run: Run):
    """The shuffled, sharded training loader and its sampler."""
    cfg, info = run.cfg, run.info
    return make_loader(dataset, cfg["batch_size"], seed=cfg["seed"], shuffle=True, rank=info.rank,
                       world_size=info.world_size, num_workers=cfg["num_workers"],
                       pin_memory=info.device.type == "cuda")


def eval_loader(dataset, run: Run):
    """The evaluation loader (in order, sharded, every image kept) and its sampler."""
    cfg, info = run.cfg, run.info
    return make_loader(dataset, cfg["batch_size"], seed=cfg["seed"], shuffle=False, rank=info.rank,
                       world_size=info.world_size, num_workers=cfg["num_workers"], drop_last=False)


def warmup_cosine(optimizer: torch.optim.Optimizer, run: Run, sampler) -> WarmupCosine:
    """The per-iteration schedule: ``warmup_epochs`` of linear warm-up, then a cosine over the rest."""
    cfg, lrs = run.cfg, run.lrs
    steps_per_epoch = len(sampler) // cfg["accum_steps"]
    return WarmupCosine(optimizer, **lrs, total_steps=max(1, steps_per_epoch * cfg["epochs"]),
                        warmup_steps=steps_per_epoch * cfg["warmup_epochs"])


def loop_settings(run: Run, best_metric: str = "") -> LoopSettings:
    cfg = run.cfg
    return LoopSettings(output=cfg["output"], epochs=cfg["epochs"], batch_size=cfg["batch_size"],
                        accum_steps=cfg["accum_steps"], max_steps=cfg["max_steps"], precision=run.precision,
                        clip_grad=cfg["clip_grad"], log_every=cfg["log_every"], save_every=cfg["save_every"],
                        nan_policy=cfg["nan_policy"], progress=cfg["progress"], best_metric=best_metric)


def begin(run: Run, job: Job) -> Optional[Trainer]:
    """Build the Trainer (its config: the resolved settings, as checkpoints record them), lock ``--output``,
    resume if a checkpoint of this run is there, write config.yaml and open TensorBoard (rank 0,
    ``--tensorboard``). ``None``: the run that leaves ``job.deliverable`` already finished (nothing to do)."""
    cfg = run.cfg
    trainer = Trainer(job=job, settings=loop_settings(run, job.best_metric), info=run.info, config=run.resolved)
    if not begin_run(trainer, config=cfg, defaults=run.defaults, deliverable=job.deliverable):
        return None
    trainer.on_log = TensorBoardLog(cfg["output"], trainer.step) if cfg["tensorboard"] and run.info.is_main else None
    return trainer


def fit(trainer: Trainer) -> list[dict]:
    """Run the loop; then close the TensorBoard file, if one is open."""
    history = trainer.fit()
    if isinstance(trainer.on_log, TensorBoardLog):
        trainer.on_log.close()
    return history
