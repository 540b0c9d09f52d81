"""What a script hands the training loop (fd_ref.engine.trainer.Trainer): the :class:`Job` (what to compute and
what to keep) and the :class:`LoopSettings` (how long, how often, in which precision)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from fd_ref.data.sampler import ShardedBatchSampler


@dataclass
class LoopSettings:
    output: str
    epochs: int
    batch_size: int
    accum_steps: int = 1
    max_steps: int = 0          # stop after this many optimiser steps (0: run all epochs)
    precision: str = "fp32"
    clip_grad: float = 0.0      # max global grad norm (0: no clipping)
    log_every: int = 10
    save_every: int = 0         # also save every N steps (0: only at epoch ends)
    nan_policy: str = "stop"    # "stop": end with a message; "skip": drop the step and count it
    max_skipped: int = 20       # with nan_policy=skip, stop after this many consecutive bad steps
    best_metric: str = ""       # metric from on_epoch_end to keep best.pt by (higher is better)
    progress: Optional[bool] = None  # None: a bar on a terminal, plain lines otherwise


@dataclass
class Job:
    """What a script hands the loop. ``model``: what checkpoints keep (its state dict under ``"model"``);
    ``ddp``: the DistributedDataParallel wrapper when there is one (for ``no_sync`` during accumulation);
    ``export(folder)`` writes the job's deliverable (e.g. student.pt) next to the checkpoint;
    ``on_epoch_end(epoch) -> metrics`` runs on every rank after each epoch (e.g. evaluation)."""
    step_fn: Callable[[Any], torch.Tensor]
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any                   # fd_ref.optim.schedule.WarmupCosine
    loader: Any
    sampler: ShardedBatchSampler
    deliverable: Path                # the file a finished run leaves (student.pt, results.json)
    model_config: dict = field(default_factory=dict)
    ddp: Optional[nn.Module] = None
    export: Optional[Callable[[Path], None]] = None
    on_epoch_end: Optional[Callable[[int], dict]] = None
    best_metric: str = ""            # a metric of on_epoch_end to keep best.pt by (higher is better)
    log_extra: Optional[Callable[[], dict]] = None  # more values for each logged step (each teacher's loss)
