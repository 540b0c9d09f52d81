"""The one training loop shared by distillation (train.py) and fine-tuning (finetune.py), in one class.

A script hands the loop a :class:`Run` (its settings) and a :class:`Job`: a ``step_fn(batch) -> loss``, the
training set and what to train and keep. The loop owns the rest, identically for both jobs: the sharded,
seeded loader, the per-iteration schedule (warm-up, then cosine), mixed precision (a GradScaler only for
fp16), gradient accumulation (DDP
gradient sync on the last micro-batch only), clipping, the per-iteration schedule, NaN/Inf handling, progress
(tqdm on a terminal, plain lines otherwise), ``log.jsonl``, MFU, atomic checkpoints every ``save_every`` steps
and at every epoch end, exact resume, and a graceful stop on SIGTERM or SIGUSR1. Only rank 0 writes files.

Many ranks, one truth: after every optimiser step the ranks all-reduce who received a stop signal (one tiny
collective that runs while the next step computes) and all stop after the same step, the one after the
signal; the checkpoint holds every rank's random state, so the resumed run retraces the uninterrupted one. A
collective that fails because a peer died or hung ends the survivors with one line (``stop.peer_failure``).
One optimiser step = ``accum_steps`` micro-batches on each of ``world_size`` ranks, so

    images per step = batch_size * accum_steps * world_size,    MFU = flops_per_image * images / step_time / peak

with ``flops_per_image`` counted once on the meta device (fd_ref.engine.flops: no real step is spent on it).
Read top to bottom (its inputs, :class:`Run` and :class:`Job`, are in :mod:`fd_ref.engine.job`): the loop
(``fit``, ``_run``, the optimiser step, the epoch end), its state (``state_dict`` / ``load_state_dict``,
``save``; resuming a run: :func:`fd_ref.engine.resume.resume_or_start`), its output and its stop.
"""
from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from fd_ref.checkpoint.io import remove_stale_temporaries, save_atomic
from fd_ref.data.images import skipped_images
from fd_ref.data.sampler import make_loader
from fd_ref.engine.distributed import (all_reduce_ints, all_reduce_ints_start, all_reduce_sum, barrier, gather_to_main,
                                       is_peer_failure)
from fd_ref.engine.faults import NoFaults, installed_fault_hook
from fd_ref.engine.flops import peak_flops, step_flops_per_image
from fd_ref.engine.job import Job, Run
from fd_ref.engine.precision import DTYPES, autocast
from fd_ref.engine.rng import capture_rng, restore_rng, rng_from_safe, rng_to_safe
from fd_ref.engine.stop import STOP_EXIT_CODE, STOP_SIGNALS, in_main_thread, peer_failure
from fd_ref.engine.tensorboard import TensorBoardLog
from fd_ref.errors import UserError
from fd_ref.files import write_text_atomic
from fd_ref.optim.schedule import WarmupCosine


