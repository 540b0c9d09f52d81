"""A model file written by train.py / finetune.py, read back as the model it records.

``student.pt`` (train.py), ``best.pt`` and ``checkpoint.pt`` (both scripts) all hold the weights under
``"model"`` and the constructor arguments of the fd_ref ViT under ``"model_config"`` (``num_classes``,
``global_pool``, position embedding, layer scale, ...). :func:`read_model_file` checks that a file is one of
these and returns its weights in fd_ref keys (the FD projection, which only exists during distillation,
dropped); :func:`build_vit` rebuilds the network exactly, head and ``fc_norm`` included, refusing a file
whose weights do not fill the model. ``finetune.py --eval-only``, ``export.py`` and ``analyze.py`` read
files this way, so they accept the same files.
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from .checkpoint import load_file, load_strict, model_state, to_fd_ref_keys  # load_strict: also from here
from .errors import UserError
from .vit import VisionTransformer

FILES_HINT = "student.pt, best.pt or checkpoint.pt written by train.py / finetune.py"


@dataclass
class ModelFile:
    path: Path
    config: dict[str, Any]            # the recorded model_config
    state: dict[str, torch.Tensor]    # fd_ref keys, without the FD projection
    blob: Mapping[str, Any]           # everything else the file records (teacher, metrics, config, ...)

    @property
    def linear_probe(self) -> bool:
        return bool(self.config.get("linear_probe"))

    @property
    def is_timm(self) -> bool:
        """A timm backbone (fd_ref.timm_backbone), rebuilt from its recorded timm name and arguments."""
        return "timm" in self.config

    @property
    def num_classes(self) -> int:
        """Rows of the classifier the weights hold (0: no head, e.g. a distilled student)."""
        if self.is_timm and not self.linear_probe:
            return int(self.config.get("num_classes", 0))
        head = self.state.get("head.weight")
        return int(head.shape[0]) if head is not None else 0


def read_model_file(path: str | os.PathLike) -> ModelFile:
    """Load ``path`` and check that it is an fd-ref model file (see the module docstring)."""
    path = Path(path)
    blob = load_file(path)
    config = blob.get("model_config") if isinstance(blob, Mapping) else None
    if not isinstance(config, Mapping) or not config or "model" not in blob:
        raise UserError(f"{path} is not an fd-ref model file (it records no model_config and weights); "
                        f"pass a {FILES_HINT}")
    state = model_state(blob)
    if "timm" not in config:  # a timm backbone keeps timm's own keys
        state = to_fd_ref_keys(state)
    state = {k: v for k, v in state.items() if not k.startswith("projection.")}
    return ModelFile(path, dict(config), state, blob)


def vit_arguments(config: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``config`` that are arguments of :class:`VisionTransformer` (drops e.g.
    ``linear_probe``, which describes a wrapper around the ViT)."""
    names = set(inspect.signature(VisionTransformer.__init__).parameters) - {"self"}
    return {k: v for k, v in config.items() if k in names}


def build_vit(mf: ModelFile) -> torch.nn.Module:
    """The fd_ref ViT (or timm backbone) that ``mf`` records, its weights loaded in full, in eval mode."""
    if mf.linear_probe:
        raise UserError(f"{mf.path} is a linear probe (a frozen backbone + BatchNorm + linear head), not a "
                        f"plain ViT; use the checkpoint it was probed from")
    if mf.is_timm:
        from .timm_backbone import load_backbone
        return load_backbone(mf.config, mf.state, mf.path).eval()
    try:
        model = VisionTransformer(**vit_arguments(mf.config))
    except (TypeError, ValueError) as e:
        raise UserError(f"{mf.path} records an architecture this fd-ref cannot build ({e})") from None
    load_strict(model, mf.state, mf.path)
    return model.eval()
