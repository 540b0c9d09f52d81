"""A model file written by train.py / finetune.py, read back as the model it records: the one way every
entry point rebuilds a model from a file.

``student.pt`` (train.py), ``best.pt`` and ``checkpoint.pt`` (both scripts) all hold the weights under
``"model"`` and the constructor arguments under ``"model_config"`` (fd_ref's ViT: ``num_classes``,
``global_pool``, position embedding, layer scale, ...; a timm backbone: its timm name and arguments; a
linear probe: its backbone's plus ``linear_probe`` / ``probe_pool``).

    mf = read_model_file(path)     # load, check, weights in fd_ref keys (the FD projection dropped)
    model = build_model(mf)        # the recorded network, weights loaded, eval mode

One rule, used by ``finetune.py`` (``--pretrained``, ``--eval-only``, ``--linear-probe``), ``analyze.py``,
``export.py`` and a teacher read from an fd-ref file (``--teacher-checkpoint``): a ``model_config`` key this
version does not know, a tensor the recorded network needs but the file lacks, a tensor it has no place
for, or a tensor of another shape is refused with one line (:class:`UserError`, exit code 2). One
exception, the same everywhere: a ``model_config`` that lacks keys today's version records was written by
an older version; those keys take today's defaults and the tensors only they add start at their
initialisation (:attr:`ModelFile.missing`, named in :attr:`ModelFile.summary`). Weights are checked
against the architecture on PyTorch's meta device, so checking costs no memory.
(This is hand-written rather than ``load_state_dict(strict=True)``: that raises one multi-line message
listing every key, and knows nothing of model_config keys or older files.)
"""
from __future__ import annotations

import inspect
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

from fd_ref.checkpoint.io import check_fits, load_file, model_state
from fd_ref.checkpoint.keys import to_fd_ref_keys
from fd_ref.errors import UserError
from fd_ref.models.probe import PROBE_POOLS, LinearProbe
from fd_ref.models.timm_backbone import TimmBackbone, build_from_config
from fd_ref.models.vit import VisionTransformer

FILES_HINT = "student.pt, best.pt or checkpoint.pt written by train.py / finetune.py"
PROBE_KEYS = ("linear_probe", "probe_pool")   # a LinearProbe's own entries of its model_config
TIMM_KEYS = ("timm", "timm_kwargs", "img_size", "num_classes", "drop_path_rate")  # TimmBackbone.config


def vit_arguments(config: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``config`` that are arguments of :class:`VisionTransformer` (drops e.g.
    ``linear_probe``, which describes a wrapper around the ViT)."""
    names = set(inspect.signature(VisionTransformer.__init__).parameters) - {"self"}
    return {k: v for k, v in config.items() if k in names}


def known_keys(config: Mapping[str, Any]) -> set[str]:
    """The ``model_config`` keys this version writes for a model of ``config``'s kind."""
    own = set(TIMM_KEYS) if "timm" in config else set(inspect.signature(VisionTransformer.__init__).parameters)
    return (own - {"self"}) | (set(PROBE_KEYS) if config.get("linear_probe") else set())


def check_model_config(config: Mapping[str, Any], source: str | os.PathLike) -> dict[str, Any]:
    """``config`` (a file's ``model_config``) if this version knows all its keys; a newer file's unknown
    keys raise one :class:`UserError` naming them."""
    unknown = sorted(set(config) - known_keys(config))
    if unknown:
        raise UserError(f"{source} records model_config keys this version of fd_ref does not know: "
                        f"{', '.join(f'{k}={config[k]!r}' for k in unknown)}; it was written by a newer "
                        f"version, so update fd_ref (or load its weights with --pretrained and --model)")
    return dict(config)


def model_from_config(config: Mapping[str, Any], head_rows: int = 0) -> nn.Module:
    """The network a ``model_config`` records, with fresh weights: fd_ref's ViT, a timm backbone, or a
    linear probe on either (``head_rows``: its classifier's rows, which its config does not record)."""
    if config.get("linear_probe"):
        backbone_config = {k: v for k, v in config.items() if k not in PROBE_KEYS}
        backbone = model_from_config({**backbone_config, "num_classes": 0})
        pool = config.get("probe_pool", "cls")
        if pool not in PROBE_POOLS:
            raise ValueError(f"probe pool {pool!r}")
        return LinearProbe(backbone, head_rows, pool=pool)
    if "timm" in config:
        return build_from_config(config)
    return VisionTransformer(**vit_arguments(config))


@dataclass
class ModelFile:
    path: Path
    config: dict[str, Any]            # the recorded model_config
    state: dict[str, torch.Tensor]    # fd_ref keys (timm keys for a timm backbone), without the FD projection
    blob: Mapping[str, Any]           # everything else the file records (teacher, metrics, config, ...)
    missing: list[str] = field(default_factory=list)  # tensors an older file lacks (left at init)

    @property
    def linear_probe(self) -> bool:
        return bool(self.config.get("linear_probe"))

    @property
    def is_timm(self) -> bool:
        """A timm backbone (fd_ref.models.timm_backbone), rebuilt from its recorded timm name and arguments."""
        return "timm" in self.config

    @property
    def num_classes(self) -> int:
        """Rows of the classifier the weights hold (0: no head, e.g. a distilled student)."""
        if self.is_timm and not self.linear_probe:
            return int(self.config.get("num_classes", 0))
        head = self.state.get("head.weight")
        return int(head.shape[0]) if head is not None else 0

    @property
    def summary(self) -> str:
        """One line: what was read, and the tensors an older file lacks."""
        line = f"loaded {len(self.state)} tensors from {self.path}"
        if self.missing:
            more = f", ... ({len(self.missing)} in all)" if len(self.missing) > 6 else ""
            shown = ", ".join(self.missing[:6]) + more
            line += f"; missing (left at init, an older file): {shown}"
        return line


def read_model_file(path: str | os.PathLike, blob: Any = None) -> ModelFile:
    """Load ``path`` (or take its already loaded ``blob``) and check it by the rule in the module docstring."""
    path = Path(path)
    blob = load_file(path) if blob is None else blob
    config = blob.get("model_config") if isinstance(blob, Mapping) else None
    if not isinstance(config, Mapping) or not config or "model" not in blob:
        raise UserError(f"{path} is not an fd-ref model file (it records no model_config and weights); "
                        f"pass a {FILES_HINT}")
    config = check_model_config(config, path)
    state = model_state(blob)
    if "timm" not in config:  # a timm backbone keeps timm's own keys
        state = to_fd_ref_keys(state)
    state = {k: v for k, v in state.items() if not k.startswith("projection.")}
    mf = ModelFile(path, config, state, blob)
    older = bool(known_keys(config) - set(config) - set(PROBE_KEYS))
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Initializing zero-element tensors")  # a head of 0 rows
            expected = model_from_config(config, mf.num_classes).state_dict()
    except (TypeError, ValueError) as e:
        raise UserError(f"{path} records an architecture this fd-ref cannot build ({e})") from None
    mf.missing = sorted(set(expected) - set(state)) if older else []
    fits = {k: v for k, v in expected.items() if k not in mf.missing}
    check_fits(fits, state, path)
    return mf


def build_model(mf: ModelFile) -> nn.Module:
    """The network ``mf`` records (ViT, timm backbone or linear probe), its weights loaded, in eval mode."""
    model = model_from_config(mf.config, mf.num_classes)
    model.load_state_dict(mf.state, strict=not mf.missing)
    return model.eval()

