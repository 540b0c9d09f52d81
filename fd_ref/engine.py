"""The one training loop shared by distillation (train.py) and fine-tuning (finetune.py).

A script builds its model, data and optimiser, then hands the loop a ``step_fn(batch) -> loss``. The loop
owns everything else, identically for both jobs: mixed precision (autocast, a GradScaler only for fp16),
gradient accumulation (DDP gradient sync only on the last micro-batch), clipping, the per-iteration
schedule, NaN/Inf handling, progress (tqdm on a terminal, plain lines otherwise), ``log.jsonl``, MFU,
atomic checkpoints every ``save_every`` steps and at every epoch end, exact resume, and a graceful stop on
SIGTERM or SIGUSR1. Only rank 0 writes files.

Many ranks, one truth: a stop signal may reach any subset of the ranks, so after every optimiser step the
ranks all-reduce who received one (one tiny collective that runs while the next step computes, so it costs
no time) and all stop after the same step, the one after the signal; the checkpoint
holds every rank's random state, so the resumed run retraces the uninterrupted one. A collective that
fails because a peer died or hung ends the survivors with one line (:class:`~fd_ref.errors.RunStopped`)
naming the rank and the last complete checkpoint.

One optimiser step = ``accum_steps`` micro-batches on each of ``world_size`` ranks, so

    images per step = batch_size * accum_steps * world_size,
    MFU = flops_per_image * images / step_time / peak_flops.

The Trainer is one class in four files: the loop itself here, its checkpoint state and RNG capture in
:mod:`fd_ref.loop_state`, its logging in :mod:`fd_ref.loop_output`, the graceful stop in :mod:`fd_ref.loop_stop`.
"""
from __future__ import annotations

import contextlib
import math
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import numpy as np
import torch
import torch.nn as nn

from .checkpoint import remove_stale_temporaries, save_atomic
from .distributed import DistInfo, barrier, is_peer_failure
from .errors import UserError
from .flops import count_flops, peak_flops
from .loop_output import LoopOutput, skipped_images
from .loop_state import CheckpointState, capture_rng, restore_rng
from .loop_stop import STOP_EXIT_CODE, STOP_SIGNALS, GracefulStop, _in_main_thread
from .precision import DTYPES, autocast
from .sampler import ShardedBatchSampler

__all__ = ["LoopSettings", "STOP_EXIT_CODE", "Trainer", "capture_rng", "install_fault_hook", "restore_rng",
           "skipped_images"]


# -- a fault hook ------------------------------------------------------------------------------------------
class FaultHook(Protocol):
    """What the loop calls when a hook is installed. Tests simulate crashes, hangs, signals and non-finite
    losses with one (tests/fault_injection.py); none is installed in a normal run."""

    def corrupt_loss(self, attempt: int, loss: torch.Tensor) -> torch.Tensor:
        """Every micro-batch loss; ``attempt``: the 1-based optimiser step attempt, skipped steps included."""

    def after_step(self, step: int, rank: int) -> None:
        """After every optimiser step (and its checkpoint, if one is due)."""


_fault_hook: Optional[FaultHook] = None


def install_fault_hook(hook: Optional[FaultHook]) -> None:
    """Install ``hook`` (see above) for every Trainer built from now on; ``None`` removes it."""
    global _fault_hook
    _fault_hook = hook


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


