"""Which kernel computes the ViT's attention with its relative position bias, and the FlexAttention call.

Three kernels compute the same ``softmax_j(q[h, i] . k[h, j] * scale + table[index[i, j], h]) v[h, j]``:

- ``explicit``: the formula written out (logits, softmax, product); the only one that returns the maps;
- ``sdpa``: ``scaled_dot_product_attention`` with the bias gathered into a dense ``[heads, N, N]`` additive
  mask; an additive mask rules out the flash kernels, so on a GPU it runs the memory-efficient one;
- ``flex``: ``torch.nn.attention.flex_attention`` with a ``score_mod`` that adds ``table[index[q, k], h]``
  (:func:`fd_ref.method.position.bias_score_mod`) inside a flash-style kernel: the dense bias is never
  built, and the gradient reaches the table through the kernel's backward.

``auto`` (the default) picks ``flex`` where it can train and is expected to be faster: a CUDA device, a torch
with FlexAttention and Triton, and a head width FlexAttention's kernels tile (a power of two from 16 to
256); everywhere else ``sdpa``, with the CPU rules of :class:`fd_ref.models.vit.Attention` (the explicit
formula for CPU training with a trainable bias and for bf16 on the CPU). FlexAttention has no CPU backward,
so ``flex`` on the CPU serves inference (no gradient) only, and asking for it while training there is an
error.

FlexAttention runs as generated code only when compiled; uncompiled it falls back to a slow reference.
:func:`flex_attention` therefore compiles it once (``dynamic=False``: one kernel per shape, which torch's
compile cache keeps, so every block and every later call of that shape reuses it) and, inside a model
already under ``torch.compile``, calls the plain function, which the outer compilation traces.
"""
from __future__ import annotations

import functools
from typing import Callable, Literal

import torch

from fd_ref.errors import UserError

Kernel = Literal["auto", "flex", "sdpa", "explicit"]
KERNELS: tuple[str, ...] = ("auto", "flex", "sdpa", "explicit")
FLEX_HEAD_DIMS = (16, 32, 64, 128, 256)


def check_kernel(name: str) -> str:
    if name not in KERNELS:
        raise UserError(f"attention kernel must be one of {', '.join(KERNELS)}, got {name!r}")
    return name


@functools.cache
def flex_available() -> bool:
    """torch has FlexAttention and Triton to compile it for a GPU."""
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
        from torch.utils._triton import has_triton
    except ImportError:
        return False
    return bool(has_triton())


def resolve_kernel(kernel: str, device: torch.device, head_dim: int, needs_grad: bool) -> str:
    """The kernel a forward pass runs: ``flex``, ``sdpa`` (subject to the CPU rules) or ``explicit``.

    ``needs_grad``: the pass will be differentiated (training with autograd on)."""
    if kernel == "auto":
        if device.type == "cuda" and head_dim in FLEX_HEAD_DIMS and flex_available():
            return "flex"
        return "sdpa"
    if kernel == "flex" and device.type != "cuda" and needs_grad:
        raise UserError("attention kernel flex has no backward on the CPU (FlexAttention is inference-only "
                        "there); train with --attention auto, sdpa or explicit")
    return check_kernel(kernel)


@functools.cache
def _compiled_flex() -> Callable:
    from torch.nn.attention.flex_attention import flex_attention as flex
    return torch.compile(flex, dynamic=False)


def flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, score_mod: Callable,
                   scale: float) -> torch.Tensor:
    """FlexAttention of ``q, k, v`` [B, heads, N, head_dim] with ``score_mod``, compiled once per shape."""
    from torch.nn.attention.flex_attention import flex_attention as flex
    run = flex if torch.compiler.is_compiling() else _compiled_flex()
    return run(q, k, v, score_mod=score_mod, scale=scale)
