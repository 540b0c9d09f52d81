"""Any timm backbone as an FD student (or the network behind a teacher): CNNs, Swin, SwinV2, plain ViTs.

The paper distils "features of any pretraining method" (Sec. 3.1) and its tables include Swin students.
fd_ref keeps its own BEiT-style ViT as the default student; :class:`TimmBackbone` is a thin adapter around
``timm.create_model(name, pretrained=False, **kwargs)`` that gives :class:`~fd_ref.method.distill.FeatureDistillation`
and the training loop the same surface as that ViT:

    embed_dim (= num_features)  width C of the last feature map
    grid                        (H, W) of the last feature map
    num_prefix_tokens           class / register tokens before the patch tokens (0 for CNNs and Swin)
    forward_features(x)         images [B, 3, S, S] -> tokens [B, P + H*W, C]
    forward(x)                  timm's own forward (its own pooling and classifier head)
    config                      {"timm": name, "timm_kwargs": {...}, "img_size", "num_classes",
                                 "drop_path_rate"}: what a checkpoint records to rebuild the model

timm returns the last feature map in one of three layouts; all become tokens [B, N, C] (row-major over
the grid, the layout of a ViT's patch tokens):

    "tokens"  ViTs:            x [B, P + H*W, C]   -> x
    "NCHW"    CNNs:            x [B, C, H, W]      -> rearrange(x, "b c h w -> b (h w) c")
    "NHWC"    Swin / SwinV2:   x [B, H, W, C]      -> rearrange(x, "b h w c -> b (h w) c")

The layout, grid and width are measured once, by running ``forward_features`` on one blank image at
construction (:func:`probe_layout`); a model whose output is none of these is refused with one line.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
import torch.nn as nn
from einops import rearrange

from fd_ref.checkpoint.io import load_strict
from fd_ref.errors import UserError
from fd_ref.models.swinv2_init import init_head_like_published, init_like_published, is_swinv2

LAYOUTS = ("tokens", "NCHW", "NHWC")
PREFIX = "timm:"


def is_timm_name(name: str) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


def parse_kwargs(value: Any, flag: str = "--model-kwargs") -> dict[str, Any]:
    """Constructor arguments for timm from a flag or a YAML value.

    Accepted: a mapping (YAML), a JSON / YAML flow mapping (``'{"embed_dim": 16, "depths": [1, 1]}'`` or
    ``'{embed_dim: 16, depths: [1, 1]}'``), or ``key=value`` pairs separated by commas outside brackets
    (``'embed_dim=16,depths=[1,1]'``), each value read as YAML (numbers, lists, true/false); None or ""
    -> no arguments."""
    import yaml

    if value is None or value == "" or value == {}:
        return {}
    if isinstance(value, Mapping):
        return dict(value)
    text = str(value).strip()
    try:
        if text.startswith("{"):
            parsed = yaml.safe_load(text)
        else:
            parsed, depth, start = {}, 0, 0
            pieces = []
            for i, ch in enumerate(text + ","):
                depth += ch in "[({" and 1 or 0
                depth -= ch in "])}" and 1 or 0
                if ch == "," and depth == 0:
                    pieces.append(text[start:i])
                    start = i + 1
            if depth != 0:
                raise ValueError("unbalanced brackets")
            for piece in filter(str.strip, pieces):
                key, sep, val = piece.partition("=")
                if not sep or not key.strip():
                    raise ValueError(f"{piece!r} is not key=value")
                parsed[key.strip()] = yaml.safe_load(val)
    except (yaml.YAMLError, ValueError) as e:
        raise UserError(f"{flag} {text!r} is not a mapping of timm arguments ({str(e).splitlines()[0]}); "
                        f"write e.g. 'embed_dim=16,depths=[1,1]' or a JSON object") from None
    if not isinstance(parsed, dict):
        raise UserError(f"{flag} {text!r} is not a mapping of timm arguments; write e.g. "
                        f"'embed_dim=16,depths=[1,1]' or a JSON object")
    return {str(k): (tuple(v) if isinstance(v, list) else v) for k, v in parsed.items()}


def _plain(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """kwargs as plain YAML / JSON values (tuples -> lists) for config files and checkpoints."""
    return json.loads(json.dumps(dict(kwargs)))


def check_timm_name(name: str, what: str) -> None:
    """One line when timm has no model ``name`` (with or without the ``timm:`` prefix)."""
    import timm

    bare = name[len(PREFIX):] if is_timm_name(name) else name
    if not timm.is_model(bare.split(".")[0]):
        raise UserError(f"unknown {what} timm:{bare}: timm {timm.__version__} has no model {bare!r} "
                        f"(timm.list_models('*pattern*') lists the names)")


def create_timm(name: str, img_size: int, what: str, **kwargs) -> nn.Module:
    """``timm.create_model(name, pretrained=False, img_size=img_size, **kwargs)``; ``img_size`` is left out
    for models that take no such argument (CNNs). Any failure becomes one :class:`UserError`."""
    import timm

    check_timm_name(name, what.split(" ")[0])
    try:
        try:
            return timm.create_model(name, pretrained=False, **{"img_size": img_size, **kwargs})
        except TypeError as e:
            if "img_size" not in str(e) or "img_size" in kwargs:
                raise
            return timm.create_model(name, pretrained=False, **kwargs)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - timm raises assertion / type / value / index errors alike
        raise UserError(f"timm cannot build {what} timm:{name} with {_plain(kwargs) or 'its defaults'} at "
                        f"{img_size} px ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})"
                        ) from None


@dataclass(frozen=True)
class Layout:
    fmt: str                 # tokens | NCHW | NHWC
    grid: tuple[int, int]
    num_prefix_tokens: int
    channels: int


def probe_layout(model: nn.Module, img_size: int, what: str) -> Layout:
    """Run ``model.forward_features`` on one blank image and read the layout of its output (see the module
    docstring). Refuses (one line) an output that is no feature map: not a tensor, not 3-D / 4-D, or tokens
    that do not form a grid."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model.forward_features(torch.zeros(1, 3, img_size, img_size,
                                                     dtype=next(model.parameters()).dtype))
    except Exception as e:  # noqa: BLE001 - e.g. a window that does not divide the grid at this size
        raise UserError(f"{what} cannot run at {img_size} px ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:160] if str(e) else ''}); pass another --img-size or "
                        f"other timm arguments") from None
    finally:
        model.train(was_training)
    channels = getattr(model, "num_features", None)
    if not isinstance(out, torch.Tensor) or out.dim() not in (3, 4):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserError(f"{what} has no usable feature map: forward_features returns {shape}, not "
                        f"[B, C, H, W], [B, H, W, C] or tokens [B, N, C]")
    if out.dim() == 4:
        fmt = getattr(model, "output_fmt", None)
        if fmt not in ("NCHW", "NHWC"):
            fmt = "NHWC" if out.shape[-1] == channels and out.shape[1] != channels else "NCHW"
        c, h, w = (out.shape[1], out.shape[2], out.shape[3]) if fmt == "NCHW" else (
            out.shape[3], out.shape[1], out.shape[2])
        return Layout(fmt, (int(h), int(w)), 0, int(c))
    prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
    n = out.shape[1] - prefix
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if grid is None or int(grid[0]) * int(grid[1]) != n:
        side = math.isqrt(max(n, 0))
        if side * side != n or n == 0:
            raise UserError(f"{what} has no usable feature map: its {out.shape[1]} tokens ({prefix} prefix) "
                            f"form no square grid")
        grid = (side, side)
    return Layout("tokens", (int(grid[0]), int(grid[1])), prefix, int(out.shape[-1]))


