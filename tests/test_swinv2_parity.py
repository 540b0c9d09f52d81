"""The SwinV2 student fd-ref builds (``TimmBackbone("timm:swinv2_...")``) is the published ``SwinV2ForFD``.

``tests/swinv2_reference.py`` is an independent plain-torch reference of the published network
(``models/swin_transformer_v2.py`` as ``models/feature_distillation.py::build_fd`` builds it). A tiny reference
with every parameter at a random, non-default value is mapped into the timm model fd-ref builds by the library's
mapping (``fd_ref.models.swinv2_keys.published_swinv2_to_timm``, the one finetune.py loads published files with: the
bias MLP ``rpe_mlp`` -> ``cpb_mlp``, the published ``layers.i.downsample`` at the
end of stage i -> timm's ``layers.(i+1).downsample`` at the start of stage i + 1, the persistent buffers dropped:
timm recomputes them), and both run on the same images. The student's tokens (``forward_features``: the last
stage after the final norm, row-major, what FD's projection sees) must equal the reference's within TOL.

Geometries: the early stages shift, one stage's map equals the window, the last one is smaller (64 px), so
window clipping (window = map, no shift, the bias MLP's coordinates normalised by the clipped window) is
exercised; the published 224 px / window 14 geometry (maps 56, 28, 14, 7) at a tiny width. Maps of 1 x 1 are
avoided: the published code divides the coordinates by ``w - 1`` = 0 there (NaN), timm by ``max(w - 1, 1)``.

The initialisation tests compare fd-ref's SwinV2 student with the published ``SwinTransformerV2.__init__``
(``published_init`` of the reference): parameter by parameter, equal constants and equal spreads.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import swinv2_reference as ref
from swin_windows import mask_windows_column_major
from fd_ref.models.swinv2_keys import published_swinv2_to_timm as published_to_timm
from fd_ref.models.timm_backbone import TimmBackbone

TOL = 1e-4  # max |student - reference| in fp32 on tokens of order 1 (seen on CPU: 0, 5e-7, 3e-6)
NAME = "timm:swinv2_tiny_window8_256"  # the family of fd-ref's timm:swinv2_base_window8_256; shape from kwargs
GEOMETRIES = {  # name -> (img_size, shape); maps per stage in the comments
    "64px_window4": (64, dict(patch_size=4, embed_dim=8, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4),
                              window_size=4)),                                        # 16, 8, 4, 2
    "48px_window3": (48, dict(patch_size=2, embed_dim=8, depths=(2, 2, 2, 2), num_heads=(2, 2, 4, 4),
                              window_size=3)),                                        # 24, 12, 6, 3
    "224px_window14": (224, dict(patch_size=4, embed_dim=8, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4),
                                 window_size=14)),                                    # 56, 28, 14, 7
}
BUFFERS = ("relative_coords_table", "relative_position_index", "attn_mask")


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Every parameter at a random value no fresh model has: norms 1 + 0.3 N, biases 0.3 N, logit scales
    uniform on [log 10 - 2, log 100 + 1] (a quarter above the clamp at log 100), matrices N / sqrt(fan_in), the
    bias MLP's output layer 3x that (so that its table spans the sigmoid)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("logit_scale"):
                u = torch.rand(p.shape, generator=g)
                p.copy_(math.log(10.0) - 2.0 + (math.log(100.0) + 3.0 - math.log(10.0)) * u)
            elif p.ndim == 1:
                p.copy_((1.0 if "norm" in name and name.endswith("weight") else 0.0) + 0.3 * noise)
            else:
                p.copy_(noise / math.sqrt(p[0].numel()) * (3.0 if ".rpe_mlp.2." in name else 1.0))


def pair(geometry: str, seed: int = 0) -> tuple[ref.SwinV2Reference, TimmBackbone]:
    """A random published network and fd-ref's student holding the same weights."""
    img, shape = GEOMETRIES[geometry]
    reference = ref.SwinV2Reference(img, **shape).eval()
    randomise(reference, seed)
    student = TimmBackbone(NAME, img, shape).eval()
    student.load_state_dict(published_to_timm(reference.state_dict()), strict=True)
    return reference, student


