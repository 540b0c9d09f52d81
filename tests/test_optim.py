"""Tests for fd_ref.optim.groups: weight-decay exclusion, layer ids, layer-wise lr decay groups, AdamW construction."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fd_ref.errors import UserError
from fd_ref.files import strip_prefixes
from fd_ref.optim.groups import build_optimizer, layer_id, no_weight_decay, param_groups

DIM = 4


class _Attn(nn.Module):
    def __init__(self, per_block_table: bool) -> None:
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(DIM))
        self.v_bias = nn.Parameter(torch.zeros(DIM))
        self.proj = nn.Linear(DIM, DIM)
        if per_block_table:
            self.rel_pos_bias = _Table()


class _Table(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.zeros(5, 2))


class _Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(DIM))


class _Block(nn.Module):
    def __init__(self, per_block_table: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(DIM)
        self.attn = _Attn(per_block_table)
        self.ls1 = _Scale()
        self.norm2 = nn.LayerNorm(DIM)
        self.mlp = nn.Sequential()
        self.mlp.add_module("fc1", nn.Linear(DIM, 2 * DIM))
        self.mlp.add_module("fc2", nn.Linear(2 * DIM, DIM))
        self.ls2 = _Scale()


class _PatchEmbed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, DIM, 2, 2)


class TinyViT(nn.Module):
    """Stand-in with fd_ref ViT parameter names (does not compute anything)."""

    def __init__(self, depth: int, shared_table: bool = True) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, DIM))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, DIM))
        self.patch_embed = _PatchEmbed()
        if shared_table:
            self.rel_pos_bias = _Table()
        self.blocks = nn.ModuleList([_Block(per_block_table=not shared_table) for _ in range(depth)])
        self.norm = nn.LayerNorm(DIM)
        self.fc_norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, 3)


class _Projection(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(DIM, DIM, 1)


class Distiller(nn.Module):
    """Stand-in for the distillation wrapper: ``student.*`` plus ``projection.proj.*``."""

    def __init__(self, depth: int) -> None:
        super().__init__()
        self.student = TinyViT(depth)
        self.projection = _Projection()


def _flatten(groups: list[dict]) -> list[tuple[str, dict]]:
    return [(name, g) for g in groups for name in g["param_names"]]


def test_strip_prefixes() -> None:
    assert strip_prefixes("module.student.blocks.0.norm1.weight") == "blocks.0.norm1.weight"
    assert strip_prefixes("_orig_mod.module.head.bias") == "head.bias"
    assert strip_prefixes("projection.proj.weight") == "projection.proj.weight"


@pytest.mark.parametrize("name,shape,expected", [
    ("blocks.0.attn.qkv.weight", (12, 4), False),
    ("blocks.0.attn.q_bias", (4,), True),
    ("blocks.0.attn.v_bias", (4,), True),
    ("blocks.0.attn.proj.bias", (4,), True),
    ("blocks.0.norm1.weight", (4,), True),
    ("blocks.0.ls1.gamma", (4,), True),
    ("cls_token", (1, 1, 4), True),
    ("student.pos_embed", (1, 5, 4), True),
    ("mask_token", (1, 1, 4), True),
    ("module.student.mask_token", (1, 1, 4), True),
    # a name ending in ".bias" is excluded whatever its shape (published rule)
    ("blocks.0.attn.proj.bias", (4, 1), True),
    # relative position bias tables are 2-D and decayed, as in the published optimizer.py
    ("rel_pos_bias.table", (5, 2), False),
    ("blocks.3.attn.rel_pos_bias.table", (5, 2), False),
    ("blocks.3.attn.relative_position_bias_table", (5, 2), False),
    # only names ending in ".bias" are excluded by name: a 2-D matrix called "...bias_proj" is decayed
    ("blocks.0.attn.bias_proj.weight", (4, 4), False),
    ("patch_embed.proj.weight", (4, 3, 2, 2), False),
    ("module.student.head.weight", (3, 4), False),
    ("projection.proj.weight", (4, 4, 1, 1), False),
    ("projection.proj.bias", (4,), True),
])
def test_no_weight_decay(name: str, shape: tuple[int, ...], expected: bool) -> None:
    assert no_weight_decay(name, torch.empty(shape)) is expected


@pytest.mark.parametrize("prefix", ["", "student.", "module.", "module.student."])
def test_layer_id_names(prefix: str) -> None:
    L = 12
    # published get_vit_layer: the shared rel_pos_bias goes to the top group, not to layer 0
    cases = {"cls_token": 0, "pos_embed": 0, "patch_embed.proj.weight": 0, "rel_pos_bias.table": 13,
             "blocks.0.norm1.weight": 1, "blocks.11.mlp.fc2.bias": 12, "blocks.4.attn.rel_pos_bias.table": 5,
             "norm.weight": 13, "fc_norm.bias": 13, "head.weight": 13}
    for name, expected in cases.items():
        assert layer_id(prefix + name, L) == expected, name
    assert layer_id("projection.proj.weight", L) == L + 1


def test_layer_id_rejects_block_beyond_depth() -> None:
    with pytest.raises(UserError):
        layer_id("blocks.5.norm1.weight", 5)


@given(depth=st.integers(1, 24), i=st.integers(0, 23), j=st.integers(0, 23))
def test_layer_id_monotone_over_blocks(depth: int, i: int, j: int) -> None:
    i, j = i % depth, j % depth
    a = layer_id(f"blocks.{i}.mlp.fc1.weight", depth)
    b = layer_id(f"student.blocks.{j}.attn.qkv.weight", depth)
    assert (a < b) == (i < j) and (a == b) == (i == j)
    assert 0 < a <= depth < layer_id("head.weight", depth)


@settings(max_examples=30, deadline=None)
@given(depth=st.integers(1, 4), decay=st.floats(0.05, 1.0), wd=st.floats(0.0, 0.5),
       shared_table=st.booleans(), wrapped=st.booleans(), frozen_mask=st.integers(0, 2**16 - 1))
def test_layer_decay_groups(depth: int, decay: float, wd: float, shared_table: bool, wrapped: bool,
                            frozen_mask: int) -> None:
    model: nn.Module = Distiller(depth) if wrapped else TinyViT(depth, shared_table=shared_table)
    named = list(model.named_parameters())
    for k, (pname, p) in enumerate(named):  # freeze a pseudo-random subset, but keep the head trainable
        if (frozen_mask >> (k % 16)) & 1 and "head" not in pname:
            p.requires_grad_(False)
    groups = param_groups(model, wd, layer_decay=decay, num_layers=depth)

    # Every trainable parameter exactly once; no frozen parameter anywhere.
    grouped = [id(p) for g in groups for p in g["params"]]
    assert len(grouped) == len(set(grouped))
    assert set(grouped) == {id(p) for _, p in named if p.requires_grad}
    assert all(len(g["params"]) == len(g["param_names"]) > 0 for g in groups)

    for name, g in _flatten(groups):
        layer = layer_id(name, depth)
        assert g["lr_scale"] == pytest.approx(decay ** (depth + 1 - layer))
        assert g["name"].startswith(f"layer{layer}_")
        short = strip_prefixes(name)
        if short.endswith(("bias", "gamma")) or "norm" in short or short in ("cls_token", "pos_embed"):
            assert g["weight_decay"] == 0.0 and g["name"].endswith("_no_decay"), name
        else:
            assert g["weight_decay"] == wd and not g["name"].endswith("_no_decay"), name
        if short.startswith("head.") or short == "rel_pos_bias.table":
            assert g["lr_scale"] == 1.0

    names = [g["name"] for g in groups]
    assert len(names) == len(set(names))


def test_two_groups_without_layer_decay() -> None:
    model = TinyViT(2)
    model.head.weight.requires_grad_(False)
    groups = param_groups(model, 0.05)
    assert [g["name"] for g in groups] == ["decay", "no_decay"]
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    assert all(g["lr_scale"] == 1.0 for g in groups)
    decayed = set(groups[0]["param_names"])
    assert decayed == {"patch_embed.proj.weight", "rel_pos_bias.table", "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight",
                       "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.weight", "blocks.1.attn.qkv.weight",
                       "blocks.1.attn.proj.weight", "blocks.1.mlp.fc1.weight", "blocks.1.mlp.fc2.weight"}
    assert "head.weight" not in groups[1]["param_names"]


def test_num_layers_inferred() -> None:
    explicit = param_groups(Distiller(3), 0.05, layer_decay=0.7, num_layers=3)
    inferred = param_groups(Distiller(3), 0.05, layer_decay=0.7)
    assert [(g["name"], g["lr_scale"]) for g in explicit] == [(g["name"], g["lr_scale"]) for g in inferred]


def test_layer_id_messages() -> None:
    with pytest.raises(UserError) as error:
        layer_id("blocks.x.norm.weight", 2)
    assert str(error.value) == ("parameter 'blocks.x.norm.weight' has no block index after 'blocks.'; "
                                "name ViT blocks 'blocks.{i}.*'")
    with pytest.raises(UserError) as error:
        layer_id("student.blocks.2.norm.weight", 2)
    assert str(error.value) == ("parameter 'student.blocks.2.norm.weight' is in block 2 but num_layers=2; "
                                "pass the model's real depth as num_layers")


def test_swin_layer_id_edges() -> None:
    """A patch merging's own parameter (4 name parts) has its stage's place; a stage index past the depths or
    not a number is refused with the one-line error."""
    from fd_ref.optim.groups import swin_layer_id
    assert swin_layer_id("layers.1.downsample.weight", (2, 2)) == 2
    for name in ("layers.2.blocks.0.norm1.weight", "layers.x.blocks.0.norm1.weight", "layers.0.blocks"):
        with pytest.raises(UserError) as error:
            swin_layer_id(name, (2, 2))
        assert str(error.value) == f"parameter {name!r} is not in a Swin stage layers.{{i}} of depths [2, 2]"
    # stage 0 has no patch merging (timm merges at the start of stages 1+), a block past the stage's depth
    # does not exist, and a stage holds nothing else
    for name in ("layers.0.downsample.reduction.weight", "layers.0.blocks.2.norm1.weight", "layers.1.other.0.weight"):
        with pytest.raises(UserError) as error:
            swin_layer_id(name, (2, 2))
        assert str(error.value) == (f"parameter {name!r} is neither a block nor a patch merging of a Swin stage; "
                                    "the published layer rule (get_swin_layer) has no place for it")


def test_user_error_messages_and_edges() -> None:
    """Each refusal's whole message; layer decay 1 (no decay across layers) is accepted, 0 refused."""
    model = TinyViT(1)
    for kwargs, message in (
            ({"weight_decay": -1.0}, "weight_decay must be >= 0, got -1.0; pass a non-negative value"),
            ({"weight_decay": 0.05, "layer_decay": 0.0}, "layer_decay must be in (0, 1], got 0.0; e.g. 0.65 for ViT-B"),
            ({"weight_decay": 0.05, "layer_decay": 0.7, "layer_of": lambda name: 0},
             "param_groups: a layer rule (layer_of) needs its num_layers")):
        with pytest.raises(UserError) as error:
            param_groups(model, **kwargs)
        assert str(error.value) == message
    with pytest.raises(UserError) as error:
        param_groups(nn.Linear(2, 2), 0.05, layer_decay=0.7)
    assert str(error.value) == ("layer_decay needs num_layers but the model has no 'blocks.{i}' parameters; "
                                "pass num_layers explicitly or drop layer_decay")
    assert {g["lr_scale"] for g in param_groups(model, 0.05, layer_decay=1.0, num_layers=1)} == {1.0}
    with pytest.raises(UserError) as error:
        param_groups(model, 0.05, layer_decay=0.7, num_layers=0)
    assert str(error.value) == "num_layers must be >= 1, got 0; pass the ViT depth"
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(UserError) as error:
        param_groups(model, 0.05)
    assert str(error.value) == "the model has no trainable parameters; unfreeze something before building an optimizer"


