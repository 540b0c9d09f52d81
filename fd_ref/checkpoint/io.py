"""Saving and loading weights safely.

- ``save_atomic``: write to a temporary file in the same folder, flush to disk, then rename, so a crash
  or SIGKILL mid-write never leaves a half-written checkpoint under the real name; a full disk or a
  read-only folder becomes one :class:`UserError`, with the old file untouched and the temporary removed.
- ``load_file``: ``torch.load(weights_only=True)`` (a pickle that would run code is refused) or
  safetensors; every failure becomes one readable :class:`UserError`.
- ``model_state``: the weights inside a loaded file, wrapper containers and prefixes removed;
  ``load_strict`` / ``load_weights``: into a model, every mismatch one line. (torch's own
  ``load_state_dict`` raises a multi-line error listing every key; these name the first few in one line.)

Key conversions between layouts: :mod:`fd_ref.checkpoint.keys`.
"""
from __future__ import annotations

import errno
import os
import pickle
import re
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

from fd_ref.errors import UserError
from fd_ref.files import WRAPPER_PREFIXES, strip_prefixes, write_atomic


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` atomically (temporary file + fsync + rename). An OS error on the way (no
    space, a quota, a read-only or unwritable folder) raises :class:`UserError`; ``path`` keeps its old
    content and no temporary file stays behind."""
    path = Path(path)
    try:
        _save_atomic(obj, path)
    except OSError as e:
        reason = e.strerror or str(e)
        code = f", {errno.errorcode[e.errno]}" if e.errno in errno.errorcode else ""
        raise UserError(f"could not write {path} ({reason}{code}); the previous {path.name}, if any, is "
                        f"unchanged and no temporary file was left; free space or make {path.parent} "
                        f"writable") from None


def _save_atomic(obj: Any, path: Path) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            sink = _KeepWriteError(f)
            try:
                torch.save(obj, sink)
            except RuntimeError:
                # torch's zip writer reports a failed write as "unexpected pos ...": raise the OS error itself
                if sink.error is not None:
                    raise sink.error from None
                raise
            f.flush()
            os.fsync(f.fileno())
    write_atomic(path, write)


class _KeepWriteError:
    """A write-only file wrapper that remembers the first OSError its file raised (no space, quota, ...)."""

    def __init__(self, f) -> None:
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.f.flush()


def remove_stale_temporaries(folder: str | os.PathLike) -> int:
    """Delete ``.*.tmp`` files left by an interrupted ``save_atomic``; returns how many."""
    count = 0
    for tmp in Path(folder).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
        count += 1
    return count


def load_file(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """Load a .pt/.pth (weights only, never arbitrary code) or .safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; check the path")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file as load_safetensors
        try:
            return load_safetensors(str(path), device=str(map_location))
        except Exception as e:  # noqa: BLE001 - any parse error is the user's file
            raise UserError(f"checkpoint {path} is not a readable safetensors file ({e})") from None
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        refused = [line.strip() for line in str(e).splitlines() if "GLOBAL" in line]
        if any("yacs.config.CfgNode" in line for line in refused):  # published main_fd.py's save_checkpoint
            raise UserError(f"{path} is a training checkpoint of the published FD code: its 'config' is a yacs "
                            f"CfgNode, which a weights-only load refuses; if you trust the file, keep its weights "
                            f"(with yacs installed): python -c \"import torch; torch.save({{'model': torch.load("
                            f"'{path}', weights_only=False)['model']}}, 'weights.pth')\" and pass weights.pth"
                            ) from None
        if refused:  # the pickle names a callable (e.g. os.system) that unpickling would call
            raise UserError(f"refused to load {path}: it holds objects other than weights, which could run "
                            f"code ({refused[0][:160]}); only load checkpoints you trust, re-saved as plain "
                            f"tensors") from None
        raise UserError(f"checkpoint {path} is not a PyTorch checkpoint or is corrupt ({_reason(e)}); use "
                        f"another copy or an earlier checkpoint") from None
    except Exception as e:  # noqa: BLE001 - any other parse failure: a truncated or damaged file
        raise UserError(f"checkpoint {path} is truncated or corrupt ({_reason(e)}); use another "
                        f"copy or an earlier checkpoint") from None


def _reason(error: Exception) -> str:
    """The informative part of a loading error: its last meaningful line, first sentence, <= 120 chars."""
    lines = [line.strip() for line in str(error).splitlines()
             if line.strip() and not line.strip().startswith(("Weights only load failed", "Check the doc"))]
    if not lines:
        return "the file ends too early" if isinstance(error, EOFError) else type(error).__name__
    text = lines[-1] if "WeightsUnpickler error" in str(error) else lines[0]
    text = text.split(". ")[0].rstrip(".")[:120]
    return text if isinstance(error, (RuntimeError, pickle.UnpicklingError)) else f"{type(error).__name__}: {text}"


_WRAPPER_KEYS = ("model", "state_dict", "student", "module", "model_ema")
_PREFIXES = WRAPPER_PREFIXES + ("encoder.",)  # encoder.: some released checkpoints


def model_state(obj: Any) -> dict[str, torch.Tensor]:
    """The model weights inside a loaded checkpoint: unwraps {"model": ...}-style containers and strips
    the prefixes DDP (``module.``), torch.compile (``_orig_mod.``) and the FD wrapper (``student.``) add."""
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError("checkpoint holds no state dict of tensors (expected a dict of weights, or one "
                        "under 'model' / 'state_dict')")
    return {strip_prefixes(key, _PREFIXES): value for key, value in obj.items()}


def check_fits(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], path: Any,
               what: str = "the architecture it records") -> None:
    """Refuse, in one line, a ``state`` whose keys or shapes differ from ``own`` (a model's state dict, or its
    tensors on the meta device): ``path`` does not match ``what``."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
              if k in own and own[k].shape != v.shape]
    if missing or unexpected or shapes:
        detail = (f"{len(shapes)} tensors differ in shape (e.g. {shapes[0]})" if shapes else
                  f"missing {', '.join(missing[:4])}" if missing else f"unexpected {', '.join(unexpected[:4])}")
        raise UserError(f"{path} does not match {what} ({detail}); the file is damaged or was edited")


def load_strict(model: nn.Module, state: Mapping[str, torch.Tensor], path: Any,
                what: str = "the architecture it records") -> None:
    """``model.load_state_dict(state)`` with every key required; a mismatch becomes one line (``path`` does
    not match ``what``)."""
    check_fits(model.state_dict(), state, path, what)
    model.load_state_dict(state, strict=True)


def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor], what: str = "model",
                 ignore: tuple[str, ...] = ()) -> str:
    """Load ``state`` into ``model`` non-strictly, refusing shape mismatches, and return a one-paragraph
    summary of missing / unexpected keys (keys matching a regex in ``ignore`` are dropped silently)."""
    own = model.state_dict()
    state = {k: v for k, v in state.items() if not any(re.fullmatch(p, k) for p in ignore)}
    mismatched = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
                  if k in own and own[k].shape != v.shape]
    if mismatched:
        raise UserError(f"{what} checkpoint is for another architecture: {len(mismatched)} tensors differ "
                        f"in shape (e.g. {mismatched[0]}); pass the matching --model / --img-size")
    result = model.load_state_dict(state, strict=False)
    if not set(state) & set(own):
        raise UserError(f"{what} checkpoint shares no parameter names with the model; is it the right file?")

    def short(keys: list[str]) -> str:
        return ", ".join(keys[:6]) + (f", ... ({len(keys)} in all)" if len(keys) > 6 else "")

    parts = [f"loaded {len(state) - len(result.unexpected_keys)} tensors into the {what}"]
    if result.missing_keys:
        parts.append(f"missing (left at init): {short(result.missing_keys)}")
    if result.unexpected_keys:
        parts.append(f"unexpected (ignored): {short(result.unexpected_keys)}")
    return "; ".join(parts)
