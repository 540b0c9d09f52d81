"""Invariants of the Section 4 diagnostics in fd_ref.analysis.diagnostics."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from fd_ref.analysis.diagnostics import (
    attention_distance,
    attention_geometry,
    average_attention_map,
    collect_attention,
    filter_normalized_direction,
    head_cosine_matrix,
    head_cosine_similarity,
    loss_landscape,
    patch_coordinates,
)

# The CPU is shared: no deadline and no too-slow health check, so load never fails a test.
FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def random_attention(batch: int, heads: int, tokens: int, seed: int = 0) -> torch.Tensor:
    """Random softmax attention ``[batch, heads, tokens, tokens]``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, heads, tokens, tokens, generator=g).mul(3).softmax(dim=-1)


# ---------------------------------------------------------------------------------------------------------
# attention distance
# ---------------------------------------------------------------------------------------------------------
def test_patch_coordinates_row_major_centres() -> None:
    coords = patch_coordinates((2, 3), 4)
    assert coords.shape == (6, 2)
    assert coords[0].tolist() == [2.0, 2.0]
    assert coords[1].tolist() == [2.0, 6.0]  # next column, same row
    assert coords[3].tolist() == [6.0, 2.0]  # next row


@pytest.mark.parametrize("cls_token", [False, True])
def test_identity_attention_has_zero_distance(cls_token: bool) -> None:
    grid = (3, 4)
    tokens = 12 + int(cls_token)
    attn = torch.eye(tokens).expand(2, 3, tokens, tokens)
    assert torch.equal(attention_distance(attn, grid, 16), torch.zeros(3))


@pytest.mark.parametrize("patch", [1, 7, 16])
def test_uniform_attention_on_2x2_grid_is_hand_computed(patch: int) -> None:
    attn = torch.full((1, 2, 4, 4), 0.25)
    expected = (0 + patch + patch + patch * math.sqrt(2)) / 4
    torch.testing.assert_close(attention_distance(attn, (2, 2), patch), torch.full((2,), expected))


def test_attending_to_the_neighbour_gives_one_patch() -> None:
    attn = torch.tensor([[0.0, 1.0], [1.0, 0.0]]).expand(1, 1, 2, 2)
    torch.testing.assert_close(attention_distance(attn, (1, 2), 16), torch.tensor([16.0]))


@FAST
@given(height=st.integers(1, 5), width=st.integers(1, 5), patch=st.integers(1, 32), cls_token=st.booleans())
def test_uniform_attention_equals_brute_force_mean_pairwise_distance(
        height: int, width: int, patch: int, cls_token: bool) -> None:
    points = [(r * patch, c * patch) for r in range(height) for c in range(width)]
    brute = sum(math.dist(p, q) for p in points for q in points) / len(points) ** 2
    tokens = len(points) + int(cls_token)
    attn = torch.full((2, 3, tokens, tokens), 1.0 / tokens)
    torch.testing.assert_close(attention_distance(attn, (height, width), patch),
                               torch.full((3,), brute, dtype=torch.float32))


@FAST
@given(seed=st.integers(0, 10_000), height=st.integers(1, 4), width=st.integers(1, 4))
def test_distance_ignores_mass_on_class_token(seed: int, height: int, width: int) -> None:
    patches = height * width
    attn = random_attention(2, 3, patches, seed)
    g = torch.Generator().manual_seed(seed + 1)
    cls_mass = torch.rand(2, 3, patches, 1, generator=g) * 0.9
    with_cls = torch.zeros(2, 3, patches + 1, patches + 1)
    with_cls[:, :, 0] = random_attention(2, 3, patches + 1, seed + 2)[:, :, 0]  # class query: anything
    with_cls[:, :, 1:, :1] = cls_mass
    with_cls[:, :, 1:, 1:] = attn * (1 - cls_mass)
    torch.testing.assert_close(attention_distance(with_cls, (height, width), 8),
                               attention_distance(attn, (height, width), 8))


