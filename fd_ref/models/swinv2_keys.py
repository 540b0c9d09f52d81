"""A SwinV2 saved by the published FD code -> fd-ref's SwinV2 (:class:`~fd_ref.models.timm_backbone.TimmBackbone`).

The paper's Swin row (Sec. 4, Table 1 "FD-EsViT") distils into SwinV2-B and fine-tunes it to 85.1 % top-1.
fd-ref's SwinV2 is timm's ``SwinTransformerV2``, which computes the published ``SwinV2ForFD``
(tests/test_swinv2_parity.py); this file maps the published weights onto it so that ``finetune.py`` fine-tunes
the authors' own distilled SwinV2.

The file the published distillation saves (``main_fd.py`` -> ``utils.py::save_checkpoint``, of the model without
DDP): ``{"model": FD.state_dict(), "optimizer", "lr_scheduler", "scaler", "max_accuracy", "epoch", "config"}``;
the FD wrapper (``models/feature_distillation.py::FD``) holds the student as ``encoder.*``, the projection as
``decoder.0.*`` (Conv1d) and the frozen teacher as ``feature_model.*``.

The published fine-tuning loads it (``utils.py::load_pretrained`` and ``remap_pretrained_keys_swin``) by:
taking ``["model"]`` (and an EsViT-style ``["student"]``), keeping only the ``encoder.`` keys (else only the
``module.`` keys) with that prefix removed; copying a per-stage shared bias MLP
(``layers.l.rel_pos_bias.rpe_mlp.*``) into every block of the stage; dropping the buffers it rebuilds
(``relative_position_index``, ``relative_coords_table``, ``attn_mask``); then ``load_state_dict(strict=False)``.
Nothing depends on the window or the image size: the bias MLP is continuous and its input table is rebuilt for
the fine-tuning window (so a changed window needs no interpolation, in timm either).

:func:`published_swinv2_to_timm` does the same, then renames into timm's SwinV2:

    published key                                   TimmBackbone key
    encoder.X / module.X                            X (prefix removed; the rest of the file is dropped)
    layers.l.rel_pos_bias.rpe_mlp.*                 layers.l.blocks.j.attn.cpb_mlp.* for every block j
    layers.l.blocks.j.attn.rpe_mlp.*                model.layers.l.blocks.j.attn.cpb_mlp.*
    layers.l.downsample.*  (end of stage l)         model.layers.(l+1).downsample.*  (start of stage l + 1)
    patch_embed.*, layers.*, norm.*                 model.<same>
    *relative_coords_table, *relative_position_index, *attn_mask     dropped (timm rebuilds them)
    anything else (decoder.*, feature_model.*, head.*)               dropped

:func:`load_published_swinv2` loads the result with every backbone tensor required (the published loader's
``strict=False`` would leave a missing tensor at its initialisation without a word; fd-ref refuses the file).
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import torch
import torch.nn as nn

from fd_ref.errors import UserError

ENCODER_PREFIXES = ("encoder.", "module.")  # published load_pretrained: the FD wrapper's, else DDP's
BACKBONE = ("patch_embed.", "absolute_pos_embed", "layers.", "norm.")  # SwinTransformerV2's own modules
DERIVED_BUFFERS = ("relative_coords_table", "relative_position_index", "attn_mask")


def published_weights(blob: Any) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The weights in a published file, as the published fine-tuning reads them: ``blob["model"]`` (then
    ``["student"]``) if present; of a state with ``encoder.`` (else ``module.``) keys, those keys without the
    prefix. Returns (those weights, the names of the tensors left out: FD's projection, the teacher)."""
    state = blob
    for key in ("model", "student"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError("the file holds no state dict of tensors (expected the published layout: a dict of "
                        "weights under 'model')")
    for prefix in ENCODER_PREFIXES:
        if any(k.startswith(prefix) for k in state):
            return ({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)},
                    [k for k in state if not k.startswith(prefix)])
    return dict(state), []


def expand_shared_bias_mlp(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``layers.l.rel_pos_bias.rpe_mlp.P`` (one bias MLP per stage) -> ``layers.l.blocks.j.attn.rpe_mlp.P``
    for every block j the state holds in stage l (a clone each: in fine-tuning every block learns its own)."""
    blocks: dict[str, set[int]] = {}
    for key in state:
        m = re.match(r"(layers\.\d+)\.blocks\.(\d+)\.", key)
        if m:
            blocks.setdefault(m[1], set()).add(int(m[2]))
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        m = re.fullmatch(r"(layers\.\d+)\.rel_pos_bias\.rpe_mlp\.(.*)", key)
        if m is None:
            out[key] = value
            continue
        for j in sorted(blocks.get(m[1], ())):
            out[f"{m[1]}.blocks.{j}.attn.rpe_mlp.{m[2]}"] = value.clone()
    return out


def split_published_swinv2(blob: Any) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A published SwinV2 file (or its ``SwinV2ForFD`` state dict) -> (the ``TimmBackbone`` state, the names
    of the tensors dropped as not the backbone: FD's projection, the teacher, a head). Module docstring."""
    encoder, other = published_weights(blob)
    state = expand_shared_bias_mlp(encoder)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith(DERIVED_BUFFERS):
            continue
        if not key.startswith(BACKBONE):
            other.append(key)
            continue
        key = key.replace(".rpe_mlp.", ".cpb_mlp.")
        m = re.fullmatch(r"layers\.(\d+)\.downsample\.(.*)", key)
        out["model." + (f"layers.{int(m[1]) + 1}.downsample.{m[2]}" if m else key)] = value
    return out, other


def published_swinv2_to_timm(blob: Any) -> dict[str, torch.Tensor]:
    """Published SwinV2 keys -> fd-ref's ``TimmBackbone`` keys (module docstring; non-backbone tensors dropped)."""
    return split_published_swinv2(blob)[0]


def _some(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")


def load_published_swinv2(backbone: nn.Module, blob: Any, path: Any) -> str:
    """Load a published SwinV2 file into ``backbone`` (a headless SwinV2 ``TimmBackbone``): every backbone
    tensor must be there with its shape and every tensor of the file's backbone must have a place, else one
    :class:`UserError` with the counts. Returns a one-line summary."""
    state, other = split_published_swinv2(blob)
    own = {k: v for k, v in backbone.state_dict().items() if not k.startswith("model.head.")}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
              if k in own and own[k].shape != v.shape]
    if missing or unexpected or shapes:
        name = getattr(backbone, "timm_name", "?")
        kwargs = getattr(backbone, "config", {}).get("timm_kwargs") or "its defaults"
        parts = [f"{len(missing)} of the model's {len(own)} tensors missing ({_some(missing)})" if missing else "",
                 f"{len(unexpected)} unexpected ({_some(unexpected)})" if unexpected else "",
                 f"{len(shapes)} of another shape ({shapes[0]}{', ...' if len(shapes) > 1 else ''})" if shapes else ""]
        raise UserError(f"{path} does not fit timm:{name} ({kwargs}) as a published SwinV2: "
                        f"{'; '.join(p for p in parts if p)}; pass the --model and --model-kwargs (embed_dim, "
                        f"depths, num_heads) it was distilled with")
    result = backbone.load_state_dict(state, strict=False)
    assert not result.unexpected_keys and all(k.startswith("model.head.") for k in result.missing_keys)
    dropped = f"; dropped {len(other)} tensors that are not the backbone ({_some(other)})" if other else ""
    name = getattr(backbone, "timm_name", "?")
    return f"loaded the published SwinV2 timm:{name} ({len(state)} tensors) from {path}{dropped}"
