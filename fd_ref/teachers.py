"""Frozen teachers for feature distillation (paper Sec. 3.1, Table 1).

A teacher is any pretrained network whose *whole feature map* FD distils: every token, class token
included, taken after the network's final norm (the published ``PRED_FEAT_AFTERNORM: True`` of every
published config; ``feat_after_norm=False`` takes the tokens before that norm, the published default and
the paper's ablation). ``build_teacher`` returns a :class:`Teacher`, a frozen
module that is always in eval mode (no drop path, no dropout: the teacher half of the asymmetric drop
path) and exposes ``embed_dim``, ``grid`` and ``forward(images) -> [B, T, C]``.

Images always arrive normalised with the ImageNet mean/std (the student's input). A teacher trained with
other statistics (CLIP) undoes that and applies its own inside ``forward``:

    x_teacher = (x * std_in + mean_in - mean_teacher) / std_teacher

Names:
- ``dino_vit_base``, ``deit_vit_base``, ``clip_vit_base``, ``clip_vit_large``: the paper's teachers
  through timm's pretrained tags (downloaded from the Hugging Face hub unless ``checkpoint`` is given).
  The CLIP teachers are OpenAI's CLIP image towers, whose MLPs use QuickGELU ``x * sigmoid(1.702 x)``
  (published ``models/clip/model.py``): timm's ``*_clip_quickgelu_224.openai`` models, not the
  ``*_clip_224.openai`` ones, which run the same weights with exact GELU and give other features.
  A ``checkpoint`` may be timm's layout or an original release (OpenAI CLIP ``visual.*`` keys, DINO,
  DeiT): timm's own checkpoint filter maps it;
- ``timm:<name>``: any timm ViT-like model with ``forward_features`` returning tokens;
- fd_ref's own presets (``vit_tiny`` ... ``vit_large``), e.g. a ViT trained by ``finetune.py``.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn as nn

from .checkpoint import check_model_config, load_file, load_weights, model_state
from . import hub
from .errors import UserError
from .position import Grid
from .vit import PRESETS, VisionTransformer, create_vit

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

PAPER_TEACHERS = {
    "dino_vit_base": "vit_base_patch16_224.dino",
    "deit_vit_base": "deit_base_patch16_224.fb_in1k",
    "clip_vit_base": "vit_base_patch16_clip_quickgelu_224.openai",
    "clip_vit_large": "vit_large_patch14_clip_quickgelu_224.openai",
}


class Teacher(nn.Module):
    """Frozen wrapper: re-normalises the input, runs the network, returns its tokens after its final norm
    (``feat_after_norm=True``) or before it (``False``: the final norm is replaced by the identity)."""

    def __init__(self, model: nn.Module, embed_dim: int, grid: Grid, num_prefix_tokens: int,
                 mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD,
                 name: str = "", feat_after_norm: bool = True) -> None:
        super().__init__()
        self.feat_after_norm = feat_after_norm
        avg_pool_vit = isinstance(model, VisionTransformer) and model.global_pool == "avg"
        if not feat_after_norm and not avg_pool_vit:  # a mean-pooling fd_ref ViT: fc_norm is skipped instead
            if not isinstance(getattr(model, "norm", None), nn.Module):
                raise UserError(f"teacher {name or type(model).__name__} has no final norm `norm` to leave "
                                f"out; use --teacher-feat-after-norm")
            model.norm = nn.Identity()
        self.model, self.embed_dim, self.grid = model, embed_dim, tuple(grid)
        self.num_prefix_tokens, self.name = num_prefix_tokens, name
        self.renormalise = tuple(mean) != IMAGENET_MEAN or tuple(std) != IMAGENET_STD
        in_mean, in_std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        # x_teacher = x * scale + shift with scale = std_in/std_t, shift = (mean_in - mean_t)/std_t
        self.register_buffer("scale", (in_std / torch.tensor(std)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", ((in_mean - torch.tensor(mean)) / torch.tensor(std)).view(1, 3, 1, 1),
                             persistent=False)
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "Teacher":
        """A teacher never trains: it stays in eval mode whatever its parent does."""
        return super().train(False)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images * self.scale + self.shift if self.renormalise else images
        tokens = self.model.forward_features(x.to(self.dtype))
        if self.feat_after_norm and isinstance(self.model, VisionTransformer) and self.model.global_pool == "avg":
            # Mean-pooling ViTs normalise after pooling; their final norm is fc_norm, applied per token.
            tokens = self.model.fc_norm(tokens)
        return tokens


def _timm_teacher(timm_name: str, img_size: int, checkpoint: Optional[str], display: str,
                  timm_kwargs: Optional[dict] = None, feat_after_norm: bool = True) -> Teacher:
    import timm

    kwargs = dict(num_classes=0, img_size=img_size, **(timm_kwargs or {}))
    try:
        if checkpoint is not None:
            if not os.path.isfile(checkpoint):
                raise UserError(f"teacher checkpoint {checkpoint} does not exist; check the path")
            model = timm.create_model(timm_name, pretrained=False, **kwargs)
            # timm's own filter maps original releases (DINO, OpenAI CLIP, DeiT) to its keys and resamples
            # position embeddings for another image size.
            state = model_state(load_file(checkpoint))
            filter_fn = _checkpoint_filter(timm_name)
            if filter_fn is not None:
                state = filter_fn(state, model)
            summary = load_weights(model, state, what=f"teacher {display}", ignore=(r"head\..*",))
            if "missing" in summary:
                raise UserError(f"teacher checkpoint {checkpoint} does not fit {display}: {summary}")
        else:
            # one quick request through huggingface_hub's own configuration (HF_ENDPOINT, proxies,
            # HF_HUB_OFFLINE); unreachable: the local cache only, failing at once instead of retrying
            offline = hub.hub_unreachable(_hub_repo(timm_name))
            if offline:
                hub.set_offline()
            try:
                model = timm.create_model(timm_name, pretrained=True, **kwargs)
            except Exception:  # noqa: BLE001 - whatever timm raises when the cache lacks the weights
                if offline:
                    raise UserError(f"could not get the weights of teacher {display!r}: {offline}, and they are "
                                    f"not in the local cache; pass --teacher-checkpoint PATH with local "
                                    f"weights") from None
                raise
    except UserError:
        raise
    except RuntimeError as e:
        if "Unknown model" in str(e) or "Invalid pretrained tag" in str(e):
            raise UserError(f"unknown teacher {display!r}: timm has no model {timm_name!r}") from None
        raise UserError(f"could not get the weights of teacher {display!r} ({str(e).splitlines()[0][:120]}); "
                        f"pass --teacher-checkpoint PATH with local weights") from None
    except Exception as e:  # noqa: BLE001 - network / hub failures come in many types
        raise UserError(f"could not download the weights of teacher {display!r} "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}); "
                        f"offline? pass --teacher-checkpoint PATH with local weights") from None
    cfg = model.pretrained_cfg or {}
    grid = tuple(model.patch_embed.grid_size)
    return Teacher(model, model.num_features, grid, getattr(model, "num_prefix_tokens", 1),
                   mean=tuple(cfg.get("mean", IMAGENET_MEAN)), std=tuple(cfg.get("std", IMAGENET_STD)),
                   name=display, feat_after_norm=feat_after_norm)


def _hub_repo(timm_name: str) -> str:
    """The hub repository timm downloads ``timm_name``'s weights from (timm/<name> when unrecorded)."""
    import timm
    try:
        cfg = timm.models.get_pretrained_cfg(timm_name)
    except Exception:  # noqa: BLE001 - an unknown name: timm.create_model reports it
        cfg = None
    return getattr(cfg, "hf_hub_id", None) or f"timm/{timm_name}"