def test_distance_per_head_is_bounded_by_grid_diameter() -> None:
    attn = random_attention(3, 4, 17, seed=3)
    dist = attention_distance(attn, (4, 4), 16)
    assert dist.shape == (4,)
    assert bool((dist >= 0).all()) and bool((dist <= 16 * 3 * math.sqrt(2) + 1e-4).all())


def test_distance_rejects_too_few_tokens() -> None:
    with pytest.raises(ValueError):
        attention_distance(torch.full((1, 1, 3, 3), 1 / 3), (2, 2), 16)


# ---------------------------------------------------------------------------------------------------------
# head diversity and average maps
# ---------------------------------------------------------------------------------------------------------
def test_identical_heads_have_similarity_one() -> None:
    head = torch.rand(3, 1, 5, 5, generator=torch.Generator().manual_seed(0)) + 0.1
    x = head.expand(3, 4, 5, 5)
    torch.testing.assert_close(head_cosine_similarity(x), torch.tensor(1.0))


def test_heads_with_disjoint_support_have_similarity_zero() -> None:
    x = torch.zeros(2, 3, 6, 4)
    for h in range(3):
        x[:, h, 2 * h:2 * h + 2] = 0.1 + h
    assert head_cosine_similarity(x).item() == 0.0


def test_opposite_heads_have_similarity_minus_one() -> None:
    a = torch.randn(2, 1, 8, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(head_cosine_similarity(torch.cat([a, -a], dim=1)), torch.tensor(-1.0))


@FAST
@given(seed=st.integers(0, 10_000), heads=st.integers(2, 5))
def test_similarity_is_bounded_symmetric_and_head_order_free(seed: int, heads: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, heads, 4, 6, generator=g)
    sim = head_cosine_similarity(x)
    assert -1.0 - 1e-6 <= sim.item() <= 1.0 + 1e-6
    matrix = head_cosine_matrix(x)
    torch.testing.assert_close(matrix, matrix.T)
    torch.testing.assert_close(matrix.diagonal(), torch.ones(heads))
    permuted = x[:, torch.randperm(heads, generator=g)]
    torch.testing.assert_close(head_cosine_similarity(permuted), sim)


def test_similarity_needs_two_heads() -> None:
    with pytest.raises(ValueError):
        head_cosine_similarity(torch.rand(2, 1, 4, 4))


def test_average_map_is_mean_over_images_and_heads_and_keeps_rows_stochastic() -> None:
    attn = random_attention(3, 4, 10, seed=1)
    avg = average_attention_map(attn)
    assert avg.shape == (10, 10)
    torch.testing.assert_close(avg.sum(dim=-1), torch.ones(10))
    torch.testing.assert_close(avg[2, 7], attn[:, :, 2, 7].mean())


# ---------------------------------------------------------------------------------------------------------
# collecting attention
# ---------------------------------------------------------------------------------------------------------
class FakeViT(nn.Module):
    """Stands in for an fd_ref ViT: exposes grid, patch_size and attention_maps()."""

    grid = (2, 2)
    patch_size = 8

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.5)

    def attention_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        assert not self.training
        return [random_attention(images.shape[0], 2, 5)]


def test_collect_attention_uses_attention_maps_and_restores_mode() -> None:
    model = FakeViT().train()
    maps = collect_attention(model, torch.zeros(3, 3, 16, 16))
    assert len(maps) == 1 and maps[0].shape == (3, 2, 5, 5)
    assert model.training and model.drop.training
    assert attention_geometry(model) == ((2, 2), 8)


def test_collect_attention_on_timm_vit_matches_unfused_attention() -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2, num_classes=0)
    reference: list[torch.Tensor] = []
    for block in model.blocks:
        block.attn.fused_attn = False  # the manual path passes the softmax through attn_drop
        block.attn.attn_drop.register_forward_hook(lambda m, args, out: reference.append(out.detach()))
    images = torch.randn(2, 3, 16, 16)
    maps = collect_attention(model, images)
    assert len(maps) == 2 and maps[0].shape == (2, 2, 17, 17)
    for got, want in zip(maps, reference):
        torch.testing.assert_close(got, want)
    assert attention_geometry(model) == ((4, 4), (4, 4))