def test_depth_is_inferred_from_blocks_i_names_only() -> None:
    """The depth is one more than the largest i of a ``blocks.{i}`` name (after the wrapper prefixes): a
    ParameterList ``blocks`` counts, a Sequential elsewhere (``head.3``) and a parameter named ``blocks`` do not."""
    def scale_of(model: nn.Module, name: str) -> float:
        groups = param_groups(model, 0.05, layer_decay=0.5)  # lr_scale = 0.5 ** (depth + 1 - layer)
        return next(g["lr_scale"] for g in groups if name in g["param_names"])

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ParameterList([nn.Parameter(torch.zeros(2, 2)) for _ in range(3)])
            self.head = nn.Sequential(*[nn.Linear(2, 2) for _ in range(5)])

    assert scale_of(Model(), "blocks.0") == 0.5 ** 3  # depth 3: block 0 is layer 1
    wrapped = nn.Module()
    wrapped.student = TinyViT(2)
    wrapped.register_parameter("blocks", nn.Parameter(torch.zeros(2, 2)))
    assert scale_of(wrapped, "student.blocks.0.attn.qkv.weight") == 0.5 ** 2  # depth 2


def test_user_errors() -> None:
    model = TinyViT(1)
    with pytest.raises(UserError):
        param_groups(model, 0.05, layer_decay=1.5, num_layers=1)
    with pytest.raises(UserError):
        param_groups(model, -1.0)
    with pytest.raises(UserError):
        param_groups(nn.Linear(2, 2), 0.05, layer_decay=0.7)  # no blocks to infer depth from
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(UserError):
        param_groups(model, 0.05)


