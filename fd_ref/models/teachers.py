"""Frozen teachers for feature distillation (paper Sec. 3.1, Table 1).

A teacher is any pretrained network whose *whole feature map* FD distils: every token, class token
included, taken after the network's final norm (the published ``PRED_FEAT_AFTERNORM: True`` of every
published config; ``feat_after_norm=False`` takes the tokens before that norm, the published default and
the paper's ablation). ``build_teacher`` returns a :class:`Teacher`, a frozen
module that is always in eval mode (no drop path, no dropout: the teacher half of the asymmetric drop
path) and exposes ``embed_dim``, ``grid`` and ``forward(images) -> [B, T, C]``.

Precision: ``Teacher.set_precision(torch.bfloat16)`` (what train.py does for a bf16 run) stores only the
weights of the Linear and Conv layers in bf16 and runs the network under bf16 autocast: the matrix products
run in bf16, while every norm, the class token / position embeddings (so a timm ViT's residual stream) and
the tokens returned (the features the whitening reads) stay in float32. Published: the CLIP teacher keeps
its LayerNorms in fp32 with fp16 weights elsewhere (``models/clip/model.py``), DINO / DeiT run fp32 weights
under autocast. Casting the whole teacher to bf16 (fd-ref before) also rounded the norms and the returned
tokens; bench/teacher_precision.py measures both on a ViT-B/16.

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
- ``timm:<name>``: any timm model with a spatial last feature map (``fd_ref.models.timm_backbone``): a ViT's
  tokens, a CNN's [B, C, H, W] map (ResNet, ConvNeXt), Swin / SwinV2's [B, H, W, C] map, all read as tokens
  [B, H*W, C] (no class token), taken after the model's final norm where it has one (Swin's ``norm``;
  ConvNeXt's head norm, applied per position; a ResNet has none);
- ``esvit_swin_base``: the paper's EsViT Swin-B teacher (published ``models/esvit.py``): timm's Swin with
  patch 4, width 128, depths (2, 2, 18, 2), heads (4, 8, 16, 32), window 14, ImageNet mean/std; its last
  stage after the final norm, 128 * 8 = 1024 channels on a 7 x 7 grid at 224 px (published
  ``PRED_FEAT_S3: False``, the default of every published config). ``esvit_swin_base_s3`` is the published
  ``PRED_FEAT_S3: True`` variant: the first three stages only, 128 * 4 = 512 channels on 14 x 14, with a
  final LayerNorm at its initial weights (the released norm belongs to the fourth stage and is dropped).
  Weights: the released EsViT checkpoint (``ESVIT_URL``), passed as ``checkpoint`` (:func:`esvit_to_timm`
  maps its keys). timm's Swin computes the published Swin's function on these weights: window order,
  relative-position table and index, shift direction and mask, window clipping (14 x 14 at stage 3: one
  unshifted window; 7 x 7 at stage 4), merge order, qk scale and final norm all agree
  (``tests/test_esvit_parity.py``);
- fd_ref's own presets (``vit_tiny`` ... ``vit_large``), e.g. a ViT trained by ``finetune.py``.
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch
import torch.nn as nn

import re

from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN, IMAGENET_DEFAULT_STD as IMAGENET_STD
from timm.layers import RmsNorm, RmsNorm2d

from fd_ref.checkpoint.io import load_file, load_weights, model_state
from fd_ref.errors import UserError
from fd_ref.files import strip_prefixes
from fd_ref.method.position import Grid
from fd_ref.models import hub
from fd_ref.models.from_file import build_model, read_model_file
from fd_ref.models.timm_backbone import (backbone_state, check_timm_name, head_norm, is_timm_config, probe_layout,
                                         to_tokens)
from fd_ref.models.vit import PRESETS, VisionTransformer, create_vit


PAPER_TEACHERS = {
    "dino_vit_base": "vit_base_patch16_224.dino",
    "deit_vit_base": "deit_base_patch16_224.fb_in1k",
    "clip_vit_base": "vit_base_patch16_clip_quickgelu_224.openai",
    "clip_vit_large": "vit_large_patch14_clip_quickgelu_224.openai",
}


MATRIX_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# every norm a teacher may hold: torch's, and timm's RMS norms (plain modules, not LayerNorm subclasses)
NORM_LAYERS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._BatchNorm, RmsNorm, RmsNorm2d)


def _inputs_to_float32(module: nn.Module, args: tuple) -> tuple:
    return tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


class Teacher(nn.Module):
    """Frozen wrapper: re-normalises the input, runs the network, returns its tokens after its final norm
    (``feat_after_norm=True``) or before it (``False``: the final norm is replaced by the identity)."""

    def __init__(self, model: nn.Module, embed_dim: int, grid: Grid, num_prefix_tokens: int,
                 mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD,
                 name: str = "", feat_after_norm: bool = True, fmt: str = "tokens") -> None:
        super().__init__()
        self.feat_after_norm, self.fmt = feat_after_norm, fmt
        avg_pool_vit = isinstance(model, VisionTransformer) and model.global_pool == "avg"
        # ConvNeXt-like timm models normalise after pooling, in their head: that norm is applied per position
        self.head_norm = feat_after_norm and fmt != "tokens" and head_norm(model) is not None
        if not feat_after_norm and not avg_pool_vit and not (fmt != "tokens" and head_norm(model) is not None):
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
        self.compute_dtype: Optional[torch.dtype] = None  # set_precision
        self._norm_hooks: list = []
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "Teacher":
        """A teacher never trains: it stays in eval mode whatever its parent does."""
        return super().train(False)

    def set_precision(self, dtype: Optional[torch.dtype]) -> "Teacher":
        """Run the matrix products in ``dtype`` (bf16 / fp16), everything else in float32 (module docstring):
        Linear and Conv weights are stored in ``dtype``, every other parameter (norms, embeddings, tables) in
        float32, ``forward`` runs under ``dtype`` autocast, and every norm layer computes in float32 on a
        float32 copy of its input. ``None``: float32 throughout."""
        self.compute_dtype = dtype
        self.model.float()
        for handle in self._norm_hooks:
            handle.remove()
        self._norm_hooks = []
        if dtype is not None:
            for module in self.model.modules():
                if isinstance(module, MATRIX_LAYERS):
                    module.to(dtype)
                elif isinstance(module, NORM_LAYERS):  # CPU autocast would run a norm on bf16 input in bf16
                    self._norm_hooks.append(module.register_forward_pre_hook(_inputs_to_float32))
        return self

    def _precision(self, device: torch.device):
        """Autocast to ``compute_dtype`` (none on a device without autocast, e.g. meta for a FLOP count)."""
        dtype = self.compute_dtype
        if dtype is None or not torch.amp.is_autocast_available(device.type):
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=dtype)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Tokens [B, T, C] in float32 (the features the whitening reads)."""
        x = images.float() * self.scale + self.shift if self.renormalise else images.float()
        with self._precision(x.device):
            tokens = self.model.forward_features(x)
            if self.fmt != "tokens":  # a CNN / Swin map -> tokens [B, H*W, C]
                if self.head_norm and self.fmt == "NCHW":
                    tokens = self.model.head.norm(tokens)
                tokens = to_tokens(tokens, self.fmt)
                if self.head_norm and self.fmt == "NHWC":
                    tokens = self.model.head.norm(tokens)
            elif self.feat_after_norm and isinstance(self.model, VisionTransformer) and self.model.global_pool == "avg":
                # Mean-pooling ViTs normalise after pooling; their final norm is fc_norm, applied per token.
                tokens = self.model.fc_norm(tokens)
        return tokens.float()