def test_collect_attention_rejects_models_without_attention() -> None:
    with pytest.raises(TypeError):
        collect_attention(nn.Linear(2, 2), torch.zeros(1, 2))


# ---------------------------------------------------------------------------------------------------------
# loss landscape
# ---------------------------------------------------------------------------------------------------------
def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                         nn.Dropout(0.2), nn.Linear(3 * 4 * 4, 5))


def tiny_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 2, 4, 4, generator=g), torch.randint(0, 5, (4,), generator=g)) for _ in range(2)]


def cross_entropy(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    images, labels = batch
    return nn.functional.cross_entropy(model(images), labels)


def accuracy(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> float:
    images, labels = batch
    return (model(images).argmax(dim=-1) == labels).float().mean().item()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}


def assert_bit_exact(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = dict([*model.named_parameters(), *model.named_buffers()])
    assert after.keys() == before.keys()
    for name, tensor in after.items():
        assert torch.equal(tensor, before[name]), name


def test_direction_filters_have_weight_filter_norms_and_zero_for_1d() -> None:
    model = tiny_model()
    direction = filter_normalized_direction(model, torch.Generator().manual_seed(0))
    assert direction.keys() == dict(model.named_parameters()).keys()
    for name, weight in model.named_parameters():
        d = direction[name]
        assert d.shape == weight.shape
        if weight.ndim < 2:
            assert not d.any(), name
            continue
        for d_i, w_i in zip(d, weight.detach()):
            assert abs(d_i.norm() - w_i.norm()) <= 1e-5 * w_i.norm(), name


def test_direction_is_reproducible_from_the_generator() -> None:
    model = tiny_model()
    first = filter_normalized_direction(model, torch.Generator().manual_seed(3))
    second = filter_normalized_direction(model, torch.Generator().manual_seed(3))
    assert all(torch.equal(first[n], second[n]) for n in first)


def test_1d_landscape_centre_is_exact_and_weights_and_mode_are_restored() -> None:
    model = tiny_model().train()
    model[1].eval()  # a mixed-mode model: every flag must come back as it was
    batches = tiny_batches()
    before = snapshot(model)
    result = loss_landscape(model, cross_entropy, batches, radius=1.0, steps=5, accuracy_fn=accuracy)

    assert result["alphas"] == [-1.0, -0.5, 0.0, 0.5, 1.0]
    assert len(result["loss"]) == 5 and len(result["accuracy"]) == 5
    assert "betas" not in result
    model.eval()
    with torch.no_grad():
        unperturbed = sum(float(cross_entropy(model, b)) for b in batches) / len(batches)
    model.train()
    model[1].eval()
    assert result["loss"][2] == unperturbed
    assert result["loss"][0] != unperturbed and result["loss"][4] != unperturbed
    assert all(0.0 <= a <= 1.0 for a in result["accuracy"])
    assert_bit_exact(model, before)
    assert model.training and model[0].training and not model[1].training and model[4].training


def test_2d_landscape_has_steps_by_steps_grid() -> None:
    model = tiny_model().eval()
    before = snapshot(model)
    result = loss_landscape(model, cross_entropy, tiny_batches(), radius=0.5, steps=3, directions=2, seed=4)
    assert result["alphas"] == result["betas"] == [-0.5, 0.0, 0.5]
    assert len(result["loss"]) == 3 and all(len(row) == 3 for row in result["loss"])
    centre = loss_landscape(model, cross_entropy, tiny_batches(), radius=0.5, steps=1)
    assert result["loss"][1][1] == centre["loss"][0]
    assert_bit_exact(model, before)
    assert not model.training


def test_landscape_depends_on_seed_only_through_the_direction() -> None:
    model = tiny_model()
    a = loss_landscape(model, cross_entropy, tiny_batches(), radius=1.0, steps=3, seed=1)
    b = loss_landscape(model, cross_entropy, tiny_batches(), radius=1.0, steps=3, seed=1)
    c = loss_landscape(model, cross_entropy, tiny_batches(), radius=1.0, steps=3, seed=2)
    assert a == b
    assert a["loss"][1] == c["loss"][1] and a["loss"][0] != c["loss"][0]


def test_landscape_restores_weights_when_loss_fn_raises() -> None:
    model = tiny_model().train()
    before = snapshot(model)
    calls = 0

    def failing(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == 2:  # second batch of the first point, alpha = -radius: the weights are perturbed
            raise RuntimeError("boom")
        return cross_entropy(model, batch)

    with pytest.raises(RuntimeError, match="boom"):
        loss_landscape(model, failing, tiny_batches(), radius=1.0, steps=3)
    assert calls == 2
    assert_bit_exact(model, before)
    assert model.training and all(m.training for m in model.modules())


@pytest.mark.parametrize("kwargs", [{"directions": 3}, {"steps": 0}])
def test_landscape_rejects_bad_arguments(kwargs: dict) -> None:
    args = {"radius": 1.0, "steps": 3, **kwargs}
    with pytest.raises(ValueError):
        loss_landscape(tiny_model(), cross_entropy, tiny_batches(), **args)


def _hand_direction(model: nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Li et al.'s filter normalisation written out filter by filter: for each parameter of 2+ dims (in
    ``named_parameters`` order) one standard-normal draw of its shape, each slice along dim 0 rescaled to the
    parameter's slice norm; 1-dim parameters get 0."""
    direction = {}
    for name, theta in model.named_parameters():
        if theta.ndim < 2:
            direction[name] = torch.zeros_like(theta)
            continue
        g = torch.randn(theta.shape, generator=generator)
        direction[name] = torch.stack([g[i] * (theta[i].detach().pow(2).sum().sqrt() / g[i].pow(2).sum().sqrt())
                                       for i in range(theta.shape[0])])
    return direction


def _hand_loss_at(model: nn.Module, shift: dict[str, torch.Tensor]) -> float:
    """Mean loss over tiny_batches() of a copy of ``model`` (eval mode) with ``theta + shift``."""
    import copy
    moved = copy.deepcopy(model).eval()
    with torch.no_grad():
        for name, p in moved.named_parameters():
            p.add_(shift[name])
        losses = [float(cross_entropy(moved, b)) for b in tiny_batches()]
    return sum(losses) / len(losses)


def test_2d_landscape_off_centre_equals_a_hand_computation() -> None:
    """loss[k][l] at alpha_k, beta_l != 0 equals the loss of theta + alpha_k d1 + beta_l d2 with d1, d2 the
    first and second hand-drawn filter-normalised directions (the second is a fresh draw, not d1)."""
    model = tiny_model().eval()
    result = loss_landscape(model, cross_entropy, tiny_batches(), radius=0.6, steps=3, directions=2, seed=7)
    generator = torch.Generator().manual_seed(7)
    d1, d2 = _hand_direction(model, generator), _hand_direction(model, generator)
    assert any(not torch.allclose(d1[n], d2[n]) for n in d1)
    for k, alpha in enumerate(result["alphas"]):
        for m, beta in enumerate(result["betas"]):
            shift = {n: alpha * d1[n] + beta * d2[n] for n in d1}
            assert result["loss"][k][m] == pytest.approx(_hand_loss_at(model, shift), rel=1e-5, abs=1e-6), (k, m)
    # the grid is not symmetric in the two directions: swapping them would be caught above too
    assert result["loss"][0][1] != pytest.approx(result["loss"][1][0], rel=1e-3)


def test_1d_landscape_off_centre_equals_a_hand_computation() -> None:
    model = tiny_model().eval()
    result = loss_landscape(model, cross_entropy, tiny_batches(), radius=0.8, steps=5, seed=2)
    d1 = _hand_direction(model, torch.Generator().manual_seed(2))
    assert result["alphas"] == pytest.approx([-0.8, -0.4, 0.0, 0.4, 0.8], abs=1e-12)
    for alpha, loss in zip(result["alphas"], result["loss"]):
        assert loss == pytest.approx(_hand_loss_at(model, {n: alpha * d1[n] for n in d1}), rel=1e-5, abs=1e-6)