def test_build_optimizer_steps() -> None:
    torch.manual_seed(0)
    model = TinyViT(2)
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.05, layer_decay=0.5, num_layers=2)
    assert isinstance(opt, torch.optim.AdamW)
    assert all(g["fused"] and not g["foreach"] for g in opt.param_groups)  # the fused kernel on the CPU too
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(1e-3 * g["lr_scale"])
    before = model.blocks[0].attn.qkv.weight.detach().clone()
    loss = sum((p.float() ** 2).sum() for p in model.parameters())
    loss.backward()
    opt.step()
    assert not torch.equal(before, model.blocks[0].attn.qkv.weight)
    state = opt.state_dict()
    assert {g["name"] for g in state["param_groups"]} == {g["name"] for g in opt.param_groups}


def test_adamw_hyperparameters_are_the_published_ones() -> None:
    """Published ``config.py``: AdamW, ``TRAIN.OPTIMIZER.BETAS`` (0.9, 0.999), ``EPS`` 1e-8,
    ``TRAIN.WEIGHT_DECAY`` 0.05: what train.py and finetune.py build by default (fd_ref's ViT and a timm
    model) and what every distillation / fine-tuning config sets."""
    from pathlib import Path

    import yaml

    import finetune
    import train
    from fd_ref.models.timm_backbone import TimmBackbone
    from fd_ref.optim.groups import build_timm_optimizer

    assert train.DEFAULTS["weight_decay"] == finetune.DEFAULTS["weight_decay"] == 0.05
    configs = sorted((Path(__file__).parents[1] / "configs").glob("f[dt]_*.yaml"))
    assert len(configs) >= 12
    for path in configs:
        assert yaml.safe_load(path.read_text())["weight_decay"] == 0.05, path.name
    opts = [build_optimizer(TinyViT(2), lr=1e-3, weight_decay=train.DEFAULTS["weight_decay"]),
            build_optimizer(TinyViT(2), lr=1e-3, weight_decay=finetune.DEFAULTS["weight_decay"], layer_decay=0.65),
            build_timm_optimizer(TimmBackbone("timm:resnet18", 32), lr=1e-3,
                                 weight_decay=finetune.DEFAULTS["weight_decay"], layer_decay=0.65)]
    for opt in opts:
        assert type(opt) is torch.optim.AdamW
        for g in opt.param_groups:
            assert g["betas"] == (0.9, 0.999) and g["eps"] == 1e-8 and g["weight_decay"] in (0.05, 0.0)
            assert not g["amsgrad"] and not g["maximize"]
        assert {g["weight_decay"] for g in opt.param_groups} == {0.05, 0.0}