def _timm_teacher(timm_name: str, img_size: int, checkpoint: Optional[str], display: str,
                  timm_kwargs: Optional[dict] = None, feat_after_norm: bool = True) -> Teacher:
    import timm

    kwargs = dict(num_classes=0, img_size=img_size, **(timm_kwargs or {}))

    def create(pretrained: bool) -> nn.Module:
        try:
            return timm.create_model(timm_name, pretrained=pretrained, **kwargs)
        except TypeError as e:  # CNNs take no img_size
            if "img_size" not in str(e) or "img_size" in (timm_kwargs or {}):
                raise
            kwargs.pop("img_size")
            return timm.create_model(timm_name, pretrained=pretrained, **kwargs)

    try:
        if checkpoint is not None:
            if not os.path.isfile(checkpoint):
                raise UserError(f"teacher checkpoint {checkpoint} does not exist; check the path")
            model = create(False)
            # timm's own filter maps original releases (DINO, OpenAI CLIP, DeiT) to its keys and resamples
            # position embeddings for another image size.
            blob = load_file(checkpoint)
            state = model_state(blob)
            recorded = blob.get("model_config") if isinstance(blob, dict) else None
            if is_timm_config(recorded):  # a timm model fd-ref trained (finetune.py --from-scratch --model timm:...)
                state = backbone_state(recorded, state)
            filter_fn = _checkpoint_filter(timm_name)
            if filter_fn is not None:
                state = filter_fn(state, model)
            summary = load_weights(model, state, what=f"teacher {display}", ignore=(r"head\.(?!norm\.).*",))
            if "missing" in summary:  # (a ConvNeXt's head norm is its final norm: loaded)
                raise UserError(f"teacher checkpoint {checkpoint} does not fit {display}: {summary}")
        else:
            # one quick request through huggingface_hub's own configuration (HF_ENDPOINT, proxies,
            # HF_HUB_OFFLINE); unreachable: the local cache only, failing at once instead of retrying
            offline = hub.hub_unreachable(_hub_repo(timm_name))
            if offline:
                hub.set_offline()
            try:
                model = create(True)
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
    except (TypeError, ValueError, AssertionError, IndexError) as e:  # arguments timm cannot build
        raise UserError(f"timm cannot build teacher {display!r} with {timm_kwargs or 'its defaults'} at {img_size} "
                        f"px ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})") from None
    except Exception as e:  # noqa: BLE001 - network / hub failures come in many types
        raise UserError(f"could not download the weights of teacher {display!r} "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}); "
                        f"offline? pass --teacher-checkpoint PATH with local weights") from None
    cfg = model.pretrained_cfg or {}
    return _wrap_timm(model, img_size, display, feat_after_norm, mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
                      std=tuple(cfg.get("std", IMAGENET_STD)))


