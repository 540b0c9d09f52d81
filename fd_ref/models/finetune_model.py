"""The network finetune.py trains (paper Sec. 4): fine-tuning or linear probing a pretrained file, or a
model from scratch, and the summary line of what was loaded.

A file that records its ``model_config`` (fd-ref's student.pt / best.pt / checkpoint.pt) is read by the
one rule of :mod:`fd_ref.models.from_file`, then turned into the fine-tuning network: the shared relative
position table copied into every block, tables and absolute embeddings resized to the fine-tuning grid, a
fresh head (``fc_norm`` + linear over the mean token) or the linear probe. A file that records none (a timm
DeiT / DINO / OpenAI CLIP ViT, a BEiT release: the paper's baselines; or a SwinV2 saved by the published FD
code) takes its structure from its keys and the ``--model`` flags.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from fd_ref.checkpoint.io import load_file, load_weights, model_state
from fd_ref.checkpoint.keys import expand_shared_rpb, infer_vit_options, to_fd_ref_keys
from fd_ref.errors import UserError
from fd_ref.method.position import resize_relative_position_bias_table
from fd_ref.models.from_file import ModelFile, read_model_file, vit_arguments
from fd_ref.models.probe import LinearProbe
from fd_ref.models.swinv2_init import is_swinv2
from fd_ref.models.swinv2_keys import load_published_swinv2
from fd_ref.models.timm_backbone import TimmBackbone, backbone_state, is_timm_name, load_backbone, parse_kwargs
from fd_ref.models.vit import VisionTransformer, preset_arguments


def adapt_state(state: dict, model: VisionTransformer, source_config: dict | None) -> dict:
    """Turn a pretrained state into one for ``model``: fd_ref keys, the shared RPB copied into every
    block, relative position tables and absolute position embeddings resized to the model's grid."""
    state = to_fd_ref_keys(state)
    if "rel_pos_bias.table" in state and model.pos_embed_type == "rpb":
        state = expand_shared_rpb(state, model.depth)
    old = (tuple([source_config["img_size"] // source_config["patch_size"]] * 2)
           if source_config and {"img_size", "patch_size"} <= set(source_config) else None)
    for key, value in list(state.items()):
        if key.endswith("rel_pos_bias.table"):
            h = w = None
            if old is None:  # infer the grid from the table's length: (2H-1)^2 + 3 rows
                side = int(round((value.shape[0] - 3) ** 0.5))
                h = w = (side + 1) // 2
            grid = old or (h, w)
            if tuple(grid) != tuple(model.grid):
                state[key] = resize_relative_position_bias_table(value, grid, model.grid)
        elif key == "pos_embed" and model.pos_embed is not None and value.shape != model.pos_embed.shape:
            cls, patches = value[:, :1], value[:, 1:]
            side = int(round(patches.shape[1] ** 0.5))
            img = patches.reshape(1, side, side, -1).permute(0, 3, 1, 2)
            img = F.interpolate(img, size=model.grid, mode="bicubic", align_corners=False)
            state[key] = torch.cat([cls, img.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)
    return state


# what fine-tuning sets itself, whatever the distilled model recorded: resolution, drop path, position
# embedding, head and pooling
RUN_ARGUMENTS = ("img_size", "drop_path_rate", "pos_embed", "num_classes", "global_pool")


def shape_flags(cfg: dict) -> dict:
    """The ViT shape flags (``--patch-size``, ``--depth``, ``--embed-dim``, ``--num-heads``) as preset overrides."""
    return {k: cfg[k] for k in ("patch_size", "depth", "embed_dim", "num_heads")}


def build_finetune_model(cfg: dict) -> tuple[nn.Module, str]:
    """The network to fine-tune and a one-paragraph summary of what was loaded.

    A checkpoint that records its ``model_config`` (fd_ref's student.pt / best.pt) is rebuilt from it. One
    that does not (timm DeiT / DINO / OpenAI CLIP ViTs, BEiT releases: the paper's baselines) takes its
    widths from ``--model`` and the shape flags and its structure from its own keys
    (``fd_ref.checkpoint.keys.infer_vit_options``): no gammas -> no layer scale; ``pos_embed`` -> absolute
    position embedding; ``norm_pre`` -> an OpenAI CLIP tower (pre-norm, QuickGELU, LayerNorm eps 1e-5,
    no patch-embedding bias); its k bias is dropped, exactly (it cancels in the softmax). So the loaded
    network is the published one. A tensor the model has no place for is refused, with one line. With
    ``--model timm:<name>`` such a file is a SwinV2 saved by the published FD code (:func:`build_published_swinv2`).
    """
    probe = cfg["linear_probe"]
    if cfg["from_scratch"] or not cfg["pretrained"]:
        if probe:
            raise UserError("--linear-probe needs --pretrained weights (a frozen random backbone is no probe)")
        if is_timm_name(cfg["model"]):
            model = TimmBackbone(cfg["model"], cfg["img_size"], parse_kwargs(cfg["model_kwargs"]),
                                 drop_path_rate=cfg["drop_path"])
            model.reset_classifier(cfg["num_classes"])
            return model, f"random initialisation of {cfg['model']} (from scratch), timm's classifier head"
        model = VisionTransformer(**preset_arguments(cfg["model"], **shape_flags(cfg)),
                                  img_size=cfg["img_size"], pos_embed=cfg["pos_embed"],
                                  drop_path_rate=cfg["drop_path"], layer_scale_init=cfg["layer_scale"],
                                  num_classes=cfg["num_classes"], global_pool="avg")
        return model, "random initialisation (from scratch)"
    path = cfg["pretrained"]
    if not Path(path).exists():
        raise UserError(f"pretrained weights {path} not found; run `python train.py` first, pass "
                        f"--pretrained PATH, or --from-scratch")
    blob = load_file(path)
    source = blob.get("model_config") if isinstance(blob, Mapping) else None
    if source:  # an fd-ref model file: checked by the one rule (fd_ref.models.from_file)
        mf = read_model_file(path, blob)
        if mf.linear_probe:
            raise UserError(f"{path} is a linear probe; fine-tune the checkpoint it was probed from")
        if mf.is_timm:
            return _timm_file_model(cfg, mf)
    elif is_timm_name(cfg["model"]):
        return build_published_swinv2(cfg, blob, path)
    if source:  # an older model_config may lack some keys: those take the constructor's defaults
        arch = {k: v for k, v in vit_arguments(source).items() if k not in RUN_ARGUMENTS}
        pos = source.get("pos_embed", "shared_rpb")
    else:
        arch = {**preset_arguments(cfg["model"], **shape_flags(cfg)), **infer_vit_options(model_state(blob))}
        state_keys = set(model_state(blob))
        pos = "abs" if "pos_embed" in state_keys else "shared_rpb" if any(
            k.endswith("rel_pos_bias.relative_position_bias_table") or k == "rel_pos_bias.table"
            for k in state_keys) else "rpb"
    if probe:
        model = VisionTransformer(**arch, img_size=cfg["img_size"], pos_embed=pos, num_classes=0,
                                  global_pool="cls")
    else:
        model = VisionTransformer(**arch, img_size=cfg["img_size"], drop_path_rate=cfg["drop_path"],
                                  pos_embed="rpb" if pos == "shared_rpb" else pos,
                                  num_classes=cfg["num_classes"], global_pool="avg")
    # a pretrained head of another task and the FD projection are never loaded; mean pooling drops `norm`
    ignore = (r"head\..*", r"projection\..*", r"fc_norm\..*") + (() if probe else (r"norm\..*",))
    own = set(model.state_dict()) | {"rel_pos_bias.table"}  # a shared table is placed in every block
    unplaced = [k for k in to_fd_ref_keys(model_state(blob))
                if k not in own and not any(re.fullmatch(p, k) for p in ignore)]
    if unplaced:
        swinv2 = any(".rpe_mlp." in k for k in unplaced)  # the published FD code's SwinV2
        raise UserError(f"pretrained weights {path} hold tensors fd_ref's ViT has no place for "
                        f"({', '.join(unplaced[:4])}{', ...' if len(unplaced) > 4 else ''}); "
                        + ("it is a SwinV2 of the published FD code: pass --model timm:swinv2_base_window8_256 "
                           "--model-kwargs '{window_size: 14}' (SwinV2-B) or the shape it was distilled with"
                           if swinv2 else "a ViT with other structure is not supported"))
    state = adapt_state(model_state(blob), model, source)
    summary = load_weights(model, state, what=f"model from {path}", ignore=ignore)
    if probe:
        model = LinearProbe(model, cfg["num_classes"], pool=cfg["probe_pool"])
    return model, summary


def _timm_file_model(cfg: dict, mf: ModelFile) -> tuple[nn.Module, str]:
    """A timm backbone's file (fd_ref.models.timm_backbone), rebuilt from its recorded timm name and arguments:
    fine-tuning gets timm's own classifier head (``reset_classifier``) and ``--drop-path``; the linear
    probe freezes it (features: the mean of its last map's tokens + a LayerNorm without affine, or the class
    token of a timm ViT). A classifier head in the file (a fine-tuned model) is not carried over."""
    source, path = mf.config, mf.path
    if int(source.get("img_size", cfg["img_size"])) != cfg["img_size"]:
        raise UserError(f"{path} was trained at {source.get('img_size')} px but --img-size is {cfg['img_size']}; "
                        f"pass --img-size {source.get('img_size')}")
    state = {"model." + k: v for k, v in backbone_state(source, mf.state).items()}  # head, projection out
    backbone = load_backbone(source, state, path, num_classes=0,
                             drop_path_rate=0.0 if cfg["linear_probe"] else cfg["drop_path"])
    summary = f"loaded timm:{source['timm']} ({len(state)} tensors) from {path}"
    return head_or_probe(backbone, cfg, summary, "timm's classifier head")


def head_or_probe(backbone: TimmBackbone, cfg: dict, summary: str, head: str) -> tuple[nn.Module, str]:
    """A loaded timm backbone as what finetune.py trains: the linear probe on it (frozen; ``--probe-pool
    cls`` only with a class token), or the backbone with its classifier head for ``--num-classes``
    (``reset_classifier``); ``head`` names that head in the returned summary line."""
    if cfg["linear_probe"]:
        if cfg["probe_pool"] == "cls" and backbone.num_prefix_tokens == 0:
            raise UserError(f"--probe-pool cls needs a class token; timm:{backbone.timm_name} has none: use "
                            f"--probe-pool avg")
        return LinearProbe(backbone, cfg["num_classes"], pool=cfg["probe_pool"]), summary
    backbone.reset_classifier(cfg["num_classes"])
    return backbone, summary + f", {head} for {cfg['num_classes']} classes"


def build_published_swinv2(cfg: dict, blob, path: str) -> tuple[nn.Module, str]:
    """A SwinV2 saved by the published FD code (its ``main_fd.py`` checkpoint, or the encoder's state dict),
    which records no architecture: the timm SwinV2 ``--model`` / ``--model-kwargs`` / ``--img-size`` name (the
    published SwinV2-B: ``timm:swinv2_base_window8_256`` with ``{window_size: 14}`` at 224 px), loaded as the
    published fine-tuning loads it (:mod:`fd_ref.models.swinv2_keys`: the encoder only, the projection, the teacher
    and any head dropped, every backbone tensor required), then a fresh head drawn as published (or the
    linear probe), as for fd-ref's own timm students (:func:`_timm_file_model`)."""
    backbone = TimmBackbone(cfg["model"], cfg["img_size"], parse_kwargs(cfg["model_kwargs"]),
                            drop_path_rate=0.0 if cfg["linear_probe"] else cfg["drop_path"])
    if not is_swinv2(backbone.model):
        raise UserError(f"{path} records no architecture; with --model {cfg['model']} (not a SwinV2) there is "
                        f"no published layout to read it in: a timm model loads an fd-ref student.pt, or a "
                        f"SwinV2 saved by the published FD code with --model timm:swinv2_*; leave --model out to "
                        f"read a ViT file (timm, DeiT, DINO, CLIP, BEiT) into fd-ref's ViT")
    return head_or_probe(backbone, cfg, load_published_swinv2(backbone, blob, path), "a fresh head")
