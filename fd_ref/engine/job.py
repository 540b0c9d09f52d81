"""What a script hands the training loop (fd_ref.engine.trainer.Trainer): the :class:`Run` (its settings, decided
once at start-up by ``fd_ref.engine.setup.start_run``) and the :class:`Job` (what to compute and what to keep).
The Trainer keeps both as they are."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn as nn

from fd_ref.engine.distributed import DistInfo


def _one_process() -> DistInfo:
    return DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), is_main=True)


@dataclass(frozen=True)
class Run:
    """The one carrier of settings from a script to the loop: the loop's settings, typed, plus what a run
    decides once (its processes, its precision, its learning rates scaled to the total batch) and the
    command's own settings, which checkpoints and config.yaml record."""
    output: str
    epochs: int
    batch_size: int                  # per process, per micro-batch
    accum_steps: int = 1
    max_steps: int = 0               # stop after this many optimiser steps (0: run all epochs)
    precision: str = "fp32"          # resolved: fp32 | bf16 | fp16
    clip_grad: float = 0.0           # max global grad norm (0: no clipping)
    log_every: int = 10
    save_every: int = 0              # also save every N steps (0: only at epoch ends)
    nan_policy: str = "stop"         # "stop": end with a message; "skip": drop the step and count it
    max_skipped: int = 20            # with nan_policy=skip, stop after this many consecutive bad steps
    progress: Optional[bool] = None  # None: a bar on a terminal, plain lines otherwise
    tensorboard: bool = False        # rank 0 also writes every log record to OUTPUT/tensorboard
    seed: int = 0                    # the data order and augmentations: (seed, epoch, index)
    num_workers: int = 0
    warmup_epochs: float = 0
    lrs: Mapping[str, float] = field(default_factory=lambda: {"base_lr": 1e-3, "warmup_lr": 0.0, "min_lr": 0.0})
    info: DistInfo = field(default_factory=_one_process)  # this process: rank, world size, device
    cfg: Mapping[str, Any] = field(default_factory=dict)       # the command's settings (DEFAULTS < --config < flags)
    defaults: Mapping[str, Any] = field(default_factory=dict)  # the script's DEFAULTS (a resumed run is compared)

    @property
    def total_batch(self) -> int:
        return self.batch_size * self.accum_steps * self.info.world_size

    @property
    def resolved(self) -> dict[str, Any]:
        """The settings as checkpoints and config.yaml record them."""
        return {**self.cfg, "precision": self.precision, "world_size": self.info.world_size,
                "total_batch": self.total_batch, "lr_scaled": self.lrs["base_lr"]}


@dataclass
class Job:
    """What a script hands the loop. ``model``: what checkpoints keep (its state dict under ``"model"``);
    ``dataset``: the training set (the loop shards, shuffles and batches it); ``network``: the module
    ``step_fn`` runs (its FLOPs give the MFU; None: no MFU); ``ddp``: the DistributedDataParallel wrapper
    when there is one (for ``no_sync`` during accumulation); ``export(folder)`` writes the job's deliverable
    (e.g. student.pt) next to the checkpoint; ``on_epoch_end(epoch) -> metrics`` runs on every rank after
    each epoch (e.g. evaluation)."""
    step_fn: Callable[[Any], torch.Tensor]
    model: nn.Module
    optimizer: torch.optim.Optimizer
    dataset: Any
    deliverable: Path                # the file a finished run leaves (student.pt, results.json)
    network: Optional[nn.Module] = None
    model_config: dict = field(default_factory=dict)
    ddp: Optional[nn.Module] = None
    export: Optional[Callable[[Path], None]] = None
    on_epoch_end: Optional[Callable[[int], dict]] = None
    best_metric: str = ""            # a metric of on_epoch_end to keep best.pt by (higher is better)
    log_extra: Optional[Callable[[], dict]] = None  # more values for each logged step (each teacher's loss)