def gap(geometry: str, seed: int = 0) -> float:
    """max |student tokens - published tokens| on one batch."""
    reference, student = pair(geometry, seed)
    img, shape = GEOMETRIES[geometry]
    images = torch.randn(2, 3, img, img, generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        expected, got = reference(images), student.forward_features(images)
    side = img // shape["patch_size"] // 2 ** (len(shape["depths"]) - 1)
    assert (student.grid, student.embed_dim, student.num_prefix_tokens) == ((side, side), reference.num_features, 0)
    assert got.shape == expected.shape == (2, side * side, reference.num_features)
    return (got - expected).abs().max().item()


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_swinv2_student_matches_the_published_network(geometry):
    """fd-ref's SwinV2 student gives the published SwinV2ForFD's tokens (after its final norm) within TOL."""
    err = gap(geometry)
    assert err <= TOL, f"max |student - published| = {err:.2e}"


WRONG = {  # one convention of the published SwinV2 replaced by a plausible wrong one
    "pre_norm_blocks": lambda mp: mp.setattr(ref, "POST_NORM", False),
    "dot_product_attention": lambda mp: mp.setattr(ref, "COSINE", False),
    "logit_scale_unclamped": lambda mp: mp.setattr(ref, "LOGIT_SCALE_MAX", None),
    "k_bias": lambda mp: mp.setattr(ref, "K_BIAS", True),
    "cpb_linear_coordinates": lambda mp: mp.setattr(ref, "CPB_LOG", False),
    "cpb_divided_by_window": lambda mp: mp.setattr(ref, "CPB_DENOMINATOR", lambda w: w),
    "cpb_without_16_sigmoid": lambda mp: mp.setattr(ref, "CPB_GAIN", None),
    "relative_index_transposed": lambda mp: mp.setattr(ref, "relative_index", lambda w: _right_index(w).T),
    "merge_order_row_major": lambda mp: mp.setattr(ref, "MERGE_ORDER", ((0, 0), (0, 1), (1, 0), (1, 1))),
    "merge_norm_before_reduction": lambda mp: mp.setattr(ref, "MERGE_NORM_AFTER", False),
    "roll_direction": lambda mp: mp.setattr(ref, "ROLL", 1),
    "even_blocks_shifted": lambda mp: mp.setattr(ref, "SHIFTED_PARITY", 0),
    "no_shift_mask": lambda mp: mp.setattr(
        ref, "shift_mask", lambda H, W, w, s: torch.zeros((H // w) * (W // w), w * w, w * w)),
    "mask_windows_column_major": lambda mp: mp.setattr(ref, "shift_mask", mask_windows_column_major(ref.shift_mask)),
    "clipped_window_keeps_its_shift": lambda mp: mp.setattr(
        ref, "window_and_shift", lambda res, w, shifted: (min(res, w), min(res, w) // 2 if shifted else 0)),
    "no_final_norm": lambda mp: mp.setattr(ref, "FINAL_NORM", False),
}
_right_index = ref.relative_index


@pytest.mark.parametrize("wrong", list(WRONG))
def test_parity_detects_each_convention(wrong, monkeypatch):
    """With one convention wrong in the reference the student is off by far more than TOL (at 64 px each acts:
    stages 0-1 shift, stage 2's map equals the window, stage 3's is smaller, three mergings)."""
    WRONG[wrong](monkeypatch)
    err = gap("64px_window4")
    assert err > 100 * TOL, f"{wrong}: max |student - wrong reference| = {err:.2e}"


def test_wrong_mappings_fail(monkeypatch):
    """Published keys loaded as they are (merging left in stage i, ``rpe_mlp``) are refused by the strict load;
    a mapping that loads but reads the merged neighbours in row-major order breaks the parity."""
    img, shape = GEOMETRIES["64px_window4"]
    reference = ref.SwinV2Reference(img, **shape)
    student = TimmBackbone(NAME, img, shape)
    as_is = {"model." + k: v for k, v in reference.state_dict().items() if not k.endswith(BUFFERS)}
    with pytest.raises(RuntimeError, match="cpb_mlp|downsample"):
        student.load_state_dict(as_is, strict=True)

    right = published_to_timm

    def reordered(state):
        out = right(state)
        for k in [k for k in out if k.endswith("downsample.reduction.weight")]:
            w = out[k]
            out[k] = w.reshape(w.shape[0], 4, -1)[:, [0, 2, 1, 3]].reshape(w.shape)
        return out
    monkeypatch.setitem(globals(), "published_to_timm", reordered)
    err = gap("64px_window4")
    assert err > 100 * TOL, err


@given(w=st.integers(2, 16))
def test_position_tables_are_the_published_ones(w):
    """timm's bias-MLP input and pair index at any window equal the published formula (module docstring of
    the reference): t = 8 d / (w - 1), sign(t) log2(1 + |t|) / 3, odd in d, largest at |d| = w - 1 (t = 8):
    log2(9) / 3 whatever the window."""
    from timm.models.swin_transformer_v2 import WindowAttention

    attn = WindowAttention(8, (w, w), 2)
    table = ref.coords_table(w)
    assert torch.allclose(attn.relative_coords_table[0], table, atol=1e-6)
    assert torch.equal(attn.relative_position_index, ref.relative_index(w))
    assert table.abs().max().item() == pytest.approx(math.log2(9.0) / 3.0) and torch.allclose(table, -table.flip(0, 1))


# ---------------------------------------------------------------------------------------------------------
# Initialisation: fd-ref's SwinV2 student starts where the published SwinV2ForFD starts
# ---------------------------------------------------------------------------------------------------------
INIT_SHAPE = dict(patch_size=4, embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=4)


def init_mismatches(student: torch.nn.Module) -> list[str]:
    """Published keys whose initial value in ``student`` (a ``TimmBackbone`` at 64 px, INIT_SHAPE) differs from
    the published init: a published constant (norms, biases, logit scales, the post-norm weights at 1e-5) must be
    the same constant; a random one (every Linear / Conv2d weight: N(0, 0.02), the attention output and fc2 of the
    b-th block divided by sqrt(2 b)) must have a zero mean and the same spread (std within 15 %, 1e3-1e4 draws)."""
    torch.manual_seed(0)
    reference = ref.SwinV2Reference(64, **INIT_SHAPE)
    ref.published_init(reference)
    published = dict(reference.named_parameters())
    mapped = published_to_timm(published)
    mine = dict(student.named_parameters())
    assert set(mapped) == set(mine)
    bad = []
    for (name, p), key in zip(published.items(), mapped):
        p, q = p.detach(), mine[key].detach()
        if bool((p == p.flatten()[0]).all()):
            ok = torch.equal(p, q)
        else:
            ok = 0.85 < q.std().item() / p.std().item() < 1.15 and \
                abs(q.mean().item()) < 5 * p.std().item() / math.sqrt(q.numel())
        if not ok:
            bad.append(name)
    return bad


def test_init_matches_the_published_init_parameter_by_parameter():
    """fd-ref's SwinV2 student starts where the published one starts, parameter by parameter (init_mismatches)."""
    torch.manual_seed(1)
    assert init_mismatches(TimmBackbone(NAME, 64, INIT_SHAPE)) == []


def test_timms_own_init_differs_in_three_places(monkeypatch):
    """Without fd_ref.models.swinv2_init the comparison fails exactly where timm's init differs from the published one:
    the patch embedding (PyTorch's default), the post-norm weights (0, not 1e-5), the attention output and fc2
    weights (not divided by sqrt(2 b))."""
    import fd_ref.models.timm_backbone as tb

    monkeypatch.setattr(tb, "is_swinv2", lambda net: False)
    torch.manual_seed(1)
    bad = init_mismatches(TimmBackbone(NAME, 64, INIT_SHAPE))
    blocks = [f"layers.{i}.blocks.{j}" for i in range(4) for j in range(2)]
    expected = ["patch_embed.proj.weight", "patch_embed.proj.bias"] + [
        f"{b}.{p}" for b in blocks for p in ("norm1.weight", "attn.proj.weight", "norm2.weight", "mlp.fc2.weight")]
    assert sorted(bad) == sorted(expected)


def test_init_facts():
    """The published values themselves: post-norm weights 1e-5 and biases 0; logit scale log 10; q / v biases 0;
    patch embedding N(0, 0.02) with bias 0; block b's attention output and fc2 at std 0.02 / sqrt(2 b)."""
    torch.manual_seed(0)
    net = TimmBackbone(NAME, 64, INIT_SHAPE).model
    blocks = [block for stage in net.layers for block in stage.blocks]
    for b, block in enumerate(blocks, start=1):
        for norm in (block.norm1, block.norm2):
            assert torch.all(norm.weight == 1e-5) and torch.all(norm.bias == 0)
        assert torch.all(block.attn.logit_scale == math.log(10.0))
        assert torch.all(block.attn.q_bias == 0) and torch.all(block.attn.v_bias == 0)
        for w in (block.attn.proj.weight, block.mlp.fc2.weight):
            assert w.std().item() == pytest.approx(0.02 / math.sqrt(2 * b), rel=0.1)
        assert block.attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.1)
        assert block.attn.cpb_mlp[0].weight.std().item() == pytest.approx(0.02, rel=0.15)
        assert torch.all(block.attn.cpb_mlp[0].bias == 0)
    conv = net.patch_embed.proj
    assert conv.weight.std().item() == pytest.approx(0.02, rel=0.1) and torch.all(conv.bias == 0)
    for norm in [net.norm, net.patch_embed.norm] + [s.downsample.norm for s in net.layers[1:]]:
        assert torch.all(norm.weight == 1) and torch.all(norm.bias == 0)


def test_drop_path_schedule_is_the_published_one():
    """Block b of all stages drops with rate linspace(0, rate, sum(depths))[b] (published ``dpr``)."""
    student = TimmBackbone(NAME, 64, INIT_SHAPE, drop_path_rate=0.3)
    blocks = [block for stage in student.model.layers for block in stage.blocks]
    rates = [float(getattr(b.drop_path1, "drop_prob", 0.0)) for b in blocks]
    assert rates == pytest.approx(ref.drop_path_rates(0.3, INIT_SHAPE["depths"]))
    assert all(float(getattr(b.drop_path2, "drop_prob", 0.0)) == r for b, r in zip(blocks, rates))


def test_distillation_optimizer_decays_what_the_published_one_decays():
    """train.py's AdamW groups (``build_optimizer`` on the student and the projection) decay exactly the
    parameters the published pre-training optimizer decays: not the 1-D ones, not ``.bias``, not the names
    ``SwinV2ForFD`` lists (``no_weight_decay_keywords``: rpe_mlp, logit_scale, relative_position_bias_table)."""
    from fd_ref.optim.groups import build_optimizer
    from fd_ref.method.projection import Projection

    student = TimmBackbone(NAME, 64, INIT_SHAPE)
    trainable = torch.nn.ModuleDict({"student": student, "projection": Projection(student.embed_dim, 16)})
    groups = build_optimizer(trainable, lr=1e-3, weight_decay=0.05).param_groups
    decayed = {n for g in groups if g["weight_decay"] > 0 for n in g["param_names"]}
    reference = ref.SwinV2Reference(64, **INIT_SHAPE)
    keywords = ("rpe_mlp", "logit_scale", "relative_position_bias_table")
    published = {n: p for n, p in reference.named_parameters()
                 if not (p.ndim == 1 or n.endswith(".bias") or any(k in n for k in keywords))}
    expected = {"student." + k for k in published_to_timm(published)} | {"projection.proj.weight"}
    assert decayed == expected, (sorted(decayed - expected), sorted(expected - decayed))


def test_fine_tuning_head_is_drawn_as_published(monkeypatch):
    """A SwinV2's classifier (built with the backbone or by ``reset_classifier``, as finetune.py does) starts as
    the published fine-tuning network's head: weight N(0, 0.02), bias 0. timm's own ``reset_classifier`` leaves
    PyTorch's default (uniform weight, uniform non-zero bias), which the same checks reject."""
    import fd_ref.models.timm_backbone as tb

    torch.manual_seed(2)
    for student in (TimmBackbone(NAME, 64, INIT_SHAPE, num_classes=1000), TimmBackbone(NAME, 64, INIT_SHAPE)):
        if student.num_classes == 0:
            student.reset_classifier(1000)
        head = student.model.get_classifier()
        assert head.weight.shape[0] == 1000 and torch.all(head.bias == 0)
        assert head.weight.std().item() == pytest.approx(0.02, rel=0.05)
        # a normal, not a uniform: about 4.6% of N(0, s) lies beyond 2 s (a uniform of that std has none)
        assert 0.03 < (head.weight.abs() > 0.04).float().mean().item() < 0.06
    monkeypatch.setattr(tb, "is_swinv2", lambda net: False)
    timm_head = TimmBackbone(NAME, 64, INIT_SHAPE, num_classes=1000).model.get_classifier()
    assert not torch.all(timm_head.bias == 0)
    assert (timm_head.weight.abs() > 2 * timm_head.weight.std()).float().mean().item() == 0.0


# -- fine-tuning and distillation optimiser groups as published (issue #23) ----------------------------------
FT_SHAPE = dict(patch_size=4, embed_dim=8, depths=(2, 2, 4, 2), num_heads=(1, 2, 2, 4), window_size=4)
PUBLISHED_NO_DECAY_KEYWORDS = ("rpe_mlp", "logit_scale", "relative_position_bias_table")  # rpe_wd False


def published_name(timm_name: str) -> str:
    """timm's SwinV2 name -> the published one, by hand: ``cpb_mlp`` is ``rpe_mlp``; timm's
    ``layers.{i}.downsample`` (start of stage i) is the published ``layers.{i-1}.downsample`` (end of stage i-1)."""
    parts = timm_name.replace("cpb_mlp", "rpe_mlp").split(".")
    if parts[0] == "layers" and parts[2] == "downsample":
        parts[1] = str(int(parts[1]) - 1)
    return ".".join(parts)


def published_swin_layer(name: str, num_layers: int, depths) -> int:
    """``optimizer.py::get_swin_layer`` on a published name, written out by hand (num_layers = sum + 2)."""
    if name.startswith("patch_embed"):
        return 0
    if name.startswith("layers"):
        stage, part = int(name.split(".")[1]), name.split(".")[3]
        if part in ("reduction", "norm"):  # layers.{stage}.downsample.{reduction|norm}
            return sum(depths[:stage + 1])
        return sum(depths[:stage]) + int(part) + 1
    return num_layers - 1


def published_decays(name: str, p: torch.Tensor) -> bool:
    """``optimizer.py``: no decay for 1-D, ``.bias``, ``no_weight_decay()`` names, keyword substrings."""
    pub = published_name(name)
    return not (p.ndim == 1 or pub.endswith(".bias") or pub == "absolute_pos_embed"
                or any(k in pub for k in PUBLISHED_NO_DECAY_KEYWORDS))


@pytest.mark.parametrize("layer_decay", [0.8, 0.65])
def test_fine_tuning_lr_scales_are_the_published_ones(layer_decay):
    """``build_timm_optimizer`` (finetune.py's optimiser of a timm model) gives every SwinV2 parameter the lr
    scale of the published fine-tuning optimiser: ``LAYER_DECAY ** (L - 1 - get_swin_layer(name))`` with
    L = sum(depths) + 2, the final norm and the head in the top group, each patch merging with the last block
    of the stage it closes. timm's own grouping (``param_groups_layer_decay``) puts the norm with the last
    block and each merging with the next stage's first block; this test rejects it."""
    from timm.optim import param_groups_layer_decay

    from fd_ref.optim.groups import build_timm_optimizer

    model = TimmBackbone(NAME, 64, FT_SHAPE, num_classes=10)
    depths, num_layers = FT_SHAPE["depths"], sum(FT_SHAPE["depths"]) + 2
    opt = build_timm_optimizer(model, lr=1.0, weight_decay=0.05, layer_decay=layer_decay)
    scale = {id(p): g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    lr = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    named = dict(model.model.named_parameters())
    assert len(scale) == len(named)
    for name, p in named.items():
        expected = layer_decay ** (num_layers - 1 - published_swin_layer(published_name(name), num_layers, depths))
        assert scale[id(p)] == pytest.approx(expected, rel=1e-12), name
        assert lr[id(p)] == pytest.approx(expected, rel=1e-12), name
    if layer_decay == 0.8:  # the numbers of issue #23 (depths 2-2-4-2, layer decay 0.8)
        assert scale[id(named["norm.weight"])] == 1.0 and scale[id(named["head.fc.weight"])] == 1.0
        assert scale[id(named["layers.1.downsample.reduction.weight"])] == pytest.approx(0.8 ** 9)  # 0.134
        timm_groups = param_groups_layer_decay(model.model, 0.05, layer_decay=0.8)
        timm_scale = {id(p): g["lr_scale"] for g in timm_groups for p in g["params"]}
        assert timm_scale[id(named["norm.weight"])] == pytest.approx(0.8)
        assert timm_scale[id(named["layers.1.downsample.reduction.weight"])] == pytest.approx(0.8 ** 8)  # 0.168


def _timm_lists_modules(self):
    """A SwinV2's ``no_weight_decay()`` as timm before 1.0.31 wrote it: the bias-MLP MODULE names, no
    ``logit_scale``."""
    return {n for n, _ in self.named_modules() if "cpb_mlp" in n}


def _timm_lists_parameters(self):
    """As timm 1.0.31 writes it: the parameter names holding ``cpb_mlp`` or ``logit_scale``."""
    return {n for n, _ in self.named_parameters() if "cpb_mlp" in n or "logit_scale" in n}


@pytest.mark.parametrize("listing", [_timm_lists_modules, _timm_lists_parameters, lambda self: set()],
                         ids=["modules", "parameters", "nothing"])
def test_weight_decay_follows_the_published_keywords_whatever_timm_lists(monkeypatch, listing):
    """Distillation (``build_optimizer`` on student + projection) and fine-tuning (``build_timm_optimizer``)
    decay exactly the SwinV2 parameters the published optimiser decays, whether the installed timm lists
    modules, parameters or nothing in ``no_weight_decay()``."""
    from timm.models.swin_transformer_v2 import SwinTransformerV2

    from fd_ref.optim.groups import build_optimizer
    from fd_ref.method.projection import Projection
    from fd_ref.optim.groups import build_timm_optimizer

    monkeypatch.setattr(SwinTransformerV2, "no_weight_decay", listing)
    student = TimmBackbone(NAME, 64, FT_SHAPE)
    trainable = torch.nn.ModuleDict({"student": student, "projection": Projection(student.embed_dim, 16)})
    groups = build_optimizer(trainable, lr=1e-3, weight_decay=0.05).param_groups
    decayed = {n for g in groups if g["weight_decay"] > 0 for n in g["param_names"]}
    expected = {"student.model." + n for n, p in student.model.named_parameters() if published_decays(n, p)}
    assert decayed == expected | {"projection.proj.weight"}
    assert any("logit_scale" in n for n in student.model.state_dict())  # the case the old timm missed exists

    student.reset_classifier(10)
    opt = build_timm_optimizer(student, lr=1.0, weight_decay=0.05, layer_decay=0.8)
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    for name, p in student.model.named_parameters():
        assert decay[id(p)] == (0.05 if published_decays(name, p) else 0.0), name