def test_declared_no_weight_decay_resolves_module_names() -> None:
    """A submodule's ``no_weight_decay()`` may list parameters or modules (timm has done both): a parameter's
    name exempts that parameter, a module's name every parameter under it, relative to the listing module;
    names that are neither exempt nothing (a listed ``mlp`` must not exempt ``mlp2``)."""
    from fd_ref.optim.groups import declared_no_weight_decay

    class Inner(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mlp = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 2))
            self.mlp2 = nn.Linear(2, 2)
            self.scale = nn.Parameter(torch.ones(2, 1))
            self.other = nn.Linear(2, 2)

        def no_weight_decay(self):
            return {"mlp", "scale", "missing"}

    model = nn.ModuleDict({"student": nn.ModuleDict({"model": Inner()})})
    assert declared_no_weight_decay(model) == {
        "student.model.mlp.0.weight", "student.model.mlp.0.bias", "student.model.mlp.1.weight",
        "student.model.mlp.1.bias", "student.model.scale"}
    groups = param_groups(model, 0.05)
    decayed = {n for g in groups if g["weight_decay"] > 0 for n in g["param_names"]}
    assert decayed == {"student.model.mlp2.weight", "student.model.other.weight"}


def test_swin_published_keywords_apply_whatever_timm_lists(monkeypatch) -> None:
    """The published Swin rules exempt their parameters from weight decay even where timm's own
    ``no_weight_decay()`` lists nothing: Swin v1's ``relative_position_bias_table`` and ``absolute_pos_embed``
    (SwinV2's ``cpb_mlp`` and ``logit_scale``: tests/test_swinv2_parity.py)."""
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.swin_transformer_v2 import SwinTransformerV2

    from fd_ref.optim.groups import declared_no_weight_decay

    monkeypatch.setattr(SwinTransformer, "no_weight_decay", lambda self: set())
    monkeypatch.setattr(SwinTransformerV2, "no_weight_decay", lambda self: set())
    small = dict(img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 1),
                 num_classes=0)
    v1, v2 = SwinTransformer(**small), SwinTransformerV2(**small)
    v2.absolute_pos_embed = nn.Parameter(torch.zeros(1, 64, 16))  # the published SwinV2's ape=True
    tables = {n for n, _ in v1.named_parameters() if n.endswith("attn.relative_position_bias_table")}
    assert len(tables) == 2 and declared_no_weight_decay(v1) == tables
    assert "absolute_pos_embed" in declared_no_weight_decay(v2)


