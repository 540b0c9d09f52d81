"""The run setup train.py and finetune.py share: a script builds its model, data and ``step_fn``; these
helpers do the rest the same way for both jobs.

    info, precision = start(cfg)                         # TensorBoard check, processes, seeds, precision
    ddp, forward = wrap_model(model, info, cfg)          # DistributedDataParallel (several ranks), compile
    lrs, total_batch = scaled_lrs(cfg, info)             # lr, warmup_lr, min_lr per 512 images -> this batch
    loader, sampler = train_loader(dataset, cfg, info)
    scheduler = warmup_cosine(optimizer, lrs, sampler, cfg)
    trainer = begin(cfg, defaults, info, precision, total_batch, lrs, deliverable, step_fn=..., ...)
    history = fit(trainer)                               # the loop, then the TensorBoard file closed

``begin`` builds the :class:`~fd_ref.engine.Trainer`, locks ``--output``, resumes (fd_ref.resume) and writes
config.yaml; it returns ``None`` when that run already finished.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

import torch
import torch.nn as nn

from .distributed import DistInfo, init_distributed, seed_everything
from .engine import LoopSettings, Trainer
from .precision import resolve_precision
from .resume import begin_run
from .sampler import make_loader
from .schedule import WarmupCosine, scale_lrs
from .tensorboard import TensorBoardLog, require_tensorboard


def start(cfg: Mapping[str, Any], tensorboard: Optional[bool] = None) -> tuple[DistInfo, str]:
    """Check TensorBoard is importable when it is asked for (before anything is built or written), start
    the processes, seed every rank and resolve ``--precision auto``."""
    if cfg["tensorboard"] if tensorboard is None else tensorboard:
        require_tensorboard()
    info = init_distributed()
    seed_everything(cfg["seed"], info.rank)
    return info, resolve_precision(cfg["precision"], info.device)


def wrap_model(model: nn.Module, info: DistInfo, cfg: Mapping[str, Any],
               broadcast_buffers: bool = True) -> tuple[Optional[nn.Module], nn.Module]:
    """``(ddp, forward)``: the DistributedDataParallel wrapper when there are several ranks (else ``None``),
    and what the step calls (the wrapper or the model, under ``torch.compile`` with ``--compile``)."""
    ddp, forward = None, model
    if info.world_size > 1:
        ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None,
            broadcast_buffers=broadcast_buffers)
        forward = ddp
    if cfg["compile"]:
        forward = torch.compile(forward)
    return ddp, forward


def scaled_lrs(cfg: Mapping[str, Any], info: DistInfo) -> tuple[dict[str, float], int]:
    """The three learning rates (all given per 512 images) scaled to the total batch
    ``batch_size * accum_steps * world_size``, and that total batch."""
    total_batch = cfg["batch_size"] * cfg["accum_steps"] * info.world_size
    return scale_lrs(cfg["lr"], cfg["warmup_lr"], cfg["min_lr"], total_batch), total_batch


def train_loader(dataset, cfg: Mapping[str, Any], info: DistInfo):
    """The shuffled, sharded training loader and its sampler."""
    return make_loader(dataset, cfg["batch_size"], seed=cfg["seed"], shuffle=True, rank=info.rank,
                       world_size=info.world_size, num_workers=cfg["num_workers"],
                       pin_memory=info.device.type == "cuda")


def eval_loader(dataset, cfg: Mapping[str, Any], info: DistInfo):
    """The evaluation loader (in order, sharded, every image kept) and its sampler."""
    return make_loader(dataset, cfg["batch_size"], seed=cfg["seed"], shuffle=False, rank=info.rank,
                       world_size=info.world_size, num_workers=cfg["num_workers"], drop_last=False)


def warmup_cosine(optimizer: torch.optim.Optimizer, lrs: dict[str, float], sampler,
                  cfg: Mapping[str, Any]) -> WarmupCosine:
    """The per-iteration schedule: ``warmup_epochs`` of linear warm-up, then a cosine over the rest."""
    steps_per_epoch = len(sampler) // cfg["accum_steps"]
    return WarmupCosine(optimizer, **lrs, total_steps=max(1, steps_per_epoch * cfg["epochs"]),
                        warmup_steps=steps_per_epoch * cfg["warmup_epochs"])


def loop_settings(cfg: Mapping[str, Any], precision: str, **extra) -> LoopSettings:
    return LoopSettings(output=cfg["output"], epochs=cfg["epochs"], batch_size=cfg["batch_size"],
                        accum_steps=cfg["accum_steps"], max_steps=cfg["max_steps"], precision=precision,
                        clip_grad=cfg["clip_grad"], log_every=cfg["log_every"], save_every=cfg["save_every"],
                        nan_policy=cfg["nan_policy"], progress=cfg["progress"], **extra)


def begin(cfg: Mapping[str, Any], defaults: Mapping[str, Any], info: DistInfo, precision: str,
          total_batch: int, lrs: dict[str, float], deliverable: Path, *, best_metric: str = "",
          **trainer_kwargs) -> Optional[Trainer]:
    """Build the Trainer (its config: ``cfg`` resolved, as checkpoints record it), lock ``--output``, resume
    if a checkpoint of this run is there, write config.yaml and open TensorBoard (rank 0, ``--tensorboard``).
    ``None``: the run that leaves ``deliverable`` already finished (nothing to do)."""
    resolved = {**cfg, "precision": precision, "world_size": info.world_size, "total_batch": total_batch,
                "lr_scaled": lrs["base_lr"]}
    settings = loop_settings(cfg, precision, **({"best_metric": best_metric} if best_metric else {}))
    trainer = Trainer(settings=settings, info=info, config=resolved, **trainer_kwargs)
    if not begin_run(trainer, config=cfg, defaults=defaults, deliverable=deliverable):
        return None
    trainer.on_log = TensorBoardLog(cfg["output"], trainer.step) if cfg["tensorboard"] and info.is_main else None
    return trainer


def fit(trainer: Trainer) -> list[dict]:
    """Run the loop; then close the TensorBoard file, if one is open."""
    history = trainer.fit()
    if isinstance(trainer.on_log, TensorBoardLog):
        trainer.on_log.close()
    return history