def _wrap_timm(model: nn.Module, img_size: int, display: str, feat_after_norm: bool,
               mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD) -> Teacher:
    """A timm model as a :class:`Teacher`: a ViT (``num_prefix_tokens`` and ``patch_embed.grid_size``)
    returns its tokens; any other model's last feature map is measured once (``probe_layout``)."""
    vit_like = hasattr(model, "num_prefix_tokens") and hasattr(getattr(model, "patch_embed", None), "grid_size")
    if vit_like:
        grid, prefix, fmt, width = tuple(model.patch_embed.grid_size), model.num_prefix_tokens, "tokens", \
            model.num_features
    else:
        layout = probe_layout(model, img_size, f"teacher {display}")
        grid, prefix, fmt, width = layout.grid, layout.num_prefix_tokens, layout.fmt, layout.channels
    return Teacher(model, width, grid, prefix, mean=mean, std=std, name=display, feat_after_norm=feat_after_norm,
                   fmt=fmt)


# The released EsViT Swin-B checkpoint the published models/esvit.py downloads (weights under "student").
ESVIT_URL = ("https://chunyleu.blob.core.windows.net/output/ckpts/esvit/swin/swin_base/bl_lr0.0005_nodes4_gpu16_"
             "bs8_multicrop_epoch300_dino_aug_window14_lv/continued_from_epoch0200_dense_norm_true/"
             "checkpoint_best.pth")
ESVIT_TIMM = "swin_base_patch4_window7_224"
ESVIT_ARGS = dict(patch_size=4, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=14)
ESVIT_NAMES = {"esvit_swin_base": 4, "esvit_swin_base_s3": 3}  # name -> stages kept


def esvit_to_timm(blob, num_stages: int = 4) -> dict[str, torch.Tensor]:
    """The released EsViT checkpoint (published ``models/esvit.py``: ``torch.load(path)["student"]``, keys
    of Microsoft's Swin after removing ``module.``) -> keys of timm's ``SwinTransformer``:

    - the state is ``blob["student"]`` when the file holds one (a DINO-style training checkpoint), else the
      file itself; prefixes ``module.`` (DDP) and ``backbone.`` (a multi-crop wrapper) are removed;
    - Microsoft's Swin merges patches at the END of stage i (``layers.{i}.downsample``), timm at the START
      of stage i + 1: ``layers.{i}.downsample.*`` -> ``layers.{i+1}.downsample.*`` (same tensors: both
      concatenate the 2x2 neighbours in the order (0,0), (1,0), (0,1), (1,1), then norm, then reduction);
    - buffers timm recomputes (``relative_position_index``, ``attn_mask``) and everything that is not the
      backbone (the self-supervised heads ``head*``) are dropped;
    - ``num_stages=3`` (``PRED_FEAT_S3``): stage 4, the merging into it and the final ``norm`` are dropped.
    """
    state = blob.get("student", blob) if isinstance(blob, dict) else blob
    if not isinstance(state, dict):
        raise UserError("EsViT checkpoint holds no state dict (expected a dict of weights under 'student')")
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        key = strip_prefixes(key, ("module.", "backbone."))
        if key.endswith(("relative_position_index", "attn_mask")) or not key.startswith(
                ("patch_embed.", "layers.", "norm.", "absolute_pos_embed")):
            continue
        m = re.match(r"layers\.(\d+)\.downsample\.(.*)", key)
        if m:
            key = f"layers.{int(m.group(1)) + 1}.downsample.{m.group(2)}"
        stage = re.match(r"layers\.(\d+)\.", key)
        if stage and int(stage.group(1)) >= num_stages:
            continue
        if key.startswith("norm.") and num_stages < 4:
            continue
        out[key] = value
    return out


