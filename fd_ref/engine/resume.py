"""Starting or resuming a run in ``--output`` safely.

A rerun of a command resumes from ``--output/checkpoint.pt``. That is only right when it is the same run:
its resolved configuration (after defaults, YAML and flags) must equal the one the checkpoint records,
except for the *run-control* settings below, which say how to run, not what to compute. Any other
difference (another ``--lr``, ``--epochs``, ``--data`` or ``--teacher``) refuses with one line listing the
keys and both values; ``--allow-config-change`` continues anyway with the new settings (the new learning-rate
schedule and optimiser settings apply from the resumed step on), and ``log.jsonl`` records the change. A run
that already finished says so in one line and leaves its files alone.

:func:`resume_or_start` also takes the output folder's lock (:mod:`fd_ref.engine.runlock`): one run per
folder. The loop's state itself is the Trainer's (``state_dict`` / ``load_state_dict``); this module decides
whether and from which file to restore it.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Optional

from fd_ref.checkpoint.io import load_file
from fd_ref.config import save_yaml
from fd_ref.engine.distributed import broadcast_from_main
from fd_ref.engine.runlock import lock_output, unlock_output
from fd_ref.errors import UserError

# Settings that may differ between a checkpoint and the command that resumes it (the one list).
RUN_CONTROL_KEYS: frozenset[str] = frozenset({
    "output", "resume", "config", "allow_config_change",      # where things are, and this very switch
    "max_steps", "log_every", "save_every", "eval_every",      # how far to go, how often to log/save/evaluate
    "eval_only", "num_workers", "progress",                    # loading and display
    "nan_policy",                                              # what to do about a non-finite step
    "compile", "grad_checkpointing", "data_in_memory",         # the same computation, run another way
    "attention",
    "tensorboard",                                             # an extra view of the same log
})

# Recorded but not compared: follows from settings that are compared (lr and total_batch).
DERIVED_KEYS: frozenset[str] = frozenset({"lr_scaled"})

_ABSENT = object()


def _as_recorded_now(saved: Mapping[str, Any]) -> Mapping[str, Any]:
    """An older checkpoint's settings as this version records them: ``whiten: false`` (``--no-whiten``) is
    ``target_norm: none``, the one setting it became."""
    if saved.get("whiten") is False and saved.get("target_norm", "whiten") == "whiten":
        return {**saved, "target_norm": "none"}
    return saved


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b if isinstance(a, bool) or isinstance(b, bool) else a == b


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any],
                       defaults: Optional[Mapping[str, Any]] = None) -> dict[str, tuple[Any, Any]]:
    """``{key: (saved value, current value)}`` for every setting outside :data:`RUN_CONTROL_KEYS` whose
    values differ. A key only one side has (a setting added or removed between versions) counts with the
    ``defaults`` value for the missing side, and is ignored when there is no default to compare with."""
    defaults = defaults or {}
    out = {}
    for key in sorted(set(saved) | set(current)):
        if key in RUN_CONTROL_KEYS or key in DERIVED_KEYS:
            continue
        a = saved.get(key, defaults.get(key, _ABSENT))
        b = current.get(key, defaults.get(key, _ABSENT))
        if a is _ABSENT or b is _ABSENT:
            continue
        if not _same(a, b):
            out[key] = (a, b)
    return out


def describe(differences: Mapping[str, tuple[Any, Any]]) -> str:
    """``lr 0.001 -> 0.002, epochs 4 -> 8`` (checkpoint's value first)."""
    return ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in differences.items())


