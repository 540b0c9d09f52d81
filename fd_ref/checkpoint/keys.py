"""Key conversions between checkpoint layouts (pure dict operations on state dicts).

- ``expand_shared_rpb``: FD's shared relative position bias (one table for the whole student, paper
  Sec. 3.1) is copied into every block before fine-tuning, where each block then learns its own.
- ``to_timm_beit`` / ``from_timm_beit``: an fd_ref ViT state dict to and from timm's ``Beit`` keys, so a
  distilled student drops into any timm pipeline; ``from_timm_vit``: timm ViT (DeiT, DINO, CLIP) keys.
- ``to_fd_ref_keys``: any of these layouts to fd_ref's; ``infer_vit_options``: the structure a file without
  a recorded architecture implies.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import torch

def expand_shared_rpb(state_dict: Mapping[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """Replace the shared ``rel_pos_bias.table`` by a copy in every block,
    ``blocks.{i}.attn.rel_pos_bias.table = rel_pos_bias.table`` for i < depth (fine-tuning, Sec. 3.1)."""
    out = dict(state_dict)
    table = out.pop("rel_pos_bias.table", None)
    if table is None:
        return out
    for i in range(depth):
        out[f"blocks.{i}.attn.rel_pos_bias.table"] = table.clone()
    return out


_TO_BEIT = [
    (r"rel_pos_bias\.table", "rel_pos_bias.relative_position_bias_table"),
    (r"blocks\.(\d+)\.attn\.rel_pos_bias\.table", r"blocks.\1.attn.relative_position_bias_table"),
    (r"blocks\.(\d+)\.ls1\.gamma", r"blocks.\1.gamma_1"),
    (r"blocks\.(\d+)\.ls2\.gamma", r"blocks.\1.gamma_2"),
]


def _rename(state_dict: Mapping[str, torch.Tensor], rules: list[tuple[str, str]],
            drop: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Apply the first matching (regex, replacement) rule to each key; drop keys ending in ``drop``."""
    out = {}
    for key, value in state_dict.items():
        if drop and key.endswith(drop):
            continue
        for pattern, repl in rules:
            if re.fullmatch(pattern, key):
                key = re.sub(pattern, repl, key)
                break
        out[key] = value
    return out


def to_timm_beit(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fd_ref ViT keys -> timm ``Beit`` keys (the rest already agree)."""
    return _rename(state_dict, _TO_BEIT)


def from_timm_beit(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm ``Beit`` keys (also the BEiT / FD official release) -> fd_ref ViT keys."""
    back = [
        (r"rel_pos_bias\.relative_position_bias_table", "rel_pos_bias.table"),
        (r"blocks\.(\d+)\.attn\.relative_position_bias_table", r"blocks.\1.attn.rel_pos_bias.table"),
        (r"blocks\.(\d+)\.gamma_1", r"blocks.\1.ls1.gamma"),
        (r"blocks\.(\d+)\.gamma_2", r"blocks.\1.ls2.gamma"),
    ]
    return _rename(state_dict, back, drop=("relative_position_index", "k_bias"))  # derived buffers


def from_timm_vit(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm ``VisionTransformer`` keys (DeiT, DINO, ...) -> fd_ref ViT keys.

    timm's ViT has one bias for q, k and v; fd_ref keeps q and v biases only. Dropping the k bias is
    exact: it adds q_i . b_k to every logit of query i, a constant that the softmax over j cancels.
    """
    out = {}
    for key, value in state_dict.items():
        m = re.fullmatch(r"blocks\.(\d+)\.attn\.qkv\.bias", key)
        if m:
            q, _k, v = value.chunk(3)
            out[f"blocks.{m.group(1)}.attn.q_bias"] = q
            out[f"blocks.{m.group(1)}.attn.v_bias"] = v
        else:
            out[key] = value
    return out


def to_fd_ref_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Any supported layout (fd_ref, timm Beit / BEiT release, timm ViT) -> fd_ref ViT keys."""
    keys = set(state_dict)
    if any(k.endswith(("gamma_1", "relative_position_bias_table")) for k in keys):
        return from_timm_beit(state_dict)
    if any(k.endswith("attn.qkv.bias") for k in keys):
        return from_timm_vit(state_dict)
    return dict(state_dict)


def infer_vit_options(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The structural ``VisionTransformer`` options of a checkpoint that records no architecture (a timm
    DeiT / DINO / CLIP ViT, a BEiT release), read from its keys (any layout ``to_fd_ref_keys`` accepts):

    - ``layer_scale_init``: None without gammas (DeiT, DINO, CLIP have no layer scale); with them 1.0, a
      placeholder that the checkpoint's gammas overwrite;
    - ``qkv_bias``: a q/v (or qkv) bias is present;
    - ``patch_bias``: the patch embedding has a bias (CLIP's has none);
    - ``pre_norm``: a ``norm_pre`` LayerNorm before the first block is present. In a ViT checkpoint this
      marks an OpenAI CLIP image tower (timm's ``*_clip_*.openai``; DeiT and DINO have none), and a
      checkpoint holds no record of its activation, so the rule is: ``norm_pre`` present -> CLIP ->
      ``act_layer="quick_gelu"`` (x * sigmoid(1.702 x), the activation OpenAI CLIP was trained with) and
      ``ln_eps=1e-5`` (torch's default, CLIP's); otherwise ``"gelu"`` and 1e-6. (A CLIP-shaped model
      trained with exact GELU, e.g. some OpenCLIP releases, would need its model_config recorded.)
    """
    keys = set(to_fd_ref_keys(state_dict))
    clip = "norm_pre.weight" in keys
    return dict(
        layer_scale_init=1.0 if any(k.endswith(("ls1.gamma", "ls2.gamma")) for k in keys) else None,
        qkv_bias=any(k.endswith(("attn.q_bias", "attn.v_bias")) for k in keys),
        patch_bias="patch_embed.proj.bias" in keys,
        pre_norm=clip,
        act_layer="quick_gelu" if clip else "gelu",
        ln_eps=1e-5 if clip else 1e-6,
    )