class Trainer:
    """Runs ``job.step_fn`` over ``job.dataset`` for ``run.epochs`` epochs (see the module docstring). Keeps
    the :class:`Run` and the :class:`Job` as they are; builds the sharded loader and the per-iteration
    schedule from them."""

    def __init__(self, run: Run, job: Job) -> None:
        self.run, self.job = run, job
        if run.precision not in DTYPES:
            raise UserError(f"--precision must be one of {', '.join(DTYPES)}, got {run.precision!r}")
        self.dtype, self.device = DTYPES[run.precision], run.info.device
        self.scaler = torch.amp.GradScaler(self.device.type) if self.dtype == torch.float16 else None
        self.loader, self.sampler = make_loader(job.dataset, run.batch_size, seed=run.seed, shuffle=True,
                                                rank=run.info.rank, world_size=run.info.world_size,
                                                num_workers=run.num_workers,
                                                pin_memory=self.device.type == "cuda")
        self.steps_per_epoch = len(self.sampler) // run.accum_steps
        if self.steps_per_epoch == 0:
            raise UserError(f"the dataset has {self.sampler.num_samples} images, fewer than one step needs "
                            f"(batch {run.batch_size} x accumulation {run.accum_steps} x "
                            f"{run.info.world_size} ranks); lower --batch-size")
        # the per-iteration schedule: warmup_epochs of linear warm-up, then a cosine over the rest
        self.scheduler = WarmupCosine(job.optimizer, **run.lrs, total_steps=max(1, self.steps_per_epoch * run.epochs),
                                      warmup_steps=self.steps_per_epoch * run.warmup_epochs)
        self.total_steps = self.steps_per_epoch * run.epochs
        if run.max_steps:
            self.total_steps = min(self.total_steps, run.max_steps)
        self.step, self.epoch, self.batch_in_epoch, self.skipped, self.best = 0, 0, 0, 0, -math.inf
        self.finished = False  # the last checkpoint is written after the deliverable (see _run)
        self.bad_in_row = 0  # consecutive non-finite steps (nan_policy="skip" stops at max_skipped)
        # No host-device synchronisation on a step that does not log: each step's loss and gradient norm stay
        # on the device in ``_pending`` until ``_settle`` reads them back in one transfer (logging steps,
        # checkpoints). Meanwhile a non-finite step changes nothing: fused AdamW skips its whole update where
        # ``found_inf`` is 1 (a GradScaler does the same for fp16), and ``_settle`` then takes the step back off
        # the step count and the schedule, as if it had been skipped at once. An optimiser that cannot skip on
        # the device (LARS, foreach AdamW) is read back every step, before its update, as always.
        self._pending: list[torch.Tensor] = []
        self._skips_on_device = any(g.get("fused") for g in job.optimizer.param_groups)
        self._last_grad_norm = math.nan
        self.faults = installed_fault_hook()
        self.out = Path(run.output)
        self.ckpt_path = self.out / "checkpoint.pt"
        self.saved_step: Optional[int] = None  # step of the last complete checkpoint.pt, None: none yet
        self.flops_per_image: Optional[float] = None  # counted on the meta device before the first step
        self.peak: Optional[float] = None
        self._stop_signal = 0  # the stop signal this rank received (0: none)
        self._stopping = False
        self._stop_votes: Optional[Callable[[], list[int]]] = None  # the agreement under way (several ranks)
        self._bar = None
        self._tensorboard: Optional[TensorBoardLog] = None
        self.history: list[dict] = []

    # -- the loop ------------------------------------------------------------------------------------
    def fit(self) -> list[dict]:
        if self.run.info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.out)
            self._trim_log()  # lines past the resumed step (or of a run killed before its first save)
            if self.run.tensorboard:
                self._tensorboard = TensorBoardLog(self.out, self.step)
        params = [p for g in self.job.optimizer.param_groups for p in g["params"]]
        show_bar = self.run.progress if self.run.progress is not None else sys.stdout.isatty()
        self._bar = None
        if show_bar and self.run.info.is_main:
            from tqdm import tqdm
            self._bar = tqdm(total=self.total_steps, initial=self.step, dynamic_ncols=True, unit="step")
        old_handlers = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS} if in_main_thread() else {}
        try:
            self._run(params)
        except RuntimeError as e:
            if self.run.info.world_size > 1 and is_peer_failure(e):
                raise peer_failure(e, self.run.info.rank, self.step + 1, self.last_checkpoint()) from None
            raise
        finally:
            if not self._stopping:  # when stopping, a second signal during the exit must not kill the process
                for sig, handler in old_handlers.items():
                    signal.signal(sig, handler)
            if self._bar is not None:
                self._bar.close()
            if self._tensorboard is not None:
                self._tensorboard.close()
        return self.history

    def _run(self, params: list[torch.Tensor]) -> None:
        run, accum = self.run, self.run.accum_steps
        images_per_step = run.total_batch
        t_last, steps_since = time.perf_counter(), 0
        paused = 0.0  # seconds since t_last spent saving, evaluating, starting the loader: not in img/s
        loss_sum = torch.zeros((), device=self.device)
        while self.epoch < run.epochs and self.step < self.total_steps:
            t_epoch, first = time.perf_counter(), True
            self.sampler.set_epoch(self.epoch, start=self.batch_in_epoch)
            for batch in self.loader:
                if first:  # starting the loader (workers, the first batch) is not a training step either
                    paused += time.perf_counter() - t_epoch
                    first = False
                if self.batch_in_epoch >= self.steps_per_epoch * accum:
                    break
                if self.flops_per_image is None:  # counted on the meta device: no real step is run for it
                    self.flops_per_image = step_flops_per_image(self.job.network, batch[0])
                    self.peak = peak_flops(self.dtype, self.device) if self.flops_per_image else 0.0
                    t_last, paused = time.perf_counter(), 0.0
                last_micro = (self.batch_in_epoch + 1) % accum == 0
                ddp = self.job.ddp
                with contextlib.nullcontext() if (last_micro or ddp is None) else ddp.no_sync():
                    with autocast(run.precision, self.device):
                        loss = self.job.step_fn(batch) / accum
                    loss = self.faults.corrupt_loss(self.step + self.skipped + 1, loss)
                    (self.scaler.scale(loss) if self.scaler else loss).backward()
                loss_sum += loss.detach()
                self.batch_in_epoch += 1
                if not last_micro:
                    continue
                step_loss = loss_sum.clone()
                loss_sum.zero_()
                skipped = self._optimizer_step(params, step_loss)
                if self._pending and self._settle_due():
                    skipped = self._settle()
                if skipped:  # a non-finite step was skipped: nothing to log or save
                    self._check_stop()
                    continue
                grad_norm = self._last_grad_norm
                steps_since += 1
                if self.step % run.log_every == 0 or self.step == self.total_steps:
                    now = time.perf_counter()
                    seconds = max(now - t_last - paused, 1e-9)
                    self._log_step(step_loss, grad_norm, images_per_step * steps_since / seconds)
                    t_last, steps_since, paused = now, 0, 0.0
                if self._bar is not None:
                    self._bar.update(1)
                if run.save_every and self.step % run.save_every == 0:
                    t_pause = time.perf_counter()
                    self.save()
                    paused += time.perf_counter() - t_pause
                self.faults.after_step(self.step, run.info.rank)
                if self.step < self.total_steps:  # (a signal after the last step: the run ends normally)
                    self._check_stop()
                if self.step >= self.total_steps:
                    break
            if self.batch_in_epoch >= self.steps_per_epoch * accum:  # the epoch is complete
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                t_pause = time.perf_counter()
                self._end_epoch()
                paused += time.perf_counter() - t_pause
            elif self.step >= self.total_steps:
                break
        if self._stop_votes is not None:  # ended normally: a signal during the last step no longer matters
            self._stop_votes()
            self._stop_votes = None
        # the deliverable first, then the checkpoint that says it was written (``finished``): a run stopped
        # in between (student.pt of an earlier epoch end still there) resumes and exports, not "finished"
        if self.job.export and run.info.is_main:
            self.job.export(self.out)
        self.finished = True
        self.save()
        self._report_skips()
        barrier()

    def _optimizer_step(self, params: list[torch.Tensor], step_loss: torch.Tensor) -> bool:
        """Clip, step, schedule. True when the step is known to be skipped now (an optimiser read back every
        step); on the device path the step counts until ``_settle`` says otherwise."""
        run, optimizer = self.run, self.job.optimizer
        if self.scaler:
            self.scaler.unscale_(optimizer)
        max_norm = run.clip_grad if run.clip_grad > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)  # on the device: no read-back here
        values = torch.stack([step_loss.detach().float().reshape(()), grad_norm.detach().float().reshape(())])
        self._pending.append(values)
        if not self._skips_on_device:
            if self._settle():
                optimizer.zero_grad(set_to_none=True)
                if self.scaler:
                    self.scaler.update()
                return True
        elif self.scaler is None:  # the fused kernel skips the update where found_inf is 1
            optimizer.found_inf = (~torch.isfinite(values).all()).float()
        if self.scaler:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
            if hasattr(optimizer, "found_inf"):
                del optimizer.found_inf
        optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        return False

    def _settle_due(self) -> bool:
        """Whether the host needs the pending steps' values now: a step that logs, saves or may stop (and every
        step under a test's fault hook, whose step numbers must be exact)."""
        run = self.run
        return (self.step % run.log_every == 0 or self.step >= self.total_steps
                or not isinstance(self.faults, NoFaults)
                or bool(run.save_every and self.step % run.save_every == 0) or bool(self._stop_signal))

    def _settle(self) -> bool:
        """Read the pending steps' losses and gradient norms back (one transfer) and apply ``nan_policy`` to
        the non-finite ones in order, exactly as if each had been read at its own step: a skipped step is
        counted, reported and taken off the step count and the schedule (its update never happened); a step
        that must stop the run raises. Returns whether the latest step was skipped."""
        if not self._pending:
            return False
        run = self.run
        rows = torch.stack(self._pending).tolist()  # the one read-back
        self._pending = []
        counted = self._skips_on_device  # the rows' steps are already on the step count and the schedule
        applied = self.step - len(rows) if counted else self.step
        skipped_now, last_skipped = 0, False
        for loss_value, grad_norm in rows:
            last_skipped = not math.isfinite(loss_value) or (self.scaler is None and not math.isfinite(grad_norm))
            if not last_skipped:
                applied += 1
                self.bad_in_row = 0
                continue
            if run.nan_policy == "skip" and self.bad_in_row < run.max_skipped:
                self.skipped += 1
                self.bad_in_row += 1
                skipped_now += 1
                self.say(f"step {applied + 1}: loss {loss_value} / grad norm {grad_norm} not finite, "
                         f"step skipped ({self.skipped} so far)")
                continue
            where = self.last_checkpoint()
            if run.nan_policy == "skip":
                raise UserError(f"loss/grad norm not finite for {self.bad_in_row + 1} steps in a row (loss "
                                f"{loss_value}, grad norm {grad_norm}) at step {applied + 1}; training stopped, "
                                f"last good checkpoint: {where}; lower --lr or try --precision fp32")
            raise UserError(f"loss became {loss_value} (grad norm {grad_norm}) at step {applied + 1}; "
                            f"training stopped, last good checkpoint: {where}; lower --lr, try "
                            f"--precision fp32, or --nan-policy skip")
        self._last_grad_norm = rows[-1][1]
        if counted and skipped_now:
            self.step = applied
            schedule = self.scheduler.state_dict()
            self.scheduler.load_state_dict({**schedule, "step_count": schedule["step_count"] - skipped_now})
        return last_skipped

    def _end_epoch(self) -> None:
        job = self.job
        metrics = job.on_epoch_end(self.epoch - 1) if job.on_epoch_end else {}
        if metrics:
            self.log({"step": self.step, "epoch": self.epoch - 1, **metrics})
            self.say(f"epoch {self.epoch - 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                                                                if isinstance(v, (int, float))))
            key = job.best_metric
            if key and key in metrics and metrics[key] > self.best:
                self.best = metrics[key]
                if self.run.info.is_main:
                    save_atomic({"model": job.model.state_dict(), "model_config": job.model_config,
                                 "metrics": metrics, "epoch": self.epoch - 1}, self.out / "best.pt")
        self.save()
        if job.export and self.run.info.is_main:
            job.export(self.out)

    # -- checkpoints ---------------------------------------------------------------------------------
    def state_dict(self, rng_ranks: Optional[list] = None) -> dict[str, Any]:
        """The loop's whole state, as checkpoint.pt holds it. ``rng_ranks``: every rank's random state (rank
        order), kept when there are several ranks so that each one resumes its own streams."""
        job = self.job
        rng = rng_ranks[0] if rng_ranks else rng_to_safe(capture_rng())
        blob = {"model": job.model.state_dict(), "optimizer": job.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict() if self.scaler else None,
                "step": self.step, "epoch": self.epoch, "micro": self.batch_in_epoch, "best": self.best,
                "skipped": self.skipped, "rng": rng, "config": self.run.resolved, "model_config": job.model_config,
                "finished": self.finished}
        if rng_ranks and len(rng_ranks) > 1:
            blob["rng_ranks"] = rng_ranks
        return blob

    def load_state_dict(self, blob: dict[str, Any], keep_settings: bool = False) -> None:
        """Continue from ``blob`` (a :meth:`state_dict`): model, optimiser, schedule, scaler, position in the
        run and this rank's random streams (rank 0's when the blob holds another number of ranks, none when
        it holds none). ``keep_settings``: the run continues with changed settings (``--allow-config-change``),
        so the schedule's and the optimiser's hyper-parameters stay this run's; only their state (position,
        moments) comes from ``blob``. Raises what ``load_state_dict`` of the model or optimiser raises on a
        mismatch."""
        optimizer = self.job.optimizer
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        self.job.model.load_state_dict(blob["model"])
        optimizer.load_state_dict(blob["optimizer"])
        if keep_settings:
            for group, own in zip(optimizer.param_groups, hyper):
                group.update(own)
            self.scheduler.load_state_dict({**self.scheduler.state_dict(),
                                            "step_count": blob["scheduler"]["step_count"]})
        else:
            self.scheduler.load_state_dict(blob["scheduler"])
        if self.scaler and blob.get("scaler"):
            self.scaler.load_state_dict(blob["scaler"])
        self.step, self.epoch, self.batch_in_epoch = blob["step"], blob["epoch"], blob.get("micro", 0)
        self.best, self.skipped = blob.get("best", -math.inf), blob.get("skipped", 0)
        info, rng_ranks = self.run.info, blob.get("rng_ranks")
        if rng_ranks and len(rng_ranks) == info.world_size:
            restore_rng(rng_from_safe(rng_ranks[info.rank]))
        elif "rng" in blob:
            restore_rng(rng_from_safe(blob["rng"]))

    def save(self) -> None:
        """Write checkpoint.pt (rank 0) holding every rank's random state. A collective: every rank calls
        it at the same step, and returns only once the file is complete (or raises the same error)."""
        self._settle()  # a checkpoint holds settled steps only
        rng_ranks = gather_to_main(rng_to_safe(capture_rng()))
        error: Optional[UserError] = None
        if self.run.info.is_main:
            try:
                save_atomic(self.state_dict(rng_ranks), self.ckpt_path)
            except UserError as e:
                error = e
        # doubles as the barrier after the write: no rank moves on (or exits) before the file is complete
        ok = all_reduce_ints([int(error is None)], op="min")[0] if self.run.info.world_size > 1 else error is None
        if not ok:
            last = self.last_checkpoint()
            if error is None:
                raise UserError(f"rank 0 could not save step {self.step} (see its message); last complete "
                                f"checkpoint: {last}")
            raise UserError(f"saving step {self.step} failed: {error}; last complete checkpoint: {last}; then "
                            f"run the same command again to resume")
        self.saved_step = self.step

    def last_checkpoint(self) -> str:
        return f"{self.ckpt_path} (step {self.saved_step})" if self.saved_step is not None else "none yet"

    # -- output --------------------------------------------------------------------------------------
    def _trim_log(self) -> None:
        """Drop log lines past the resumed step (written after the last checkpoint, then lost)."""
        log = self.out / "log.jsonl"
        if log.exists():
            kept = [line for line in log.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= self.step]
            write_text_atomic(log, "".join(line + "\n" for line in kept))

    def say(self, msg: str) -> None:
        """One line on rank 0 (above the progress bar when there is one)."""
        if self.run.info.is_main:
            if self._bar is not None:
                self._bar.write(msg)
            else:
                print(msg, flush=True)

    def log(self, record: dict) -> None:
        """Keep ``record`` in the history; rank 0 appends it to log.jsonl (and TensorBoard)."""
        self.history.append(record)
        if self.run.info.is_main:
            try:
                with open(self.out / "log.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as e:
                raise UserError(f"could not append to {self.out / 'log.jsonl'} ({e.strerror or e}) at step "
                                f"{self.step}; last complete checkpoint: {self.last_checkpoint()}; free space "
                                f"or make {self.out} writable, then run the same command again") from None
            if self._tensorboard is not None:
                self._tensorboard(record)

    def _log_step(self, step_loss: torch.Tensor, grad_norm: float, img_per_s: float) -> None:
        bad_images = skipped_images(self.loader)
        if self.run.info.world_size > 1:  # one collective: the loss (mean over ranks) and the skips (sum)
            both = all_reduce_sum(torch.stack([step_loss.detach().float().reshape(()),
                                               torch.tensor(float(bad_images), device=step_loss.device)]))
            loss, bad_images = float(both[0]) / self.run.info.world_size, int(both[1])
        else:
            loss = float(step_loss)
        # the base lr: the group at lr_scale 1 (the head under layer decay), not a decayed layer's
        groups = self.job.optimizer.param_groups
        lr = next((g["lr"] for g in groups if g.get("lr_scale", 1.0) == 1.0), max(g["lr"] for g in groups))
        record = {"step": self.step, "epoch": self.epoch, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                  "img_per_s": img_per_s, "world_size": self.run.info.world_size}
        if self.flops_per_image and self.peak:
            # every rank runs the same step, so the machine's peak is world_size * one device's peak
            record["mfu"] = self.flops_per_image * img_per_s / (self.peak * self.run.info.world_size)
        if self.job.log_extra is not None:
            record.update(self.job.log_extra())
        if self.skipped:
            record["skipped_steps"] = self.skipped
        if bad_images:
            record["skipped_images"] = bad_images
        self.log(record)
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{img_per_s:.1f}", refresh=False)
        else:
            mfu = f" | mfu {record['mfu'] * 100:.1f}%" if "mfu" in record else ""
            self.say(f"step {self.step}/{self.total_steps} | epoch {self.epoch} | loss {loss:.4f} | "
                        f"lr {lr:.2e} | grad {grad_norm:.3f} | {img_per_s:.1f} img/s{mfu}")

    def _report_skips(self) -> None:
        """One line on what was skipped: unreadable images (all ranks) and non-finite steps."""
        parts = []
        bad_images = all_reduce_ints([skipped_images(self.loader)])[0]
        if bad_images:
            where = " over all ranks" if self.run.info.world_size > 1 else ""
            parts.append(f"{bad_images} unreadable image(s) skipped{where} (named in the warnings above)")
        if self.skipped:
            parts.append(f"{self.skipped} step(s) skipped for a non-finite loss (--nan-policy skip)")
        if parts:
            self.say("note: " + "; ".join(parts))

    # -- the graceful stop ---------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002
        self._stop_signal = signum

    def _check_stop(self) -> None:
        """After every optimiser step: did a stop signal reach any rank? Every rank contributes the signal it
        received (0: none) to a small all-reduce started after step k and read after step k + 1 (by then
        it has long finished, so nobody waits), so all ranks see the same answer after the same step and
        stop there. A single process stops at once."""
        if self.run.info.world_size == 1:
            if self._stop_signal:
                self._stop({0: self._stop_signal})
            return
        received = self._stop_votes() if self._stop_votes is not None else []
        self._stop_votes = None
        if any(received):
            self._stop({r: sig for r, sig in enumerate(received) if sig})
        mine = [0] * self.run.info.world_size
        mine[self.run.info.rank] = self._stop_signal
        self._stop_votes = all_reduce_ints_start(mine)

    def _stop(self, received: dict[int, int]) -> None:
        """Save one checkpoint (rank 0 writes, every rank's random state in it), print one line on every rank
        and exit with :data:`STOP_EXIT_CODE` on every rank."""
        self._stopping = True
        self.save()
        what = " and ".join(sorted({signal.Signals(sig).name for sig in received.values()}))
        if self.run.info.world_size == 1:
            self.say(f"received {what}: saved {self.ckpt_path} at step {self.step}; run the same command "
                        f"again to resume")
        else:
            on = f"rank{'s' if len(received) > 1 else ''} {', '.join(map(str, sorted(received)))}"
            if self.run.info.is_main:
                self.say(f"received {what} on {on}: saved {self.ckpt_path} at step {self.step}, where all "
                            f"{self.run.info.world_size} ranks stopped; run the same command again to resume")
            else:
                print(f"rank {self.run.info.rank}: stopped after step {self.step} ({what} on {on}); rank 0 saved "
                      f"{self.ckpt_path}", flush=True)
        raise SystemExit(STOP_EXIT_CODE)
