"""The two steps of a run's setup that train.py and finetune.py share, around the loop:

    run = start_run(cfg, DEFAULTS)               # TensorBoard check, processes, seeds, precision, lrs -> Run
    ddp, forward = wrap_model(model, run)        # DistributedDataParallel (several ranks), torch.compile

The script then builds its :class:`~fd_ref.engine.job.Job` and the
:class:`~fd_ref.engine.trainer.Trainer`, which takes the :class:`~fd_ref.engine.job.Run` as it is.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
import torch.nn as nn

from fd_ref.engine.distributed import init_distributed, seed_everything
from fd_ref.engine.job import Run
from fd_ref.engine.precision import resolve_precision
from fd_ref.engine.tensorboard import require_tensorboard
from fd_ref.models.attention import resolve_kernel
from fd_ref.models.vit import VisionTransformer
from fd_ref.optim.schedule import scale_lrs


def start_run(cfg: Mapping[str, Any], defaults: Mapping[str, Any], tensorboard: Optional[bool] = None) -> Run:
    """Check TensorBoard is importable when it is asked for (before anything is built or written), start
    the processes, seed every rank, resolve ``--precision auto`` and scale the learning rates (all given per
    512 images) to the total batch. ``tensorboard``: overrides ``cfg["tensorboard"]``."""
    tensorboard = cfg["tensorboard"] if tensorboard is None else tensorboard
    if tensorboard:
        require_tensorboard()
    info = init_distributed()
    seed_everything(cfg["seed"], info.rank)
    total_batch = cfg["batch_size"] * cfg["accum_steps"] * info.world_size
    return Run(output=cfg["output"], epochs=cfg["epochs"], batch_size=cfg["batch_size"],
               accum_steps=cfg["accum_steps"], max_steps=cfg["max_steps"],
               precision=resolve_precision(cfg["precision"], info.device), clip_grad=cfg["clip_grad"],
               log_every=cfg["log_every"], save_every=cfg["save_every"], nan_policy=cfg["nan_policy"],
               progress=cfg["progress"], tensorboard=tensorboard, seed=cfg["seed"], num_workers=cfg["num_workers"],
               warmup_epochs=cfg["warmup_epochs"],
               lrs=scale_lrs(cfg["lr"], cfg["warmup_lr"], cfg["min_lr"], total_batch), info=info,
               cfg=cfg, defaults=defaults)


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
