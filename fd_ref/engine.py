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
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn as nn

from .checkpoint import load_file, remove_stale_temporaries, save_atomic
from .distributed import (DistInfo, all_reduce_ints, all_reduce_ints_start, barrier, gather_to_main,
                          is_peer_failure, roll_call)
from .errors import RunStopped, UserError
from .flops import count_flops, peak_flops
from .sampler import ShardedBatchSampler

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # pre-emption: SIGUSR1 is what several schedulers send first
STOP_EXIT_CODE = 143                              # 128 + SIGTERM, whichever signal stopped the run


# -- fault injection (tests only) -------------------------------------------------------------------------
# tests/test_robustness.py simulates failures through these environment variables; unset or empty (the
# normal case) they do nothing. This is the one place they are read.
#   FD_TEST_DIE_AT_STEP=k     the process exits abruptly (os._exit(1): no cleanup, like a crash or an OOM
#                             kill) right after optimiser step k (and its checkpoint, if one is due) ...
#   FD_TEST_DIE_RANK=r        ... on rank r only (default: every rank); also for the two below
#   FD_TEST_HANG_AT_STEP=k    the process stops answering (sleeps for good, alive) after step k
#   FD_TEST_SIGNAL_AT_STEP=k:SIG  the process sends itself signal SIG (e.g. SIGTERM) after step k
#   FD_TEST_NAN_AT_STEPS=a,b  the loss of the a-th, b-th, ... optimiser step attempt (1-based, skipped
#                             steps included: step + skipped + 1) is replaced by NaN
@dataclass(frozen=True)
class FaultInjection:
    die_at_step: int = 0
    die_rank: Optional[int] = None
    nan_at_steps: frozenset = frozenset()
    hang_at_step: int = 0
    signal_at_step: int = 0
    signal_name: str = ""

    @classmethod
    def from_env(cls) -> "FaultInjection":
        def text(key: str) -> str:
            return os.environ.get(key, "").strip()
        try:
            at, _, name = text("FD_TEST_SIGNAL_AT_STEP").partition(":")
            if name and not hasattr(signal, name):
                raise ValueError
            return cls(die_at_step=int(text("FD_TEST_DIE_AT_STEP") or 0),
                       die_rank=int(text("FD_TEST_DIE_RANK")) if text("FD_TEST_DIE_RANK") else None,
                       nan_at_steps=frozenset(int(x) for x in text("FD_TEST_NAN_AT_STEPS").split(",") if x),
                       hang_at_step=int(text("FD_TEST_HANG_AT_STEP") or 0),
                       signal_at_step=int(at or 0), signal_name=name or "SIGTERM")
        except ValueError:
            raise UserError("FD_TEST_DIE_AT_STEP / FD_TEST_DIE_RANK / FD_TEST_HANG_AT_STEP / FD_TEST_NAN_AT_STEPS "
                            "/ FD_TEST_SIGNAL_AT_STEP (test fault injection) must be integers (k:SIGNAME for "
                            "the last); unset them") from None

    def corrupt_loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        return loss * float("nan") if step in self.nan_at_steps else loss

    def maybe_die(self, step: int, rank: int) -> None:
        if self.die_rank not in (None, rank):
            return
        if step == self.die_at_step:
            print(f"fault injection: rank {rank} exits abruptly after step {step}", file=sys.stderr, flush=True)
            os._exit(1)
        if step == self.hang_at_step:
            print(f"fault injection: rank {rank} hangs after step {step}", file=sys.stderr, flush=True)
            while True:
                time.sleep(3600)
        if step == self.signal_at_step:
            os.kill(os.getpid(), getattr(signal, self.signal_name))


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


def capture_rng() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _rng_to_safe(state: dict[str, Any]) -> dict[str, Any]:
    """RNG states as tensors / plain lists only, so the checkpoint loads with weights_only=True."""
    np_state = state["numpy"]
    py_version, py_state, py_gauss = state["python"]
    out = {"torch": state["torch"],
           "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
           "python": [py_version, list(py_state), py_gauss]}
    if "cuda" in state:
        out["cuda"] = state["cuda"]
    return out


