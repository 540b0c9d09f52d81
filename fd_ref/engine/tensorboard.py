"""``--tensorboard``: every record of ``log.jsonl`` also as TensorBoard scalars, in ``OUTPUT/tensorboard``.

Training records (they hold ``loss``) become ``train/loss``, ``train/lr``, ``train/grad_norm``,
``train/img_per_s``, ``train/mfu``; evaluation records (``top1``, ``top5``, ``val_loss``) become
``eval/<name>``; the x axis is the optimiser step. Only rank 0 writes. A resumed run writes into the same
folder (so TensorBoard shows one run) and purges the events past the checkpoint it resumed from, exactly as
``log.jsonl`` drops the lines written after the last checkpoint.

    tensorboard --logdir out/        # every run under out/, side by side
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from fd_ref.errors import UserError

FOLDER = "tensorboard"
NOT_SCALARS = {"step", "epoch", "world_size"}


def require_tensorboard() -> Any:
    """torch's SummaryWriter class; a missing ``tensorboard`` package is one :class:`UserError`."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard==2.21.0 "
                        "(or run without --tensorboard; log.jsonl has the same numbers)") from None
    return SummaryWriter


class TensorBoardLog:
    """Call with each log record; :meth:`close` at the end (records are flushed as they come)."""

    def __init__(self, output: str | Path, resumed_step: int = 0) -> None:
        writer_class = require_tensorboard()
        # purge_step: events of an earlier attempt at steps > resumed_step are discarded by TensorBoard
        self.writer = writer_class(log_dir=str(Path(output) / FOLDER), purge_step=resumed_step + 1)

    def __call__(self, record: dict) -> None:
        group = "train" if "loss" in record else "eval"
        step = int(record.get("step", 0))
        for key, value in record.items():
            if key in NOT_SCALARS or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                self.writer.add_scalar(f"{group}/{key}", value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