def _checkpoint_filter(timm_name: str):
    """timm's checkpoint filter for the model's family (maps original releases to timm keys)."""
    import importlib

    import timm
    entry = timm.models.get_pretrained_cfg(timm_name)  # noqa: F841 - validates the name
    module = importlib.import_module(timm.models.model_entrypoint(timm_name.split(".")[0]).__module__)
    return getattr(module, "checkpoint_filter_fn", None)


def _fd_ref_teacher(name: str, img_size: int, checkpoint: Optional[str], feat_after_norm: bool = True,
                    **overrides) -> Teacher:
    if checkpoint is None:
        model = create_vit(name, img_size=img_size, **overrides)
    else:
        blob = load_file(checkpoint)
        config = blob.get("model_config") if isinstance(blob, dict) else None
        if config:
            if config.get("img_size") != img_size:
                raise UserError(f"teacher checkpoint {checkpoint} was trained at {config.get('img_size')} px "
                                f"but --img-size is {img_size}; pass --img-size {config.get('img_size')}")
            model = VisionTransformer(**check_model_config(config, checkpoint))
        else:
            model = create_vit(name, img_size=img_size, **overrides)
        state = model_state(blob)
        load_weights(model, state, what=f"teacher {name}")
    return Teacher(model, model.embed_dim, model.grid, model.num_prefix_tokens, name=name,
                   feat_after_norm=feat_after_norm)


def build_teacher(name: str, img_size: int = 224, checkpoint: Optional[str] = None, *,
                  feat_after_norm: bool = True, timm_kwargs: Optional[dict] = None, **overrides) -> Teacher:
    """Build the frozen teacher ``name`` (see the module docstring), optionally from local weights.

    ``feat_after_norm``: the teacher's tokens after (True, every published config) or before its final norm.
    ``timm_kwargs`` go to ``timm.create_model`` for timm teachers (e.g. ``dict(depth=2, embed_dim=32,
    num_heads=2, patch_size=8)`` builds a tiny CLIP-shaped teacher for tests; its checkpoint must fit).
    ``overrides`` (e.g. ``patch_size=4, depth=4``) shape an fd_ref preset built without a checkpoint, or
    from a checkpoint that does not record its architecture; a checkpoint's ``model_config`` wins."""
    if name in PAPER_TEACHERS:
        return _timm_teacher(PAPER_TEACHERS[name], img_size, checkpoint, name, timm_kwargs, feat_after_norm)
    if name.startswith("timm:"):
        return _timm_teacher(name[len("timm:"):], img_size, checkpoint, name, timm_kwargs, feat_after_norm)
    if name in PRESETS:
        return _fd_ref_teacher(name, img_size, checkpoint, feat_after_norm, **overrides)
    raise UserError(f"unknown teacher {name!r}; use one of {', '.join(PAPER_TEACHERS)}, timm:<timm model "
                    f"name>, or an fd_ref preset ({', '.join(PRESETS)})")
