"""Any timm backbone as FD student or teacher (fd_ref.models.timm_backbone, fd_ref.method.distill's grid rule, the EsViT
teacher), and the scripts around them: train.py --model timm:<name>, finetune.py on its student.pt (timm's
head, timm's layer grouping, linear probe), analyze.py skipping what does not apply, bad input -> exit 2.
All models are tiny timm configurations with random weights at 32-64 px."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import analyze
import finetune
import train
from fd_ref.cli import run_main
from fd_ref.method.distill import FeatureDistillation, match_token_grid
from fd_ref.errors import UserError
from fd_ref.models.from_file import build_model, read_model_file
from fd_ref.models.teachers import ESVIT_ARGS, ESVIT_TIMM, build_teacher
from fd_ref.models.timm_backbone import TimmBackbone, parse_kwargs
from fd_ref.optim.groups import build_timm_optimizer
from fd_ref.models.vit import create_vit

RESNET = ("resnet18", dict(layers=(1, 1, 1, 1), channels=(8, 16, 32, 64), stem_width=8))       # 64 px -> 2x2
SWIN = ("swin_tiny_patch4_window7_224", dict(embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=4))
SWINV2 = ("swinv2_tiny_window8_256", dict(embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=4))
VIT = ("vit_tiny_patch16_224", dict(depth=2, embed_dim=32, num_heads=2, patch_size=8))
CONVNEXT = ("convnext_tiny", dict(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32)))


def kw_text(kwargs: dict) -> str:
    return json.dumps(kwargs)


def save_timm_weights(path: Path, name: str, kwargs: dict, img_size: int, seed: int = 0) -> torch.nn.Module:
    """A random timm model (the test's own reference) saved as a teacher checkpoint in timm's keys."""
    torch.manual_seed(seed)
    try:
        model = timm.create_model(name, pretrained=False, num_classes=0, img_size=img_size, **kwargs)
    except TypeError:
        model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    torch.save(model.state_dict(), path)
    return model.eval()


# ---------------------------------------------------------------------------------------------------------
# The adapter: one token layout for every family
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec,img,fmt,grid,prefix,width", [
    (RESNET, 64, "NCHW", (2, 2), 0, 64),
    (SWIN, 32, "NHWC", (4, 4), 0, 32),
    (SWINV2, 32, "NHWC", (4, 4), 0, 32),
    (VIT, 32, "tokens", (4, 4), 1, 32),
])
def test_backbone_reads_every_layout_as_tokens(spec, img, fmt, grid, prefix, width):
    name, kwargs = spec
    torch.manual_seed(0)
    backbone = TimmBackbone(f"timm:{name}", img, kwargs).eval()
    assert (backbone.fmt, backbone.grid, backbone.num_prefix_tokens, backbone.embed_dim) == (fmt, grid, prefix, width)
    x = torch.randn(2, 3, img, img)
    raw = backbone.model.forward_features(x)
    # independent flattening: index the raw map position by position, row-major
    if fmt == "NCHW":
        expected = torch.stack([raw[:, :, i, j] for i in range(grid[0]) for j in range(grid[1])], dim=1)
    elif fmt == "NHWC":
        expected = torch.stack([raw[:, i, j, :] for i in range(grid[0]) for j in range(grid[1])], dim=1)
    else:
        expected = raw
    tokens = backbone.forward_features(x)
    assert tokens.shape == (2, prefix + grid[0] * grid[1], width)
    assert torch.equal(tokens, expected)
    assert backbone.config == {"timm": name, "timm_kwargs": json.loads(json.dumps(kwargs)), "img_size": img,
                               "num_classes": 0, "drop_path_rate": 0.0}


@pytest.mark.parametrize("text,expected", [
    ("embed_dim=16,depths=[1,1]", {"embed_dim": 16, "depths": (1, 1)}),
    ('{"embed_dim": 16, "depths": [1, 1]}', {"embed_dim": 16, "depths": (1, 1)}),
    ("{window_size: 14}", {"window_size": 14}),
    ({"window_size": 14}, {"window_size": 14}),
    (None, {}), ("", {}),
])
def test_parse_kwargs(text, expected):
    assert parse_kwargs(text) == expected


@pytest.mark.parametrize("text", ["embed_dim", "[1, 2]", "a=[1,2"])
def test_parse_kwargs_refuses_non_mappings(text):
    with pytest.raises(UserError):
        parse_kwargs(text)


# ---------------------------------------------------------------------------------------------------------
# The grid rule (distill.py's docstring), property by property
# ---------------------------------------------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(ht=st.integers(1, 5), wt=st.integers(1, 5), hs=st.integers(1, 6), ws=st.integers(1, 6),
       pt=st.integers(0, 1), ps=st.integers(0, 1), seed=st.integers(0, 999))
def test_match_token_grid_rule(ht, wt, hs, ws, pt, ps, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(2, pt + ht * wt, 3, generator=g)
    out = match_token_grid(t, (ht, wt), pt, (hs, ws), ps)
    assert out.shape == (2, ps + hs * ws, 3)
    patches = out[:, ps:]
    if (ht, wt) == (hs, ws):
        assert torch.equal(patches, t[:, pt:])                                # same grid: untouched
    grid = t[:, pt:].reshape(2, ht, wt, 3).permute(0, 3, 1, 2)               # row-major tokens -> [B, C, H, W]
    hand = _bilinear(grid, (hs, ws)).permute(0, 2, 3, 1).reshape(2, hs * ws, 3)
    torch.testing.assert_close(patches, hand, rtol=1e-5, atol=1e-6)
    # bilinear resizing keeps a constant map constant and never leaves the range of the teacher's values
    assert (patches.amin(1) >= t[:, pt:].amin(1) - 1e-5).all() and (patches.amax(1) <= t[:, pt:].amax(1) + 1e-5).all()
    const = torch.full((1, pt + ht * wt, 3), 1.5)
    assert torch.allclose(match_token_grid(const, (ht, wt), pt, (hs, ws), ps), torch.full((1, ps + hs * ws, 3), 1.5))
    if ps == 1:  # the student's class token: the teacher's, or the mean of its patch tokens
        expected = t[:, :1] if pt else t.mean(1, keepdim=True)
        assert torch.allclose(out[:, :1], expected)


def test_match_token_grid_default_keeps_the_vit_rule():
    t = torch.randn(2, 1 + 9, 4)
    assert torch.equal(match_token_grid(t, (3, 3), 1, (3, 3)), t)


# ---------------------------------------------------------------------------------------------------------
# FeatureDistillation, case by case
# ---------------------------------------------------------------------------------------------------------
def _whiten(x: torch.Tensor) -> torch.Tensor:  # LayerNorm without affine, eps 1e-5, by hand
    mu = x.mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + 1e-5)


def _check_fd(student, teacher, img, expected_target):
    torch.manual_seed(1)
    fd = FeatureDistillation(student, teacher)
    x = torch.randn(2, 3, img, img)
    target = fd.targets(x)
    assert torch.allclose(target, expected_target(x), atol=1e-5)
    loss = fd(x)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    assert fd.projection(fd.student_tokens(x)).shape == target.shape


def _bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of ``[B, C, H, W]`` written out: output pixel ``d`` reads the input at
    ``s = max((d + 0.5) * n_in / n_out - 0.5, 0)`` (pixel centres, no corner alignment, no antialiasing),
    weighting pixels ``floor(s)`` and ``floor(s) + 1`` (the last one repeated at the edge) by ``1 - f``, ``f``."""
    def weights(n_in: int, n_out: int) -> torch.Tensor:
        w = torch.zeros(n_out, n_in, dtype=torch.float64)
        for d in range(n_out):
            src = max((d + 0.5) * n_in / n_out - 0.5, 0.0)
            i0 = min(int(math.floor(src)), n_in - 1)
            frac = src - i0
            w[d, i0] += 1 - frac
            w[d, min(i0 + 1, n_in - 1)] += frac
        return w
    rows, cols = weights(x.shape[2], size[0]), weights(x.shape[3], size[1])
    return torch.einsum("oh,bchw,pw->bcop", rows, x.double(), cols).to(x.dtype)


def test_cnn_student_vit_teacher(tmp_path):
    """ResNet student (2x2 map, no class token) + ViT teacher (8x8 grid): the teacher's class token is
    dropped and its patch map resized bilinearly to 2x2."""
    teacher = build_teacher("vit_tiny", img_size=64, patch_size=8, depth=1)
    student = TimmBackbone(f"timm:{RESNET[0]}", 64, RESNET[1])

    def expected(x):
        t = teacher(x)[:, 1:].reshape(2, 8, 8, -1).permute(0, 3, 1, 2)
        r = _bilinear(t, (2, 2))
        return _whiten(r.permute(0, 2, 3, 1).reshape(2, 4, -1))
    _check_fd(student, teacher, 64, expected)


def test_vit_student_cnn_teacher(tmp_path):
    """fd_ref ViT student (class token, 8x8) + ResNet teacher (2x2, no class token): the class token's
    target is the mean of the teacher's map, the map resized to 8x8."""
    reference = save_timm_weights(tmp_path / "r.pt", *RESNET, 64)
    teacher = build_teacher(f"timm:{RESNET[0]}", img_size=64, checkpoint=str(tmp_path / "r.pt"),
                            timm_kwargs=RESNET[1])
    assert (teacher.grid, teacher.num_prefix_tokens, teacher.embed_dim) == ((2, 2), 0, 64)
    student = create_vit("vit_tiny", img_size=64, patch_size=8, depth=1, num_classes=0)

    def expected(x):
        fmap = reference.forward_features(x)                                # [B, 64, 2, 2], the test's own model
        cls = fmap.mean((2, 3))[:, None]
        r = _bilinear(fmap, (8, 8))
        return _whiten(torch.cat([cls, r.flatten(2).transpose(1, 2)], 1))
    _check_fd(student, teacher, 64, expected)


def test_swin_student_vit_teacher():
    """Swin student (4x4 NHWC map) + timm-ViT-grid teacher (fd_ref ViT, 4x4 + class token): same grid,
    the class token dropped."""
    teacher = build_teacher("vit_tiny", img_size=32, patch_size=8, depth=1)
    student = TimmBackbone(f"timm:{SWIN[0]}", 32, SWIN[1])
    _check_fd(student, teacher, 32, lambda x: _whiten(teacher(x)[:, 1:]))


def test_swinv2_student_swin_teacher_different_grids(tmp_path):
    """SwinV2 student (4x4 at 32 px) + Swin teacher with a 2x2 last map (three stages): resized to 4x4,
    no class token on either side; the Swin teacher's target is its map after its final norm."""
    kwargs = dict(embed_dim=16, depths=(1, 1, 1), num_heads=(1, 2, 2), window_size=4)
    reference = save_timm_weights(tmp_path / "s.pt", SWIN[0], kwargs, 32)
    teacher = build_teacher(f"timm:{SWIN[0]}", img_size=32, checkpoint=str(tmp_path / "s.pt"), timm_kwargs=kwargs)
    assert (teacher.grid, teacher.num_prefix_tokens, teacher.embed_dim) == ((2, 2), 0, 64)
    student = TimmBackbone(f"timm:{SWINV2[0]}", 32, SWINV2[1])

    def expected(x):
        fmap = reference.forward_features(x).permute(0, 3, 1, 2)           # NHWC after norm -> NCHW
        r = _bilinear(fmap, (4, 4))
        return _whiten(r.flatten(2).transpose(1, 2))
    _check_fd(student, teacher, 32, expected)


def test_convnext_teacher_applies_its_head_norm_per_position(tmp_path):
    reference = save_timm_weights(tmp_path / "c.pt", *CONVNEXT, 64)
    teacher = build_teacher(f"timm:{CONVNEXT[0]}", img_size=64, checkpoint=str(tmp_path / "c.pt"),
                            timm_kwargs=CONVNEXT[1])
    x = torch.randn(2, 3, 64, 64)
    fmap = reference.forward_features(x).flatten(2).transpose(1, 2)        # [B, 4, 32]
    norm = reference.head.norm
    expected = F.layer_norm(fmap, (32,), norm.weight, norm.bias, norm.eps)
    assert torch.allclose(teacher(x), expected, atol=1e-5)
    raw = build_teacher(f"timm:{CONVNEXT[0]}", img_size=64, checkpoint=str(tmp_path / "c.pt"),
                        timm_kwargs=CONVNEXT[1], feat_after_norm=False)
    assert torch.allclose(raw(x), fmap, atol=1e-6)


def test_cls_target_needs_a_class_token():
    teacher = build_teacher("vit_tiny", img_size=32, patch_size=8, depth=1)
    with pytest.raises(ValueError, match="class token"):
        FeatureDistillation(TimmBackbone(f"timm:{SWIN[0]}", 32, SWIN[1]), teacher, target="cls")


# ---------------------------------------------------------------------------------------------------------
# EsViT Swin-B teacher (its parity with the published Swin: tests/test_esvit_parity.py)
# ---------------------------------------------------------------------------------------------------------
def test_esvit_swin_base_is_the_published_shape():
    with torch.device("meta"):
        model = timm.create_model(ESVIT_TIMM, pretrained=False, num_classes=0, img_size=224, **ESVIT_ARGS)
    assert model.num_features == 128 * 8 == 1024                  # published embed_dim * 8 target width
    assert model.layers[3].blocks[0].attn.window_size == (7, 7)   # window 14 clipped to the 7 x 7 last stage
    assert model.layers[0].blocks[1].shift_size == (7, 7)


def test_esvit_without_checkpoint_says_where_to_get_it():
    with pytest.raises(UserError, match="checkpoint_best.pth"):
        build_teacher("esvit_swin_base", img_size=224)


# ---------------------------------------------------------------------------------------------------------
# The scripts
# ---------------------------------------------------------------------------------------------------------
def common(output: Path, img: int) -> list[str]:
    return ["--img-size", str(img), "--synthetic-size", "24", "--batch-size", "8", "--epochs", "1",
            "--num-workers", "0", "--progress", "false", "--output", str(output)]


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("timm") / "fd"
    train.main(["--model", f"timm:{RESNET[0]}", "--model-kwargs", kw_text(RESNET[1]), "--teacher", "vit_tiny",
                "--teacher-patch-size", "16", "--teacher-depth", "1", *common(out, 64)])
    return out


def test_student_file_rebuilds_itself(resnet_run):
    mf = read_model_file(resnet_run / "student.pt")
    assert mf.config["timm"] == RESNET[0] and mf.config["timm_kwargs"]["channels"] == [8, 16, 32, 64]
    model = build_model(mf)
    x = torch.randn(1, 3, 64, 64)
    torch.manual_seed(0)
    fresh = timm.create_model(RESNET[0], pretrained=False, num_classes=0, **RESNET[1]).eval()
    fresh.load_state_dict({k[len("model."):]: v for k, v in mf.state.items()})
    assert torch.allclose(model.forward_features(x), fresh.forward_features(x).flatten(2).transpose(1, 2))


def test_finetune_uses_timms_head_and_layer_grouping(resnet_run, tmp_path):
    out = tmp_path / "ft"
    results = finetune.main(["--pretrained", str(resnet_run / "student.pt"), "--layer-decay", "0.8",
                             "--drop-path", "0.1", *common(out, 64)])
    assert results["mode"] == "finetune"
    mf = read_model_file(out / "best.pt")
    assert mf.num_classes == 10 and mf.config["drop_path_rate"] == 0.1
    model = build_model(mf)
    assert isinstance(model.model.fc, torch.nn.Linear) and model(torch.randn(2, 3, 64, 64)).shape == (2, 10)
    # layer decay: timm's grouping of ResNet (stem, layer1..4, head), scale 0.8 ** (L - layer)
    opt = build_timm_optimizer(model, lr=1.0, weight_decay=0.05, layer_decay=0.8)
    scale = {id(p): g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    named = dict(model.model.named_parameters())
    last = max(scale.values())
    assert last == 1.0 and scale[id(named["fc.weight"])] == 1.0
    assert scale[id(named["conv1.weight"])] == pytest.approx(0.8 ** 5)
    assert scale[id(named["layer1.0.conv1.weight"])] == pytest.approx(0.8 ** 4)
    assert scale[id(named["layer4.0.conv1.weight"])] == pytest.approx(0.8 ** 1)
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decay[id(named["fc.bias"])] == 0.0 and decay[id(named["bn1.weight"])] == 0.0
    assert decay[id(named["conv1.weight"])] == 0.05


def test_linear_probe_and_analyze_of_a_cnn(resnet_run, tmp_path, capsys):
    lp = finetune.main(["--pretrained", str(resnet_run / "student.pt"), "--linear-probe", *common(tmp_path / "lp", 64)])
    assert lp["mode"] == "linear_probe"
    out = tmp_path / "ft"
    finetune.main(["--pretrained", str(resnet_run / "student.pt"), "--epochs", "1", *common(out, 64)])
    capsys.readouterr()
    analyze.main(["--models", f"ft={out / 'best.pt'}", "--img-size", "64", "--num-images", "8",
                  "--landscape-steps", "3", "--num-workers", "0", "--output", str(tmp_path / "an")])
    printed = capsys.readouterr().out
    skipped = [line for line in printed.splitlines() if "skipped for ft" in line]
    assert len(skipped) == 1 and "no global self-attention" in skipped[0]
    report = json.loads((tmp_path / "an" / "analysis.json").read_text())
    assert "loss_landscape_1d.png" in report["figures"]
    assert "attention_distance.png" not in report["figures"]
    assert "1d" in report["models"][0]["landscape"]


def test_swin_student_trains_end_to_end(tmp_path):
    out = tmp_path / "swin"
    train.main(["--model", f"timm:{SWINV2[0]}", "--model-kwargs", kw_text(SWINV2[1]), "--teacher", "vit_tiny",
                "--teacher-patch-size", "8", "--teacher-depth", "1", "--max-steps", "2", *common(out, 32)])
    mf = read_model_file(out / "student.pt")
    assert mf.config["timm"] == SWINV2[0] and build_model(mf).grid == (4, 4)


@pytest.mark.parametrize("argv,message", [
    (["--model", "timm:no_such_net"], "unknown student timm:no_such_net"),
    (["--model", f"timm:{VIT[0]}", "--model-kwargs", "embed_dim=30,num_heads=4,depth=1,patch_size=8"],
     "timm cannot build"),                                          # a width the heads do not divide
    (["--model", "timm:crossvit_tiny_240", "--model-kwargs", "embed_dim=[16,32],depth=[[1,1,0]],num_heads=[1,1]"],
     "no usable feature map"),                                      # forward_features returns a list
    (["--teacher", "timm:no_such_net"], "unknown teacher"),
])
def test_bad_timm_input_one_line_exit_2_nothing_written(argv, message, tmp_path, capsys):
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as e:
        img = 240 if "crossvit" in " ".join(argv) else 32          # CrossViT runs at its own size only
        run_main(lambda: train.main([*argv, *common(out, img)]))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------
# The paper's Swin row: configs/fd_esvit_swin_base.yaml and configs/ft_esvit_swin_base.yaml
# ---------------------------------------------------------------------------------------------------------
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_esvit_distillation_config():
    import yaml
    from fd_ref.config import resolve_config

    path = CONFIGS / "fd_esvit_swin_base.yaml"
    assert set(yaml.safe_load(path.read_text())) <= set(train.DEFAULTS)
    assert path.read_text().startswith("#") and "recipes.md" in path.read_text()
    cfg = resolve_config(train.DEFAULTS, ["--config", str(path)])
    # recipes.md: | EsViT Swin-B | SwinV2-B (window 14) | 300 | 0.3 | 2e-4 | 10 ep | 1e-5 | warm-up lr 1e-6 |
    assert (cfg["teacher"], cfg["epochs"], cfg["drop_path"], cfg["lr"], cfg["warmup_epochs"], cfg["min_lr"],
            cfg["warmup_lr"]) == ("esvit_swin_base", 300, 0.3, 2e-4, 10, 1e-5, 1e-6)
    assert (cfg["img_size"], cfg["weight_decay"], cfg["clip_grad"], cfg["batch_size"], cfg["beta"]) == (
        224, 0.05, 3.0, 128, 2.0)
    assert cfg["target_norm"] == "whiten" and cfg["teacher_feat_after_norm"] is True and cfg["target"] == "full"
    assert (cfg["crop_min_scale"], cfg["crop_interpolation"]) == (0.08, "bilinear")
    assert cfg["output"] == "out/fd_esvit_swin_base"
    # the student it names is SwinV2-B with window 14: width 1024 on 7 x 7 at 224 px, the teacher's map
    name = cfg["model"][len("timm:"):]
    with torch.device("meta"):
        student = timm.create_model(name, pretrained=False, num_classes=0, img_size=224,
                                    **parse_kwargs(cfg["model_kwargs"]))
    assert type(student).__name__ == "SwinTransformerV2"
    assert (student.embed_dim, [len(s.blocks) for s in student.layers], student.num_features) == (
        128, [2, 2, 18, 2], 1024)
    assert [s.blocks[0].attn.num_heads for s in student.layers] == [4, 8, 16, 32]
    assert student.layers[0].blocks[0].window_size == (14, 14)
    assert student.layers[3].blocks[0].window_size == (7, 7) and tuple(student.layers[3].output_resolution) == (7, 7)
    assert ESVIT_ARGS["embed_dim"] * 8 == student.num_features


def test_esvit_finetune_config():
    import yaml
    from fd_ref.config import resolve_config

    path = CONFIGS / "ft_esvit_swin_base.yaml"
    assert set(yaml.safe_load(path.read_text())) <= set(finetune.DEFAULTS)
    text = path.read_text()
    assert "85.1" in text and "fd_finetune__esvit_swin_base__img224__300ep.yaml" in text
    assert "shared/" not in text  # the config cites the published config, nothing outside the repository
    cfg = resolve_config(finetune.DEFAULTS, ["--config", str(path)])
    # the published run behind 85.1: BATCH_SIZE 64 per GPU x 16 GPUs = 1024 (its config: "a random mistake",
    # 128 x 16 = 2048 expected to give similar results); the 2048 variant is named in the comment
    assert cfg["batch_size"] == 64 and cfg["accum_steps"] == 1
    assert "random mistake" in text and "--batch-size 128" in text
    # recipes.md: | FD-EsViT Swin-B | 100 | 0.4 | 1.25e-3 | 0.8 | 20 ep | 2.5e-7 | 85.1 |
    assert (cfg["epochs"], cfg["drop_path"], cfg["lr"], cfg["layer_decay"], cfg["warmup_epochs"], cfg["min_lr"],
            cfg["warmup_lr"]) == (100, 0.4, 1.25e-3, 0.8, 20, 2.5e-7, 2.5e-7)
    assert cfg["pretrained"] == "out/fd_esvit_swin_base/student.pt"
    assert (cfg["img_size"], cfg["num_classes"], cfg["weight_decay"], cfg["clip_grad"]) == (224, 1000, 0.05, 5.0)
    assert (cfg["mixup"], cfg["cutmix"], cfg["label_smoothing"], cfg["random_erasing"]) == (0.8, 1.0, 0.1, 0.25)
    assert cfg["auto_augment"] == "rand-m9-mstd0.5-inc1" and cfg["output"] == "out/ft_esvit_swin_base"


def test_export_writes_a_timm_student_as_itself(resnet_run, tmp_path):
    """export.py writes a timm student as its own timm architecture; plain timm in a fresh interpreter (no
    fd_ref import) loads the folder and computes the same features as fd-ref's backbone."""
    import json
    import subprocess
    import sys

    import export
    folder = tmp_path / "x"
    export.main([str(resnet_run / "student.pt"), str(folder)])
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == RESNET[0] and config["model_args"]["channels"] == [8, 16, 32, 64]
    backbone = build_model(read_model_file(resnet_run / "student.pt")).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    torch.save(x, tmp_path / "x.pt")
    code = (f"import sys, torch, timm\nassert 'fd_ref' not in sys.modules\n"
            f"m = timm.create_model('local-dir:{folder}', pretrained=True).eval()\n"
            f"x = torch.load('{tmp_path / 'x.pt'}')\n"
            f"with torch.no_grad(): torch.save(m.forward_features(x), '{tmp_path / 'y.pt'}')\n"
            f"assert 'fd_ref' not in sys.modules\n")
    done = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, timeout=300,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    with torch.no_grad():
        expected = backbone.model.forward_features(x)
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), expected, rtol=1e-5, atol=1e-5)