def to_tokens(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """A last feature map in ``fmt`` -> tokens [B, N, C] (module docstring)."""
    if fmt == "NCHW":
        return rearrange(x, "b c h w -> b (h w) c")
    if fmt == "NHWC":
        return rearrange(x, "b h w c -> b (h w) c")
    return x


def head_norm(model: nn.Module) -> Optional[nn.Module]:
    """The final norm a model applies after pooling in its head (timm's ``NormMlpClassifierHead``:
    ConvNeXt and kin), or None. It normalises channels, so it applies to every token of the map alike."""
    norm = getattr(getattr(model, "head", None), "norm", None)
    return norm if isinstance(norm, nn.Module) and not isinstance(norm, nn.Identity) else None


class TimmBackbone(nn.Module):
    """A timm model with the surface of fd_ref's ViT (module docstring). ``num_classes=0``: a headless
    student; ``reset_classifier(n)`` gives it timm's own classifier for fine-tuning. A SwinV2 starts from the
    published SwinV2 student's initialisation (:mod:`fd_ref.models.swinv2_init`), every other model from timm's."""

    def __init__(self, timm_name: str, img_size: int, timm_kwargs: Optional[Mapping[str, Any]] = None,
                 num_classes: int = 0, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        name = timm_name[len(PREFIX):] if is_timm_name(timm_name) else timm_name
        kwargs = dict(timm_kwargs or {})
        for reserved in ("num_classes", "img_size", "drop_path_rate", "pretrained"):
            if reserved in kwargs:
                raise UserError(f"timm argument {reserved!r} is set by fd_ref's own flags; leave it out of "
                                f"the timm arguments of timm:{name}")
        what = f"student timm:{name}"
        self.model = create_timm(name, img_size, what, num_classes=0, drop_path_rate=drop_path_rate, **kwargs)
        if is_swinv2(self.model):  # the published SwinV2 student's initialisation (fd_ref/models/swinv2_init.py)
            init_like_published(self.model)
        layout = probe_layout(self.model, img_size, what)
        self.fmt, self.grid, self.num_prefix_tokens = layout.fmt, layout.grid, layout.num_prefix_tokens
        self.embed_dim = self.num_features = layout.channels
        self.img_size, self.timm_name = img_size, name
        self.config: dict[str, Any] = dict(timm=name, timm_kwargs=_plain(kwargs), img_size=img_size,
                                           num_classes=0, drop_path_rate=float(drop_path_rate))
        if num_classes:
            self.reset_classifier(num_classes)

    @property
    def num_classes(self) -> int:
        return int(self.config["num_classes"])

    def reset_classifier(self, num_classes: int) -> None:
        """timm's own classifier head for ``num_classes`` classes: timm's initialisation, except a SwinV2's,
        which is drawn as the published fine-tuning network draws it (:mod:`fd_ref.models.swinv2_init`)."""
        self.model.reset_classifier(num_classes)
        if num_classes and is_swinv2(self.model):
            init_head_like_published(self.model)
        self.config["num_classes"] = int(num_classes)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        self.model.set_grad_checkpointing(enabled)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, S, S] -> the last feature map as tokens [B, P + H*W, C]."""
        return to_tokens(self.model.forward_features(x), self.fmt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def build_from_config(config: Mapping[str, Any], **overrides) -> TimmBackbone:
    """Rebuild the backbone a checkpoint's ``model_config`` records (``overrides`` e.g. ``num_classes``,
    ``drop_path_rate``); weights are not loaded."""
    args = {**{k: config[k] for k in ("img_size", "num_classes", "drop_path_rate") if k in config}, **overrides}
    return TimmBackbone(config["timm"], int(args.get("img_size", 224)), config.get("timm_kwargs") or {},
                        num_classes=int(args.get("num_classes", 0)),
                        drop_path_rate=float(args.get("drop_path_rate", 0.0)))


def is_timm_config(config: Optional[Mapping[str, Any]]) -> bool:
    return isinstance(config, Mapping) and "timm" in config


def backbone_state(config: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The timm model's own keys in an fd-ref file of a timm backbone (``model.`` removed), without its
    classifier (timm's ``classifier`` name: ``head`` for a ViT, ``fc`` for a ResNet) or the FD projection."""
    import timm
    head = getattr(timm.models.get_pretrained_cfg(config["timm"]), "classifier", None) or "head"
    heads = tuple(f"{h}." for h in ((head,) if isinstance(head, str) else head)) + ("head.",)
    return {k[len("model."):]: v for k, v in state.items()
            if k.startswith("model.") and not k[len("model."):].startswith(heads)}


def load_backbone(config: Mapping[str, Any], state: Mapping[str, torch.Tensor], path: Any,
                  **overrides) -> TimmBackbone:
    """The backbone ``config`` records (``overrides`` e.g. ``num_classes=0``, ``drop_path_rate``) with
    ``state`` loaded; every tensor must fit, none may be missing (the FD projection is dropped)."""
    model = build_from_config(config, **overrides)
    state = {k: v for k, v in state.items() if not k.startswith("projection.")}
    load_strict(model, state, path, what="the timm model it records")
    return model