def _esvit_teacher(name: str, img_size: int, checkpoint: Optional[str], feat_after_norm: bool,
                   timm_kwargs: Optional[dict] = None) -> Teacher:
    """The EsViT teacher; ``timm_kwargs`` override the Swin-B shape (tests build a tiny one)."""
    import timm

    if checkpoint is None:
        raise UserError(f"teacher {name} needs the released EsViT checkpoint: download {ESVIT_URL} and pass "
                        f"--teacher-checkpoint PATH")
    if not os.path.isfile(checkpoint):
        raise UserError(f"teacher checkpoint {checkpoint} does not exist; check the path")
    stages = ESVIT_NAMES[name]
    base = {**ESVIT_ARGS, **(timm_kwargs or {})}
    args = {**base, "depths": tuple(base["depths"])[:stages], "num_heads": tuple(base["num_heads"])[:stages]}
    try:
        model = timm.create_model(ESVIT_TIMM, pretrained=False, num_classes=0, img_size=img_size, **args)
    except Exception as e:  # noqa: BLE001 - e.g. an image size the stages cannot halve
        raise UserError(f"timm cannot build teacher {name} at {img_size} px ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:120] if str(e) else ''})") from None
    state = esvit_to_timm(load_file(checkpoint), stages)
    fresh = {"norm.weight", "norm.bias"} if stages < 4 else set()  # S3: the final norm stays at 1 / 0
    missing, unexpected = sorted(set(model.state_dict()) - set(state) - fresh), sorted(set(state) - set(model.state_dict()))
    if missing or unexpected:
        raise UserError(f"teacher checkpoint {checkpoint} does not fit {name}: "
                        f"{'missing ' + ', '.join(missing[:4]) if missing else 'unexpected ' + ', '.join(unexpected[:4])}"
                        f" ({len(missing)} missing, {len(unexpected)} unexpected); is it the released EsViT Swin-B?")
    load_weights(model, state, what=f"teacher {name}")
    return _wrap_timm(model, img_size, name, feat_after_norm)


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
        if config:  # an fd-ref model file: rebuilt as it records (fd_ref.models.from_file)
            if config.get("img_size") != img_size:
                raise UserError(f"teacher checkpoint {checkpoint} was trained at {config.get('img_size')} px "
                                f"but --img-size is {img_size}; pass --img-size {config.get('img_size')}")
            mf = read_model_file(checkpoint)
            if mf.linear_probe:
                raise UserError(f"teacher checkpoint {checkpoint} is a linear probe; pass the checkpoint it was "
                                f"probed from")
            model = build_model(mf)
        else:
            model = create_vit(name, img_size=img_size, **overrides)
            load_weights(model, model_state(blob), what=f"teacher {name}")
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
    if name in ESVIT_NAMES:
        return _esvit_teacher(name, img_size, checkpoint, feat_after_norm, timm_kwargs)
    if name.startswith("timm:"):
        check_timm_name(name, "teacher")  # before any download
        return _timm_teacher(name[len("timm:"):], img_size, checkpoint, name, timm_kwargs, feat_after_norm)
    if name in PRESETS:
        return _fd_ref_teacher(name, img_size, checkpoint, feat_after_norm, **overrides)
    raise UserError(f"unknown teacher {name!r}; use one of {', '.join([*PAPER_TEACHERS, *ESVIT_NAMES])}, timm:<timm model "
                    f"name>, or an fd_ref preset ({', '.join(PRESETS)})")
