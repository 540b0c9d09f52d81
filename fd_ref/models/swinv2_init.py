"""A timm SwinV2 student initialised as the published FD code initialises its SwinV2 student (``SwinV2ForFD``).

The paper's Swin row distils into SwinV2-B (Sec. 4, Table 1 "FD-EsViT"); where the paper is silent the published
``models/swin_transformer_v2.py`` (``SwinTransformerV2.__init__`` with the defaults ``build_fd`` leaves:
``init_std=0.02``, ``fix_init=True``, ``init_values=1e-5``) is the reference. timm's ``SwinTransformerV2``
computes the same network (tests/test_swinv2_parity.py) and draws the same Linear weights, the same logit scales
and q / v biases, but differs in three places, which :func:`init_like_published` sets as published:

    patch embedding Conv2d   weight ~ N(0, init_std) (cut at +-2), bias 0       timm: PyTorch's default
    block b (b = 1 .. sum(depths), over all stages)
        attn.proj.weight, mlp.fc2.weight  ~ N(0, init_std) / sqrt(2 b)          timm: N(0, 0.02), not rescaled
        norm1.weight = norm2.weight = init_values (the residual post-norms)     timm: 0

A fine-tuning head (the published ``build_swin_v2`` builds the classifier with the network, so
``_init_weights`` draws it like every Linear): weight ~ N(0, init_std) cut at +-2, bias 0
(:func:`init_head_like_published`; timm's ``reset_classifier`` leaves PyTorch's default, uniform weight and bias).

The post-norms see ``attn.proj`` / ``mlp.fc2`` outputs, so the 1 / sqrt(2 b) rescale leaves the first forward
as it is but not training: the weights' scale sets how far an AdamW step moves them.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

INIT_STD = 0.02       # published init_std
POST_NORM_INIT = 1e-5  # published init_values: the weights of every block's norm1 / norm2


def is_swinv2(net: nn.Module) -> bool:
    from timm.models.swin_transformer_v2 import SwinTransformerV2

    return isinstance(net, SwinTransformerV2)


@torch.no_grad()
def init_like_published(net: nn.Module, init_std: float = INIT_STD, post_norm_init: float = POST_NORM_INIT) -> None:
    """Re-initialise the three places of the module docstring in a timm ``SwinTransformerV2`` (in place; each
    weight it touches is drawn afresh, so the result does not depend on what the weights held before)."""
    conv = net.patch_embed.proj
    nn.init.trunc_normal_(conv.weight, std=init_std, a=-2.0, b=2.0)
    if conv.bias is not None:
        conv.bias.zero_()
    blocks = [block for stage in net.layers for block in stage.blocks]
    for b, block in enumerate(blocks, start=1):
        for linear in (block.attn.proj, block.mlp.fc2):
            nn.init.trunc_normal_(linear.weight, std=init_std, a=-2.0, b=2.0)
            linear.weight.div_(math.sqrt(2.0 * b))
            linear.bias.zero_()
        for norm in (block.norm1, block.norm2):
            norm.weight.fill_(post_norm_init)
            norm.bias.zero_()


@torch.no_grad()
def init_head_like_published(net: nn.Module, init_std: float = INIT_STD) -> None:
    """The classifier of a timm ``SwinTransformerV2`` as the published fine-tuning network draws its head:
    weight ~ N(0, init_std) cut at +-2, bias 0 (module docstring)."""
    head = net.get_classifier()
    if isinstance(head, nn.Linear):
        nn.init.trunc_normal_(head.weight, std=init_std, a=-2.0, b=2.0)
        if head.bias is not None:
            head.bias.zero_()