def resume_or_start(trainer) -> bool:
    """Lock ``--output``, then resume ``trainer`` from the checkpoint if there is one (``--resume`` or
    ``--output/checkpoint.pt``) after checking it belongs to this run, then write ``config.yaml``.

    The command's settings before resolution (``precision: auto``, ...) are ``trainer.run.cfg``, the resolved
    ones that checkpoints record ``trainer.run.resolved``. Returns ``False`` when that run already finished
    (it left ``trainer.job.deliverable``: one line printed, nothing written, nothing to do); raises
    :class:`UserError` when it must not be resumed.
    """
    run = trainer.run
    config, info, out = run.cfg, run.info, Path(run.output)
    deliverable = Path(trainer.job.deliverable)
    lock = _lock(out, info.is_main)
    try:
        explicit = config.get("resume")
        path = Path(explicit) if explicit else out / "checkpoint.pt"
        blob = load_file(path, map_location="cpu") if explicit or path.exists() else None
        changes: dict[str, tuple[Any, Any]] = {}
        if blob is not None:
            saved = blob.get("config") if isinstance(blob, dict) else None
            if isinstance(saved, dict):
                # checkpoints before the resolved config was recorded hold the command's own settings
                current = run.resolved if "lr_scaled" in saved else config
                changes = config_differences(_as_recorded_now(saved), current, run.defaults)
            elif info.is_main:
                print(f"note: {path} records no configuration; resuming without comparing settings", flush=True)
            if changes and not config.get("allow_config_change"):
                flags = ", ".join(f"--{k.replace('_', '-')}" for k in changes)
                raise UserError(f"{path} was written by a run with other settings: {describe(changes)} "
                                f"(checkpoint -> now); to start a new run pass another --output, to continue "
                                f"this one with the new settings pass --allow-config-change (changed: {flags})")
            step = blob.get("step", 0) if isinstance(blob, dict) else 0
            # "finished": written after the deliverable (absent in older checkpoints: the file's presence)
            done = blob.get("finished", True) if isinstance(blob, dict) else True
            if not changes and step >= trainer.total_steps and done and deliverable.exists():
                if info.is_main:
                    print(f"the run in {out} already finished (step {step} of {trainer.total_steps}, "
                          f"{deliverable.name} written); nothing to do. To train again pass another "
                          f"--output", flush=True)
                if lock is not None:
                    unlock_output(lock, discard=True)
                return False
        if blob is not None:
            restore(trainer, path, blob=blob, keep_settings=bool(changes))
    except BaseException:
        if lock is not None:
            unlock_output(lock, discard=True)
        raise
    if info.is_main:
        if lock is not None:
            lock.mark_owner()
        out.mkdir(parents=True, exist_ok=True)
        save_yaml(run.resolved, out / "config.yaml")
        if changes:
            print(f"note: continuing {path} with changed settings (--allow-config-change): {describe(changes)}",
                  flush=True)
            trainer.log({"step": trainer.step, "epoch": trainer.epoch, "event": "config_change",
                         "changed": {k: [_plain(a), _plain(b)] for k, (a, b) in changes.items()}})
    return True


def restore(trainer, path, blob: Optional[dict] = None, keep_settings: bool = False) -> None:
    """Continue ``trainer`` from the checkpoint ``path`` its ``save`` wrote (``Trainer.load_state_dict``),
    with one line for what does not match and for the random streams it could not restore exactly.

    ``blob``: the checkpoint already loaded from ``path``. ``keep_settings``: the run continues with
    changed settings (``--allow-config-change``; see ``Trainer.load_state_dict``)."""
    blob = load_file(path, map_location="cpu") if blob is None else blob
    missing = [k for k in ("model", "optimizer", "scheduler", "step", "epoch") if k not in blob]
    if missing:
        raise UserError(f"{path} is not a training checkpoint of this project (no {', '.join(missing)}); "
                        f"pass it as pretrained weights instead")
    try:
        trainer.load_state_dict(blob, keep_settings=keep_settings)
    except (RuntimeError, ValueError, KeyError) as e:
        raise UserError(f"checkpoint {path} does not match this model/optimiser "
                        f"({str(e).splitlines()[0][:160]}); use another --output or the original "
                        f"flags") from None
    trainer.saved_step = trainer.step if Path(path) == trainer.ckpt_path else None
    world_size, rng_ranks = trainer.run.info.world_size, blob.get("rng_ranks")
    exact = bool(rng_ranks) and len(rng_ranks) == world_size  # every rank resumed its own streams
    if not exact and "rng" in blob:
        saved_ranks = len(rng_ranks) if rng_ranks else 1
        if saved_ranks != world_size:
            trainer.say(f"note: {path} records the random state of {saved_ranks} rank(s), this run has "
                        f"{world_size}; every rank resumes from rank 0's streams")
    elif not exact:  # an older checkpoint: the random streams differ from an uninterrupted run
        trainer.say(f"note: {path} records no random state; resuming with fresh random streams")
    trainer.say(f"resumed from {path} at step {trainer.step} (epoch {trainer.epoch})")


def _lock(out: Path, is_main: bool):
    """Rank 0 takes the lock; every rank learns whether it could (and refuses alike)."""
    lock, refusal = None, None
    if is_main:
        try:
            lock = lock_output(out)
        except UserError as e:
            refusal = str(e)
    refusal = broadcast_from_main(refusal)
    if refusal:
        raise UserError(refusal)
    return lock


def _plain(value: Any) -> Any:
    return value if isinstance(value, (str, int, float, bool, type(None), list)) else str(value)


__all__ = ["RUN_CONTROL_KEYS", "config_differences", "describe", "resume_or_start", "restore"]
