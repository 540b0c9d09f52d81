"""The training loop's checkpoint state (fd_ref.engine.Trainer): what checkpoint.pt holds, writing it as
one collective, exact resume, and every rank's random state captured in a form ``weights_only`` loading
accepts."""
from __future__ import annotations

import math
import os
import random
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from .checkpoint import load_file, save_atomic
from .distributed import all_reduce_ints, gather_to_main
from .errors import UserError


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


class CheckpointState:
    """The Trainer's checkpoint methods (a mixin: the attributes are set by ``Trainer.__init__``)."""

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
                "model_config": self.model_config, "finished": self.finished}
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