def _rng_from_safe(state: dict[str, Any]) -> dict[str, Any]:
    np_state = state["numpy"]
    out = {"torch": state["torch"],
           "numpy": (np_state[0], np_state[1].numpy().astype(np.uint32), *np_state[2:]),
           "python": (state["python"][0], tuple(state["python"][1]), state["python"][2])}
    if "cuda" in state:
        out["cuda"] = state["cuda"]
    return out


class Trainer:
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
        if settings.precision not in PRECISIONS:
            raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {settings.precision!r}")
        self.dtype = PRECISIONS[settings.precision]
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
        self.bad_in_row = 0  # consecutive non-finite steps (nan_policy="skip" stops at max_skipped)
        self.faults = FaultInjection.from_env()
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

    # -- checkpoints ---------------------------------------------------------------------------------
    def state_dict(self, rng_ranks: Optional[list] = None) -> dict[str, Any]:
        """Everything :meth:`resume` needs. ``rng_ranks``: every rank's random state (rank order), kept
        when there are several ranks so that each one resumes its own streams."""
        rng = rng_ranks[0] if rng_ranks else _rng_to_safe(capture_rng())
        blob = {"model": self.state_module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else None,
                "step": self.step, "epoch": self.epoch, "micro": self.micro, "best": self.best,
                "skipped": self.skipped, "rng": rng, "config": self.config,
                "model_config": self.model_config}
        if rng_ranks and len(rng_ranks) > 1:
            blob["rng_ranks"] = rng_ranks
        return blob

    def save(self) -> None:
        """Write checkpoint.pt (rank 0) holding every rank's random state. A collective: every rank calls
        it at the same step, and returns only once the file is complete (or raises the same error)."""
        rng_ranks = gather_to_main(_rng_to_safe(capture_rng()))
        error: Optional[UserError] = None
        if self.info.is_main:
            try:
                save_atomic(self.state_dict(rng_ranks), self.ckpt_path)
            except UserError as e:
                error = e
        # doubles as the barrier after the write: no rank moves on (or exits) before the file is complete
        ok = all_reduce_ints([int(error is None)], op="min")[0] if self.info.world_size > 1 else error is None
        if not ok:
            last = self._last_checkpoint()
            if error is None:
                raise UserError(f"rank 0 could not save step {self.step} (see its message); last complete "
                                f"checkpoint: {last}")
            raise UserError(f"saving step {self.step} failed: {error}; last complete checkpoint: {last}; then "
                            f"run the same command again to resume")
        self.saved_step = self.step

    def _last_checkpoint(self) -> str:
        return f"{self.ckpt_path} (step {self.saved_step})" if self.saved_step is not None else "none yet"

    def resume(self, path: str | os.PathLike, blob: Optional[dict] = None, keep_settings: bool = False) -> None:
        """Continue from a checkpoint written by :meth:`save` (model, optimiser, schedule, RNG, position).

        ``blob``: the checkpoint already loaded from ``path``. ``keep_settings``: the run continues with
        changed settings (``--allow-config-change``), so the schedule's and the optimiser's hyper-parameters
        stay those of this run; only their state (position, moments) comes from the checkpoint."""
        blob = load_file(path, map_location="cpu") if blob is None else blob
        missing = [k for k in ("model", "optimizer", "scheduler", "step", "epoch") if k not in blob]
        if missing:
            raise UserError(f"{path} is not a training checkpoint of this project (no {', '.join(missing)}); "
                            f"pass it as pretrained weights instead")
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        try:
            self.state_module.load_state_dict(blob["model"])
            self.optimizer.load_state_dict(blob["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise UserError(f"checkpoint {path} does not match this model/optimiser "
                            f"({str(e).splitlines()[0][:160]}); use another --output or the original "
                            f"flags") from None
        if keep_settings:
            for group, own in zip(self.optimizer.param_groups, hyper):
                group.update(own)
            self.scheduler.load_state_dict({**self.scheduler.state_dict(),
                                            "step_count": blob["scheduler"]["step_count"]})
        else:
            self.scheduler.load_state_dict(blob["scheduler"])
        if self.scaler and blob.get("scaler"):
            self.scaler.load_state_dict(blob["scaler"])
        self.step, self.epoch, self.micro = blob["step"], blob["epoch"], blob.get("micro", 0)
        self.best, self.skipped = blob.get("best", -math.inf), blob.get("skipped", 0)
        self.saved_step = self.step if Path(path) == self.ckpt_path else None
        rng_ranks = blob.get("rng_ranks")
        if rng_ranks and len(rng_ranks) == self.info.world_size:
            restore_rng(_rng_from_safe(rng_ranks[self.info.rank]))
        elif "rng" in blob:
            restore_rng(_rng_from_safe(blob["rng"]))
            saved_ranks = len(rng_ranks) if rng_ranks else 1
            if saved_ranks != self.info.world_size:
                self._print(f"note: {path} records the random state of {saved_ranks} rank(s), this run has "
                            f"{self.info.world_size}; every rank resumes from rank 0's streams")
        else:  # an older checkpoint: continue, but the random streams differ from an uninterrupted run
            self._print(f"note: {path} records no random state; resuming with fresh random streams")
        self._print(f"resumed from {path} at step {self.step} (epoch {self.epoch})")

    def _trim_log(self) -> None:
        """Drop log lines past the resumed step (written after the last checkpoint, then lost)."""
        log = self.out / "log.jsonl"
        if not log.exists():
            return
        kept = [line for line in log.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= self.step]
        tmp = log.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, log)

    # -- output --------------------------------------------------------------------------------------
    def _print(self, msg: str) -> None:
        if self.info.is_main:
            if self._bar is not None:
                self._bar.write(msg)
            else:
                print(msg, flush=True)

    def _log(self, record: dict) -> None:
        self.history.append(record)
        if self.info.is_main:
            try:
                with open(self.out / "log.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as e:
                raise UserError(f"could not append to {self.out / 'log.jsonl'} ({e.strerror or e}) at step "
                                f"{self.step}; last complete checkpoint: {self._last_checkpoint()}; free space "
                                f"or make {self.out} writable, then run the same command again") from None
            if self.on_log is not None:
                self.on_log(record)

    # -- the loop ------------------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002
        self._stop_signal = signum

    def _autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def _measure_flops(self, batch) -> None:
        """Count one micro-batch's forward+backward FLOPs, leaving no trace: gradients are zeroed and the
        RNG and buffers (e.g. BatchNorm statistics) restored, so a resumed run stays exact."""
        def run():
            with self._autocast():
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

    def _peer_failure(self, error: RuntimeError) -> RunStopped:
        """One line for a collective that failed because a peer died or hung (see ``roll_call``)."""
        text = str(error).lower()
        how = "timed out" if "timed out" in text or "timeout" in text else "lost its connection"
        failed = roll_call()
        if failed:
            who = f"rank{'s' if len(failed) > 1 else ''} {', '.join(map(str, failed))}"
        else:
            who = "a peer rank (which one could not be told)"
        return RunStopped(f"rank {self.info.rank}: {who} failed ({how}) during step {self.step + 1}; this rank "
                          f"stops too; last complete checkpoint: {self._last_checkpoint()}; run the same "
                          f"command again to resume")

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
                    with self._autocast():
                        loss = self.step_fn(batch) / accum
                    if self.faults.nan_at_steps:
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
                self.faults.maybe_die(self.step, self.info.rank)
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
        self.save()
        if self.export and self.info.is_main:
            self.export(self.out)
        self._report_skips()
        barrier()

    def _report_skips(self) -> None:
        """One line on what was skipped: unreadable images (all ranks) and non-finite steps."""
        parts = []
        bad_images = all_reduce_ints([skipped_images(self.loader)])[0]
        if bad_images:
            where = " over all ranks" if self.info.world_size > 1 else ""
            parts.append(f"{bad_images} unreadable image(s) skipped{where} (named in the warnings above)")
        if self.skipped:
            parts.append(f"{self.skipped} step(s) skipped for a non-finite loss (--nan-policy skip)")
        if parts:
            self._print("note: " + "; ".join(parts))

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

    def _log_step(self, step_loss: torch.Tensor, grad_norm: float, img_per_s: float) -> None:
        bad_images = skipped_images(self.loader)
        if self.info.world_size > 1:  # one collective: the loss (mean over ranks) and the skips (sum)
            both = torch.stack([step_loss.detach().float().reshape(()),
                                torch.tensor(float(bad_images), device=step_loss.device)])
            both = _all_reduce_sum(both)
            loss, bad_images = float(both[0]) / self.info.world_size, int(both[1])
        else:
            loss = float(step_loss)
        # the base lr: the group at lr_scale 1 (the head under layer decay), not a decayed layer's
        groups = self.optimizer.param_groups
        lr = next((g["lr"] for g in groups if g.get("lr_scale", 1.0) == 1.0), max(g["lr"] for g in groups))
        record = {"step": self.step, "epoch": self.epoch, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                  "img_per_s": img_per_s, "world_size": self.info.world_size}
        if self.flops_per_image and self.peak:
            # every rank runs the same step, so the machine's peak is world_size * one device's peak
            record["mfu"] = self.flops_per_image * img_per_s / (self.peak * self.info.world_size)
        if self.skipped:
            record["skipped_steps"] = self.skipped
        if bad_images:
            record["skipped_images"] = bad_images
        self._log(record)
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{img_per_s:.1f}",
                                  refresh=False)
        else:
            mfu = f" | mfu {record['mfu'] * 100:.1f}%" if "mfu" in record else ""
            self._print(f"step {self.step}/{self.total_steps} | epoch {self.epoch} | loss {loss:.4f} | "
                        f"lr {lr:.2e} | grad {grad_norm:.3f} | {img_per_s:.1f} img/s{mfu}")

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

    def _check_stop(self) -> None:
        """After every optimiser step: did a stop signal reach any rank? Every rank contributes the signal it
        received (0: none) to a small all-reduce started after step k and read after step k + 1 (by then
        it has long finished, so nobody waits), so all ranks see the same answer after the same step and
        stop there; then :meth:`_stop` saves and exits. A single process stops at once."""
        if self.info.world_size == 1:
            if self._stop_signal:
                self._stop({0: self._stop_signal})
            return
        received = self._stop_votes() if self._stop_votes is not None else []
        self._stop_votes = None
        if any(received):
            self._stop({r: sig for r, sig in enumerate(received) if sig})
        mine = [0] * self.info.world_size
        mine[self.info.rank] = self._stop_signal
        self._stop_votes = all_reduce_ints_start(mine)

    def _finish_stop_check(self) -> None:
        """The run ended normally: complete the agreement under way (a signal during the last step no
        longer matters)."""
        if self._stop_votes is not None:
            self._stop_votes()
            self._stop_votes = None

    def _stop(self, received: dict[int, int]) -> None:
        """Save one checkpoint (rank 0 writes, every rank's random state in it), print one line on every rank
        and exit with :data:`STOP_EXIT_CODE` on every rank."""
        self._stopping = True
        self.save()
        names = sorted({signal.Signals(sig).name for sig in received.values()})
        what = " and ".join(names)
        if self.info.world_size == 1:
            self._print(f"received {what}: saved {self.ckpt_path} at step {self.step}; run the same command "
                        f"again to resume")
        else:
            on = f"rank{'s' if len(received) > 1 else ''} {', '.join(map(str, sorted(received)))}"
            if self.info.is_main:
                self._print(f"received {what} on {on}: saved {self.ckpt_path} at step {self.step}, where all "
                            f"{self.info.world_size} ranks stopped; run the same command again to resume")
            else:
                print(f"rank {self.info.rank}: stopped after step {self.step} ({what} on {on}); rank 0 saved "
                      f"{self.ckpt_path}", flush=True)
        raise SystemExit(STOP_EXIT_CODE)


def skipped_images(loader) -> int:
    """Unreadable files skipped so far by the dataset behind ``loader`` (its ``num_skipped``, looked up
    through wrappers such as SeededDataset and Subset); 0 for datasets that never skip."""
    dataset = getattr(loader, "dataset", None)
    for _ in range(8):
        if dataset is None:
            break
        count = getattr(dataset, "num_skipped", None)
        if count is not None:
            return int(count)
        dataset = getattr(dataset, "dataset", None)
    return 0


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks of a float tensor (moved to the communication device under NCCL and back)."""
    import torch.distributed as dist
    comm = tensor
    if dist.get_backend() == "nccl" and not tensor.is_cuda:
        comm = tensor.to(torch.device("cuda", torch.cuda.current_device()))
    dist.all_reduce(comm, op=dist.ReduceOp.SUM)
    return comm.to(tensor.device)


def _in_main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()
