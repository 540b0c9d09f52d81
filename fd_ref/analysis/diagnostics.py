"""Diagnostics of Section 4 ("analysis") of Wei et al., arXiv 2205.14141.

The paper explains why feature distillation (FD) helps fine-tuning with four diagnostics, all here:

* average attention distance per head (Sec. 4, as defined for ViT by Dosovitskiy et al. 2021),
* head diversity: cosine similarity between the heads of one layer (Sec. 4),
* average attention maps (Sec. 4),
* 1-D / 2-D loss landscapes along filter-normalised random directions (Sec. 4; Li et al. 2018,
  "Visualizing the Loss Landscape of Neural Nets").

Shapes: ``B`` images, ``heads`` attention heads, ``N`` tokens, ``H x W`` patch grid, ``M = H * W``
patch tokens. Attention tensors are softmax probabilities ``[B, heads, N, N]`` (query, key), with any
prefix tokens (the class token) first.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

PatchSize = int | tuple[int, int]
Batch = Any
LossFn = Callable[[nn.Module, Batch], Tensor | float]


# ----------------------------------------------------------------------------------------------------------
# Attention geometry
# ----------------------------------------------------------------------------------------------------------
def _pair(patch_size: PatchSize) -> tuple[int, int]:
    """Return ``(p_h, p_w)`` from an int or a pair."""
    if isinstance(patch_size, int):
        return patch_size, patch_size
    p_h, p_w = patch_size
    return int(p_h), int(p_w)


def patch_coordinates(grid: tuple[int, int], patch_size: PatchSize) -> Tensor:
    """Pixel coordinates of the patch centres, row-major, as a float32 ``[H*W, 2]`` tensor ``(row, col)``.

    For patch ``i = r * W + c``: ``p_i = ((r + 1/2) * p_h, (c + 1/2) * p_w)``. Only differences
    ``p_i - p_j`` enter the attention distance (Wei et al. Sec. 4), so the centre offset is cosmetic.
    """
    height, width = grid
    p_h, p_w = _pair(patch_size)
    rows = (torch.arange(height, dtype=torch.float32) + 0.5) * p_h
    cols = (torch.arange(width, dtype=torch.float32) + 0.5) * p_w
    rr, cc = torch.meshgrid(rows, cols, indexing="ij")
    return torch.stack([rr.reshape(-1), cc.reshape(-1)], dim=1)


def _patch_block(attn: Tensor, grid: tuple[int, int]) -> Tensor:
    """Return the patch-query / patch-key block ``attn[..., P:, P:]`` with ``P = N - H*W`` prefix tokens."""
    if attn.ndim != 4 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"expected attention of shape [B, heads, N, N], got {tuple(attn.shape)}")
    num_patches = grid[0] * grid[1]
    num_prefix = attn.shape[-1] - num_patches
    if num_prefix < 0:
        raise ValueError(f"attention has N={attn.shape[-1]} tokens, fewer than the {num_patches} patches "
                         f"of grid {tuple(grid)}")
    return attn[..., num_prefix:, num_prefix:]


def attention_distance(attn: Tensor, grid: tuple[int, int], patch_size: PatchSize) -> Tensor:
    """Average attention distance per head, in pixels (Wei et al. Sec. 4; Dosovitskiy et al. 2021).

    ``attn`` is ``[B, heads, N, N]``; ``N = H*W`` (no class token) or ``N = H*W + P`` with ``P`` prefix
    tokens first (``P = 1``: the class token), detected from ``N``. Prefix tokens have no position, so
    only patch-query / patch-key entries are used, and each query's patch-key weights are renormalised
    to sum to 1 (the distance is then that of the attention *among patches*, independent of how much
    mass went to the class token):

        a_bhij = attn_bhij / sum_j' attn_bhij'          (i, j, j' patches)
        distance_h = mean_{b, i} sum_j a_bhij * ||p_i - p_j||_2

    with ``p`` from :func:`patch_coordinates`. A query that gives all its mass to prefix tokens has no
    patch weights left and contributes distance 0.
    """
    patches = _patch_block(attn, grid)
    coords = patch_coordinates(grid, patch_size).to(device=attn.device, dtype=attn.dtype)
    dist = torch.cdist(coords, coords)  # [M, M], ||p_i - p_j||_2
    mass = patches.sum(dim=-1, keepdim=True)
    a = patches / mass.clamp_min(torch.finfo(attn.dtype).tiny)
    per_query = torch.einsum("bhij,ij->bhi", a, dist)
    return per_query.mean(dim=(0, 2))


# ----------------------------------------------------------------------------------------------------------
# Head diversity and average maps
# ----------------------------------------------------------------------------------------------------------
def head_cosine_matrix(x: Tensor) -> Tensor:
    """Head-by-head cosine similarity ``S [heads, heads]`` averaged over images (Wei et al. Sec. 4).

    ``x`` is ``[B, heads, ...]``; each head's per-image tensor is flattened to a vector ``x_bh``:

        S_hh' = mean_b cos(x_bh, x_bh') = mean_b <x_bh, x_bh'> / (||x_bh|| ||x_bh'||)

    A zero vector has cosine 0 with everything.
    """
    if x.ndim < 3:
        raise ValueError(f"expected [B, heads, ...], got shape {tuple(x.shape)}")
    flat = x.reshape(x.shape[0], x.shape[1], -1).float()
    unit = torch.nn.functional.normalize(flat, dim=-1)
    return torch.einsum("bhf,bgf->bhg", unit, unit).mean(dim=0)


def head_cosine_similarity(x: Tensor) -> Tensor:
    """Mean cosine similarity between distinct heads of one layer (Wei et al. Sec. 4, head diversity).

    ``x`` is ``[B, heads, ...]``: the caller chooses what is compared, e.g. the attention maps
    ``[B, heads, N, N]`` or the per-head outputs ``[B, heads, N, d]``. With ``S`` from
    :func:`head_cosine_matrix` (per-image cosine of flattened head tensors, averaged over images):

        similarity = sum_{h != h'} S_hh' / (heads * (heads - 1))

    Lower values mean more diverse heads. Returns a 0-dim float tensor in [-1, 1].
    """
    heads = x.shape[1] if x.ndim >= 2 else 0
    if heads < 2:
        raise ValueError(f"need at least 2 heads to compare, got shape {tuple(x.shape)}")
    sim = head_cosine_matrix(x)
    off_diagonal = sim.sum() - sim.diagonal().sum()
    return off_diagonal / (heads * (heads - 1))


def average_attention_map(attn: Tensor) -> Tensor:
    """Average attention map ``[N, N]`` over images and heads (Wei et al. Sec. 4).

        avg_ij = mean_{b, h} attn_bhij

    Rows still sum to 1 when the input rows do (a mean of distributions is a distribution).
    """
    if attn.ndim != 4:
        raise ValueError(f"expected attention of shape [B, heads, N, N], got {tuple(attn.shape)}")
    return attn.mean(dim=(0, 1))


# ----------------------------------------------------------------------------------------------------------
# Collecting attention maps from a model
# ----------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode; restore each module's own ``training`` flag on exit."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def attention_geometry(model: nn.Module) -> tuple[tuple[int, int], PatchSize]:
    """Return ``(grid, patch_size)`` of an fd_ref ViT (``grid``, ``patch_size``) or a timm ViT (``patch_embed``)."""
    if hasattr(model, "grid") and hasattr(model, "patch_size"):
        return tuple(model.grid), model.patch_size  # type: ignore[return-value]
    embed = getattr(model, "patch_embed", None)
    if embed is not None and hasattr(embed, "grid_size"):
        return tuple(embed.grid_size), _pair(embed.patch_size)  # type: ignore[return-value]
    raise TypeError(f"{type(model).__name__} has neither grid/patch_size nor patch_embed.grid_size")


def _timm_attention(module: nn.Module, x: Tensor) -> Tensor:
    """Recompute the softmax attention of a timm ``Attention`` block from its input ``x [B, N, C]``.

        q, k = split(qkv(x)); attn = softmax(q_norm(q) * scale @ k_norm(k)^T)
    """
    batch, tokens, _ = x.shape
    qkv = module.qkv(x).reshape(batch, tokens, 3, module.num_heads, module.head_dim).permute(2, 0, 3, 1, 4)
    q, k = module.q_norm(qkv[0]), module.k_norm(qkv[1])
    return ((q * module.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


def collect_attention(model: nn.Module, images: Tensor) -> list[Tensor]:
    """Attention maps of every block, one ``[B, heads, N, N]`` softmax tensor each (Wei et al. Sec. 4).

    fd_ref ViTs provide ``model.attention_maps(images)``. For timm ViTs (``model.blocks[i].attn`` with
    ``qkv``, ``num_heads``, ``head_dim``, ``scale``, ``q_norm``, ``k_norm``), forward pre-hooks capture
    each block's attention input and recompute ``softmax(q k^T * scale)``. Runs in eval mode (no dropout)
    under ``torch.no_grad``; the model's train/eval flags are restored afterwards.
    """
    with torch.no_grad(), _eval_mode(model):
        if hasattr(model, "attention_maps"):
            return list(model.attention_maps(images))
        blocks = getattr(model, "blocks", None)
        needed = ("qkv", "num_heads", "head_dim", "scale", "q_norm", "k_norm")
        if blocks is None or not all(hasattr(getattr(b, "attn", None), n) for b in blocks for n in needed):
            raise TypeError(f"{type(model).__name__} has no attention_maps() and no timm-style "
                            f"blocks[i].attn with {', '.join(needed)}; cannot collect attention")
        maps: list[Tensor] = []

        def hook(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            maps.append(_timm_attention(module, args[0]))

        handles = [block.attn.register_forward_pre_hook(hook) for block in blocks]
        try:
            model(images)
        finally:
            for handle in handles:
                handle.remove()
        return maps


# ----------------------------------------------------------------------------------------------------------
# Loss landscape (Li et al. 2018)
# ----------------------------------------------------------------------------------------------------------
def filter_normalized_direction(model: nn.Module, generator: torch.Generator) -> dict[str, Tensor]:
    """A random filter-normalised direction ``d`` in parameter space (Li et al. 2018, Sec. 4; Wei et al. Sec. 4).

    For every parameter ``theta`` with ``ndim >= 2`` draw ``g ~ N(0, I)`` (CPU ``generator``, in
    ``named_parameters`` order) and rescale each filter ``i`` (slice along dim 0):

        d_i = g_i / ||g_i||_F * ||theta_i||_F

    Parameters with ``ndim < 2`` (biases, norm scales/shifts) get ``d = 0``, as Li et al. do for biases
    and BN parameters. Buffers are not perturbed.
    """
    direction: dict[str, Tensor] = {}
    for name, theta in model.named_parameters():
        if theta.ndim < 2:
            direction[name] = torch.zeros_like(theta)
            continue
        g = torch.randn(theta.shape, generator=generator, dtype=torch.float32)
        g = g.to(device=theta.device, dtype=theta.dtype)
        dims = tuple(range(1, theta.ndim))
        g_norm = torch.linalg.vector_norm(g, dim=dims, keepdim=True)
        theta_norm = torch.linalg.vector_norm(theta.detach(), dim=dims, keepdim=True)
        direction[name] = g / g_norm.clamp_min(torch.finfo(g.dtype).tiny) * theta_norm
    return direction


def _symmetric_range(radius: float, steps: int) -> list[float]:
    """``alpha_k = radius * (2k - (steps - 1)) / (steps - 1)``: ``linspace(-radius, radius, steps)`` with an
    exact 0 at the centre when ``steps`` is odd (``[0.0]`` when ``steps == 1``)."""
    if steps == 1:
        return [0.0]
    return [radius * (2 * k - (steps - 1)) / (steps - 1) for k in range(steps)]


def _mean_metric(fn: Callable[[nn.Module, Batch], Tensor | float], model: nn.Module,
                 batches: Sequence[Batch]) -> float:
    """``mean_b fn(model, batch_b)`` computed as ``sum(float(.)) / len(batches)``."""
    return sum(float(fn(model, batch)) for batch in batches) / len(batches)


def loss_landscape(model: nn.Module, loss_fn: LossFn, batches: Iterable[Batch], radius: float, steps: int,
                   directions: int = 1, seed: int = 0,
                   accuracy_fn: Callable[[nn.Module, Batch], Tensor | float] | None = None,
                   progress: bool = False) -> dict[str, list]:
    """Loss along 1 or 2 filter-normalised random directions (Wei et al. Sec. 4; Li et al. 2018, Sec. 4).

    With ``d1, d2`` from :func:`filter_normalized_direction` (``torch.Generator().manual_seed(seed)``) and
    ``alphas = betas = linspace(-radius, radius, steps)``:

        1-D: loss[k]    = mean_b loss_fn(model(theta + alphas[k] d1), batch_b)
        2-D: loss[k][l] = mean_b loss_fn(model(theta + alphas[k] d1 + betas[l] d2), batch_b)

    and likewise ``accuracy`` when ``accuracy_fn`` is given. Evaluation runs in eval mode under
    ``torch.no_grad``. The parameters and buffers are restored bit-exactly afterwards (copied back from a
    clone), as are all train/eval flags, also when ``loss_fn`` raises. The centre point (alpha = 0) uses
    ``theta`` itself, so it equals the unperturbed loss exactly.

    Returns ``{'alphas': [...], 'loss': [...]}`` (1-D) or ``{'alphas', 'betas', 'loss': [[...]]}`` (2-D),
    plus ``'accuracy'`` of the same shape as ``'loss'`` when ``accuracy_fn`` is given.
    """
    if directions not in (1, 2):
        raise ValueError(f"directions must be 1 or 2, got {directions}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    batches = list(batches)
    if not batches:
        raise ValueError("batches is empty")

    params = dict(model.named_parameters())
    theta = {name: p.detach().clone() for name, p in params.items()}
    saved = {name: t.detach().clone() for name, t in [*model.named_parameters(), *model.named_buffers()]}
    generator = torch.Generator().manual_seed(seed)
    dirs = [filter_normalized_direction(model, generator) for _ in range(directions)]

    alphas = _symmetric_range(radius, steps)
    betas = alphas if directions == 2 else [0.0]
    points = [(a, b) for a in alphas for b in betas]
    losses: list[float] = []
    accuracies: list[float] = []

    iterator: Iterable[tuple[float, float]] = points
    if progress:
        from tqdm import tqdm
        iterator = tqdm(points, desc="loss landscape")

    try:
        with torch.no_grad(), _eval_mode(model):
            for alpha, beta in iterator:
                for name, p in params.items():
                    p.copy_(theta[name])
                    if alpha != 0.0:
                        p.add_(dirs[0][name], alpha=alpha)
                    if beta != 0.0:
                        p.add_(dirs[1][name], alpha=beta)
                losses.append(_mean_metric(loss_fn, model, batches))
                if accuracy_fn is not None:
                    accuracies.append(_mean_metric(accuracy_fn, model, batches))
    finally:
        with torch.no_grad():
            for name, t in [*model.named_parameters(), *model.named_buffers()]:
                t.copy_(saved[name])

    def shape(values: list[float]) -> list:
        return values if directions == 1 else [values[k * steps:(k + 1) * steps] for k in range(steps)]

    result: dict[str, list] = {"alphas": alphas}
    if directions == 2:
        result["betas"] = list(betas)
    result["loss"] = shape(losses)
    if accuracy_fn is not None:
        result["accuracy"] = shape(accuracies)
    return result