def test_timm_optimizer_without_layer_decay_and_its_checks() -> None:
    """A timm model outside the Swin family fine-tuned without layer decay: timm's weight-decay split (matrices
    decayed, 1-D parameters not), every group at the base lr; a layer decay outside (0, 1] and lr 0 refused
    with their messages; the non-fused kernel when asked for."""
    from fd_ref.models.timm_backbone import TimmBackbone
    from fd_ref.optim.groups import build_timm_optimizer

    model = TimmBackbone("timm:resnet18", 32)
    opt = build_timm_optimizer(model, lr=1e-3, weight_decay=0.05)
    assert {g["weight_decay"] for g in opt.param_groups} == {0.05, 0.0}
    assert all(g["lr"] == 1e-3 and g["lr_scale"] == 1.0 for g in opt.param_groups)
    for g in opt.param_groups:
        assert all((p.ndim > 1) == (g["weight_decay"] > 0) for p in g["params"])
    assert build_timm_optimizer(model, lr=1e-3, weight_decay=0.05, layer_decay=1.0).param_groups
    for bad in (0.0, 1.5):
        with pytest.raises(UserError) as error:
            build_timm_optimizer(model, lr=1e-3, weight_decay=0.05, layer_decay=bad)
        assert str(error.value) == f"layer_decay must be in (0, 1], got {bad}; e.g. 0.8 for Swin-B"
    with pytest.raises(UserError) as error:
        build_optimizer(TinyViT(1), lr=0.0, weight_decay=0.05)
    assert str(error.value) == "lr must be > 0, got 0.0; pass a positive learning rate"
    assert build_optimizer(TinyViT(1), lr=1e-3, weight_decay=0.05, fused=False).defaults["foreach"] is True
    model.requires_grad_(False)
    with pytest.raises(UserError) as error:
        build_timm_optimizer(model, lr=1e-3, weight_decay=0.05)
    assert str(error.value) == "the model has no trainable parameters; unfreeze something before building an optimizer"
