"""AdamW parameter groups: weight-decay exclusion and BEiT-style layer-wise learning-rate decay.

FD pre-training (distillation) uses plain AdamW with weight decay on the matrices only. FD fine-tuning follows
BEiT (Bao et al., arXiv 2106.08254, Sec. 2.6 / appendix; FD paper Sec. 4 and its appendix tables): every ViT
block gets its own learning rate that shrinks geometrically with its distance from the head,

    lr_of_group = lr * lr_scale,    lr_scale = layer_decay ** (num_layers + 1 - layer)

where ``layer`` is :func:`layer_id` of the parameter: 0 for the patch embedding, class token and absolute
position embedding, ``i + 1`` for ``blocks.{i}``, and ``num_layers + 1`` for everything else (a shared relative
position bias table, final norm, fc_norm, head, FD projection), which therefore gets ``lr_scale == 1``
(published ``optimizer.py``, ``get_vit_layer``).

Weight decay follows the published ``optimizer.py`` too: it is skipped for 1-D parameters, names ending in
``.bias`` and the class token / absolute position embedding; the 2-D relative position bias tables ARE
decayed. The published optimizer also skips what the model itself lists (``no_weight_decay()`` /
``no_weight_decay_keywords()``); here every submodule with a ``no_weight_decay()`` (timm models) has its listed
parameters skipped (:func:`declared_no_weight_decay`): e.g. a SwinV2 student's bias MLPs and logit scales, as
the published ``SwinV2ForFD`` lists ``rpe_mlp`` and ``logit_scale``.

A timm Swin / SwinV2 follows the published Swin rules (``optimizer.py``, ``get_swin_layer``; SwinV2's
``no_weight_decay_keywords``), written for timm's names by :func:`swin_layer_id` and
:func:`declared_no_weight_decay`, whatever the installed timm's own grouping or no-weight-decay list says.

The ``lr_scale`` key is read by :class:`fd_ref.optim.schedule.WarmupCosine` on every step.

Hand-written rather than timm's ``param_groups_layer_decay`` (which :func:`build_timm_optimizer` uses for the
timm families other than Swin): that needs the model's ``group_matcher`` and takes the no-decay list from the
model, while the published rule decays the relative position tables and puts the shared table in the top layer.

Names are matched after stripping wrapper prefixes (``module.`` from DDP, ``_orig_mod.`` from
``torch.compile``, ``student.`` from the distillation wrapper), so the same rules apply to a bare ViT and to a
wrapped one.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Optional

import torch
from torch import nn

from fd_ref.errors import UserError
from fd_ref.files import strip_prefixes

__all__ = ["no_weight_decay", "declared_no_weight_decay", "layer_id", "swin_layer_id",
           "is_timm_swin", "param_groups", "build_optimizer"]


# Exact names (after fd_ref.files.strip_prefixes) of the token embeddings: never weight-decayed though not 1-D
# (published ``no_weight_decay``: pos_embed, cls_token; mask_token for models that have one), and in layer 0
# (before the first block) for layer decay.
EMBEDDING_NAMES: frozenset[str] = frozenset({"cls_token", "pos_embed", "mask_token"})


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """True if the parameter ``name`` must be excluded from weight decay.

    Excluded (published ``optimizer.py``): every parameter with ``param.ndim <= 1`` (biases including
    ``q_bias`` / ``v_bias``, norm weights, layer-scale ``gamma``), names ending in ``.bias``, ``cls_token``,
    ``pos_embed`` (and ``mask_token``). Relative position bias tables are 2-D and decayed.
    """
    short = strip_prefixes(name)
    return param.ndim <= 1 or short.endswith(".bias") or short in EMBEDDING_NAMES


# Published SwinV2 ``no_weight_decay_keywords`` (``rpe_wd`` False: every published config), matched as substrings
# of parameter names, in timm's names (the published ``rpe_mlp`` is timm's ``cpb_mlp``), and its
# ``no_weight_decay`` (``absolute_pos_embed``). The published Swin (v1) lists the same table keyword.
SWIN_NO_DECAY_KEYWORDS: tuple[str, ...] = ("cpb_mlp", "logit_scale", "relative_position_bias_table")
SWIN_NO_DECAY_NAMES: frozenset[str] = frozenset({"absolute_pos_embed"})


def is_timm_swin(module: nn.Module) -> bool:
    """A timm Swin or SwinV2 (``layers.{i}.blocks.{j}`` / ``layers.{i}.downsample``), the published Swin family."""
    try:
        from timm.models.swin_transformer import SwinTransformer
        from timm.models.swin_transformer_v2 import SwinTransformerV2
    except ImportError:  # pragma: no cover - timm is a requirement
        return False
    return isinstance(module, (SwinTransformer, SwinTransformerV2))


def declared_no_weight_decay(model: nn.Module) -> set[str]:
    """Full names (in ``model``) of the parameters exempt from weight decay by their model's own rule:

    - every entry of a submodule's ``no_weight_decay()`` (timm's convention: names relative to that
      submodule), resolved to parameters: a parameter's name is that parameter, a module's name is every
      parameter under it (timm before 1.0.31 lists a SwinV2's ``...attn.cpb_mlp`` modules, 1.0.31 their
      parameters);
    - in a timm Swin / SwinV2, whatever timm lists, every parameter whose name holds one of the published
      keywords (``cpb_mlp``, ``logit_scale``, ``relative_position_bias_table``) or is ``absolute_pos_embed``
      (published ``no_weight_decay`` / ``no_weight_decay_keywords``, matched as in ``optimizer.py``).

    E.g. ``student.model.layers.0.blocks.0.attn.logit_scale`` for a timm SwinV2 student under ``student.model``."""
    params = dict(model.named_parameters())
    names: set[str] = set()
    for prefix, module in model.named_modules():
        full = (lambda n: f"{prefix}.{n}" if prefix else str(n))
        listed = getattr(module, "no_weight_decay", None)
        if callable(listed):
            for entry in map(full, listed()):
                names.update(n for n in params if n == entry or n.startswith(entry + "."))
        if is_timm_swin(module):
            for local, _ in module.named_parameters():
                if local in SWIN_NO_DECAY_NAMES or any(k in local for k in SWIN_NO_DECAY_KEYWORDS):
                    names.add(full(local))
    return names


def layer_id(name: str, num_layers: int) -> int:
    """Layer index of a parameter for layer-wise lr decay, in ``0 .. num_layers + 1``.

    ``patch_embed.*``, ``cls_token``, ``pos_embed`` -> 0; ``blocks.{i}.*`` -> ``i + 1``; everything else
    (the shared ``rel_pos_bias.table``, ``norm``, ``fc_norm``, ``head``, ``projection``) -> ``num_layers + 1``
    (published ``get_vit_layer``: ``rel_pos_bias`` and the rest go to the top group).
    """
    short = strip_prefixes(name)
    if short in EMBEDDING_NAMES or short.startswith("patch_embed."):
        return 0
    if short.startswith("blocks."):
        index_text = short.split(".", 2)[1]
        if not index_text.isdigit():
            raise UserError(f"parameter {name!r} has no block index after 'blocks.'; "
                            "name ViT blocks 'blocks.{i}.*'")
        index = int(index_text)
        if index >= num_layers:
            raise UserError(f"parameter {name!r} is in block {index} but num_layers={num_layers}; "
                            "pass the model's real depth as num_layers")
        return index + 1
    return num_layers + 1


def swin_layer_id(name: str, depths: Sequence[int]) -> int:
    """Layer index of a timm Swin / SwinV2 parameter for layer-wise lr decay, in ``0 .. sum(depths) + 1``
    (published ``optimizer.py``, ``get_swin_layer``, written for timm's names):

    - ``patch_embed.*`` -> 0;
    - ``layers.{i}.blocks.{j}.*`` -> ``sum(depths[:i]) + j + 1`` (blocks numbered 1, 2, ... across stages);
    - ``layers.{i}.downsample.*`` -> ``sum(depths[:i])``, the layer of the last block of stage ``i - 1``: the
      published network merges patches at the END of stage ``i - 1`` (``layers.{i-1}.downsample``), timm at
      the start of stage ``i``;
    - everything else (the final ``norm``, ``head``, ``absolute_pos_embed``) -> ``sum(depths) + 1``, the top
      group (``lr_scale`` 1).

    ``lr_scale = layer_decay ** (sum(depths) + 1 - layer)`` (published ``scales[layer_id]``).
    """
    short = strip_prefixes(name)
    if short.startswith("patch_embed."):
        return 0
    parts = short.split(".")
    if parts[0] != "layers":
        return sum(depths) + 1
    if len(parts) < 4 or not parts[1].isdigit() or int(parts[1]) >= len(depths):
        raise UserError(f"parameter {name!r} is not in a Swin stage layers.{{i}} of depths {list(depths)}")
    stage = int(parts[1])
    if parts[2] == "downsample" and stage > 0:
        return sum(depths[:stage])
    if parts[2] == "blocks" and parts[3].isdigit() and int(parts[3]) < depths[stage]:
        return sum(depths[:stage]) + int(parts[3]) + 1
    raise UserError(f"parameter {name!r} is neither a block nor a patch merging of a Swin stage; the published "
                    f"layer rule (get_swin_layer) has no place for it")


def _infer_num_layers(model: nn.Module) -> int:
    """Depth of the ViT: one more than the largest ``blocks.{i}`` index among all parameter names."""
    indices = [int(parts[1]) for name, _ in model.named_parameters()
               if (parts := strip_prefixes(name).split(".", 2))[0] == "blocks" and len(parts) > 1
               and parts[1].isdigit()]
    if not indices:
        raise UserError("layer_decay needs num_layers but the model has no 'blocks.{i}' parameters; "
                        "pass num_layers explicitly or drop layer_decay")
    return max(indices) + 1


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float | None = None,
                 num_layers: int | None = None,
                 layer_of: Callable[[str], int] | None = None) -> list[dict[str, Any]]:
    """Split the trainable parameters of ``model`` into AdamW parameter groups.

    Frozen parameters (``requires_grad == False``) are left out. Each group is a dict with ``params``,
    ``param_names``, ``weight_decay`` (``weight_decay`` or ``0.0`` per :func:`no_weight_decay` and
    :func:`declared_no_weight_decay`), ``lr_scale`` and ``name`` (for logging). Empty groups are dropped.

    Without ``layer_decay``: groups ``"decay"`` and ``"no_decay"``, both with ``lr_scale = 1.0``.

    With ``layer_decay``: one group per (layer, decay) pair, named ``"layer{layer}_decay"`` /
    ``"layer{layer}_no_decay"``, with (BEiT Sec. 2.6, FD Sec. 4)

        lr_scale = layer_decay ** (num_layers + 1 - layer),    layer = layer_id(name, num_layers)

    ``num_layers`` defaults to the number of ``blocks.{i}`` in ``model``. ``layer_of`` (with ``num_layers``)
    replaces the ViT rule :func:`layer_id` by another family's, e.g. ``partial(swin_layer_id, depths=...)``.
    """
    if weight_decay < 0:
        raise UserError(f"weight_decay must be >= 0, got {weight_decay}; pass a non-negative value")
    if layer_decay is not None:
        if not 0.0 < layer_decay <= 1.0:
            raise UserError(f"layer_decay must be in (0, 1], got {layer_decay}; e.g. 0.65 for ViT-B")
        if num_layers is None:
            if layer_of is not None:
                raise UserError("param_groups: a layer rule (layer_of) needs its num_layers")
            num_layers = _infer_num_layers(model)
        if num_layers < 1:
            raise UserError(f"num_layers must be >= 1, got {num_layers}; pass the ViT depth")

    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    declared = declared_no_weight_decay(model)
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        skip_decay = no_weight_decay(name, param) or name in declared
        suffix = "no_decay" if skip_decay else "decay"
        if layer_decay is None:
            key, group_name, lr_scale = (0, skip_decay), suffix, 1.0
        else:
            assert num_layers is not None
            layer = layer_of(name) if layer_of is not None else layer_id(name, num_layers)
            key, group_name = (layer, skip_decay), f"layer{layer}_{suffix}"
            lr_scale = float(layer_decay ** (num_layers + 1 - layer))
        if key not in groups:
            groups[key] = {"name": group_name, "params": [], "param_names": [],
                           "weight_decay": 0.0 if skip_decay else float(weight_decay), "lr_scale": lr_scale}
        groups[key]["params"].append(param)
        groups[key]["param_names"].append(name)

    if not groups:
        raise UserError("the model has no trainable parameters; unfreeze something before building an optimizer")
    return [groups[key] for key in sorted(groups)]


def adamw(groups: list[dict], lr: float, weight_decay: float, betas: tuple[float, float], eps: float,
          fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW (Loshchilov & Hutter) over ``groups``, each starting at ``lr * lr_scale`` (``lr_scale`` 1 where a
    group has none; read later by :class:`fd_ref.optim.schedule.WarmupCosine`, which drives the lr).

    ``fused=None`` picks the fused kernel when every parameter is floating point on CUDA or the CPU (on the
    CPU it also avoids the parameter-sized temporaries of the multi-tensor ``foreach`` implementation, see
    bench/README.md) and ``foreach`` otherwise."""
    if lr <= 0:
        raise UserError(f"lr must be > 0, got {lr}; pass a positive learning rate")
    for group in groups:
        group.setdefault("lr_scale", 1.0)
        group["lr"] = lr * group["lr_scale"]
    if fused is None:
        fused = all(p.is_floating_point() and p.device.type in ("cuda", "cpu") for g in groups for p in g["params"])
    kernel = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **kernel)