class Trainer(CheckpointState, LoopOutput, GracefulStop):
    """Runs ``step_fn`` over ``loader`` for ``settings.epochs`` epochs (see the module docstring).

    ``state_module`` is what checkpoints keep (its state dict under ``"model"``); ``ddp`` is the
    DistributedDataParallel wrapper when there is one (for ``no_sync`` during accumulation);
    ``export(path_folder)`` writes the job's deliverable (e.g. student.pt) next to the checkpoint;
    ``on_epoch_end(epoch) -> metrics`` runs on every rank after each epoch (e.g. evaluation).
    """

    def __init__(self, *, step_fn: Callable[[Any], torch.Tensor], state_module: nn.Module,
                 optimizer: torch.optim.Optimizer, scheduler, loader, sampler: ShardedBatchSampler,
                 settings: LoopSettings, info: DistInfo, config: dict, model_config: dict | None = None,
                 ddp: Optional[nn.Module] = None, export: Optional[Callable[[Path], None]] = None,
                 on_epoch_end: Optional[Callable[[int], dict]] = None) -> None:
        self.step_fn, self.state_module, self.optimizer = step_fn, state_module, optimizer
        self.scheduler, self.loader, self.sampler, self.s, self.info = scheduler, loader, sampler, settings, info
        self.config, self.model_config, self.ddp = config, model_config or {}, ddp
        self.export, self.on_epoch_end = export, on_epoch_end
        if settings.precision not in DTYPES:
            raise UserError(f"--precision must be one of {', '.join(DTYPES)}, got {settings.precision!r}")
        self.dtype = DTYPES[settings.precision]
        self.device = info.device
        self.scaler = torch.amp.GradScaler(self.device.type) if self.dtype == torch.float16 else None
        self.steps_per_epoch = len(sampler) // settings.accum_steps
        if self.steps_per_epoch == 0:
            raise UserError(f"the dataset has {sampler.num_samples} images, fewer than one step needs "
                            f"(batch {settings.batch_size} x accumulation {settings.accum_steps} x "
                            f"{info.world_size} ranks); lower --batch-size")
        self.total_steps = self.steps_per_epoch * settings.epochs
        if settings.max_steps:
            self.total_steps = min(self.total_steps, settings.max_steps)
        self.step, self.epoch, self.micro, self.skipped, self.best = 0, 0, 0, 0, -math.inf
        self.finished = False  # the last checkpoint is written after the deliverable (see _run)
        self.bad_in_row = 0  # consecutive non-finite steps (nan_policy="skip" stops at max_skipped)
        self.faults = _fault_hook
        self.out = Path(settings.output)
        self.ckpt_path = self.out / "checkpoint.pt"
        self.saved_step: Optional[int] = None  # step of the last complete checkpoint.pt, None: none yet
        self.flops_per_image: Optional[float] = None
        self.peak: Optional[float] = None
        self._stop_signal: int = 0  # the stop signal this rank received (0: none)
        self._stopping = False
        self._stop_votes: Optional[Callable[[], list[int]]] = None  # the agreement under way (several ranks)
        self._bar = None
        self.history: list[dict] = []
        self.on_log: Optional[Callable[[dict], None]] = None  # rank 0: called with every log record (TensorBoard)
        self.log_extra: Optional[Callable[[], dict]] = None  # more values for each step's record (per-teacher losses)


    # -- the loop ------------------------------------------------------------------------------------

    def autocast(self):
        """The context the step's forward runs in (autocast to the run's precision; nothing for fp32)."""
        return autocast(self.s.precision, self.device)

    def _measure_flops(self, batch) -> None:
        """Count one micro-batch's forward+backward FLOPs, leaving no trace: gradients are zeroed and the
        RNG and buffers (e.g. BatchNorm statistics) restored, so a resumed run stays exact."""
        def run():
            with self.autocast():
                loss = self.step_fn(batch)
            loss.backward()
        buffers = {k: v.clone() for k, v in self.state_module.state_dict().items()
                   if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
        devices = [self.device] if self.device.type == "cuda" else []
        host_rng = random.getstate(), np.random.get_state()  # e.g. timm's Mixup draws from NumPy
        with torch.random.fork_rng(devices=devices):
            try:
                images = batch[0] if isinstance(batch, (list, tuple)) else batch
                self.flops_per_image = count_flops(run) / len(images)
            except Exception:  # noqa: BLE001 - MFU is best effort (e.g. under torch.compile)
                self.flops_per_image = 0.0
            self.peak = peak_flops(self.dtype, self.device)  # on CPU a timed randn matmul: keep it in the fork
        random.setstate(host_rng[0])
        np.random.set_state(host_rng[1])
        if buffers:
            self.state_module.load_state_dict(buffers, strict=False)
        self.optimizer.zero_grad(set_to_none=True)

    def fit(self) -> list[dict]:
        s = self.s
        if self.info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.out)
            self._trim_log()  # lines past the resumed step (or of a run killed before its first save)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        show_bar = s.progress if s.progress is not None else sys.stdout.isatty()
        self._bar = None
        if show_bar and self.info.is_main:
            from tqdm import tqdm
            self._bar = tqdm(total=self.total_steps, initial=self.step, dynamic_ncols=True, unit="step")
        old_handlers = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS} if _in_main_thread() else {}
        try:
            self._run(params)
        except RuntimeError as e:
            if self.info.world_size > 1 and is_peer_failure(e):
                raise self._peer_failure(e) from None
            raise
        finally:
            if not self._stopping:  # when stopping, a second signal during the exit must not kill the process
                for sig, handler in old_handlers.items():
                    signal.signal(sig, handler)
            if self._bar is not None:
                self._bar.close()
        return self.history


    def _run(self, params: list[torch.Tensor]) -> None:
        s, accum = self.s, self.s.accum_steps
        images_per_step = s.batch_size * accum * self.info.world_size
        t_last, steps_since = time.perf_counter(), 0
        paused = 0.0  # seconds since t_last spent saving, evaluating, starting the loader: not in img/s
        loss_sum = torch.zeros((), device=self.device)
        while self.epoch < s.epochs and self.step < self.total_steps:
            t_epoch, first = time.perf_counter(), True
            self.sampler.set_epoch(self.epoch, start=self.micro)
            for batch in self.loader:
                if first:  # starting the loader (workers, the first batch) is not a training step either
                    paused += time.perf_counter() - t_epoch
                    first = False
                if self.micro >= self.steps_per_epoch * accum:
                    break
                if self.flops_per_image is None and self.peak is None:
                    self._measure_flops(batch)
                    t_last, paused = time.perf_counter(), 0.0
                last_micro = (self.micro + 1) % accum == 0
                sync = contextlib.nullcontext() if (last_micro or self.ddp is None) else self.ddp.no_sync()
                with sync:
                    with self.autocast():
                        loss = self.step_fn(batch) / accum
                    if self.faults is not None:
                        loss = self.faults.corrupt_loss(self.step + self.skipped + 1, loss)
                    (self.scaler.scale(loss) if self.scaler else loss).backward()
                loss_sum += loss.detach()
                self.micro += 1
                if not last_micro:
                    continue
                step_loss = loss_sum.clone()
                loss_sum.zero_()
                before = self.step
                grad_norm = self._optimizer_step(params, step_loss)
                if self.step == before:  # a non-finite step was skipped: nothing to log or save
                    self._check_stop()
                    continue
                steps_since += 1
                if self.step % s.log_every == 0 or self.step == self.total_steps:
                    now = time.perf_counter()
                    seconds = max(now - t_last - paused, 1e-9)
                    self._log_step(step_loss, grad_norm, images_per_step * steps_since / seconds)
                    t_last, steps_since, paused = now, 0, 0.0
                if self._bar is not None:
                    self._bar.update(1)
                if s.save_every and self.step % s.save_every == 0:
                    t_pause = time.perf_counter()
                    self.save()
                    paused += time.perf_counter() - t_pause
                if self.faults is not None:
                    self.faults.after_step(self.step, self.info.rank)
                if self.step < self.total_steps:  # (a signal after the last step: the run ends normally)
                    self._check_stop()
                if self.step >= self.total_steps:
                    break
            if self.micro >= self.steps_per_epoch * accum:  # the epoch is complete
                self.epoch, self.micro = self.epoch + 1, 0
                t_pause = time.perf_counter()
                self._end_epoch()
                paused += time.perf_counter() - t_pause
            elif self.step >= self.total_steps:
                break
        self._finish_stop_check()
        # the deliverable first, then the checkpoint that says it was written (``finished``): a run stopped
        # in between (student.pt of an earlier epoch end still there) resumes and exports, not "finished"
        if self.export and self.info.is_main:
            self.export(self.out)
        self.finished = True
        self.save()
        self._report_skips()
        barrier()


    def _optimizer_step(self, params: list[torch.Tensor], step_loss: torch.Tensor) -> float:
        s = self.s
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        max_norm = s.clip_grad if s.clip_grad > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        loss_value = float(step_loss)
        bad = not math.isfinite(loss_value) or (self.scaler is None and not math.isfinite(grad_norm))
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            if s.nan_policy == "skip" and self.bad_in_row < s.max_skipped:
                self.skipped += 1
                self.bad_in_row += 1
                self._print(f"step {self.step + 1}: loss {loss_value} / grad norm {grad_norm} not finite, "
                            f"step skipped ({self.skipped} so far)")
                if self.scaler:
                    self.scaler.update()
                return grad_norm
            where = self._last_checkpoint()
            if s.nan_policy == "skip":
                raise UserError(f"loss/grad norm not finite for {self.bad_in_row + 1} steps in a row (loss "
                                f"{loss_value}, grad norm {grad_norm}) at step {self.step + 1}; training stopped, "
                                f"last good checkpoint: {where}; lower --lr or try --precision fp32")
            raise UserError(f"loss became {loss_value} (grad norm {grad_norm}) at step {self.step + 1}; "
                            f"training stopped, last good checkpoint: {where}; lower --lr, try "
                            f"--precision fp32, or --nan-policy skip")
        self.bad_in_row = 0
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        return grad_norm


    def _end_epoch(self) -> None:
        metrics = self.on_epoch_end(self.epoch - 1) if self.on_epoch_end else {}
        if metrics:
            self._log({"step": self.step, "epoch": self.epoch - 1, **metrics})
            self._print(f"epoch {self.epoch - 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                                                                if isinstance(v, (int, float))))
            key = self.s.best_metric
            if key and key in metrics and metrics[key] > self.best:
                self.best = metrics[key]
                if self.info.is_main:
                    save_atomic({"model": self.state_module.state_dict(), "model_config": self.model_config,
                                 "metrics": metrics, "epoch": self.epoch - 1}, self.out / "best.pt")
        self.save()
        if self.export and self.info.is_main:
            self.export(self.out)