def build_optimizer(model: nn.Module, lr: float, weight_decay: float,
                    betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                    layer_decay: float | None = None, num_layers: int | None = None,
                    fused: bool | None = None) -> torch.optim.AdamW:
    """:func:`adamw` over :func:`param_groups` (fd_ref's ViT and any module named like it)."""
    groups = param_groups(model, weight_decay, layer_decay=layer_decay, num_layers=num_layers)
    return adamw(groups, lr, weight_decay, betas, eps, fused)


def build_timm_optimizer(model: nn.Module, lr: float, weight_decay: float,
                         layer_decay: Optional[float] = None,
                         betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> torch.optim.AdamW:
    """:func:`adamw` over the parameter groups of the model's family (fine-tuning, Sec. 4):

    - weight decay: none for 1-D parameters, for names ending in ``.bias`` and for the parameters the model
      exempts (:func:`declared_no_weight_decay`: its ``no_weight_decay()`` resolved to
      parameters; in a Swin / SwinV2 the published keywords, whatever timm lists);
    - layer-wise lr decay (``layer_decay``), ``lr_scale = layer_decay ** (L - layer)``, L the top layer
      (``lr_scale`` 1): a Swin / SwinV2 by the published rule (:func:`swin_layer_id`: blocks
      numbered across stages, each patch merging with the last block of the stage before it, the final
      norm and the head on top); any other family by timm's ``param_groups_layer_decay`` with the model's
      ``group_matcher`` (stem = layer 0, then each block / stage in order, head last)."""
    from functools import partial

    from timm.optim import param_groups_layer_decay, param_groups_weight_decay

    net = model.model
    if layer_decay is not None and not 0.0 < layer_decay <= 1.0:
        raise UserError(f"layer_decay must be in (0, 1], got {layer_decay}; e.g. 0.8 for Swin-B")
    if is_timm_swin(net):
        depths = [len(stage.blocks) for stage in net.layers]
        groups = param_groups(net, weight_decay, layer_decay=layer_decay, num_layers=sum(depths),
                              layer_of=partial(swin_layer_id, depths=depths))
    else:
        skip = declared_no_weight_decay(net)
        if layer_decay is not None:
            groups = param_groups_layer_decay(net, weight_decay, no_weight_decay_list=skip, layer_decay=layer_decay)
        else:
            groups = param_groups_weight_decay(net, weight_decay, no_weight_decay_list=skip)
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise UserError("the model has no trainable parameters; unfreeze something before building an optimizer")
    return adamw(groups, lr, weight_decay, betas, eps)
