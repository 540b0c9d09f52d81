"""analyze.py end to end on two tiny fd_ref ViTs (a backbone and a classifier), plus its argument handling."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # analyze.py is a script at the repository root, not a package
    sys.path.insert(0, str(REPO))

import analyze  # noqa: E402
from fd_ref.analysis.diagnostics import attention_distance, attention_geometry, collect_attention  # noqa: E402
from fd_ref.models.from_file import build_model, read_model_file  # noqa: E402
from fd_ref.errors import UserError  # noqa: E402
from fd_ref.models.vit import VisionTransformer  # noqa: E402

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
TOKENS = 1 + (32 // 8) ** 2  # class token + 4x4 patches
FIGURES = ["attention_distance.png", "head_similarity.png", "attention_maps.png",
           "loss_landscape_1d.png", "loss_landscape_2d.png"]


def save_vit(path: Path, seed: int, **kwargs) -> Path:
    torch.manual_seed(seed)
    model = VisionTransformer(**TINY, **kwargs)
    torch.save({"model": model.state_dict(), "model_config": model.config}, path)
    return path



@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    return {"a": save_vit(folder / "student.pt", 0),
            "b": save_vit(folder / "best.pt", 1, num_classes=10, global_pool="avg")}


def common_flags(output: Path) -> list[str]:
    # batch 5 over 8 images: the last batch is smaller, which the image-weighted means must handle
    return ["--num-images", "8", "--batch-size", "5", "--num-workers", "0", "--landscape-steps", "3",
            "--progress", "false", "--dpi", "50", "--output", str(output)]


@pytest.fixture(scope="module")
def report(models, tmp_path_factory) -> tuple[Path, dict]:
    output = tmp_path_factory.mktemp("analysis") / "out"
    analyze.main(["--models", f"a={models['a']}", f"b={models['b']}", "--landscape-2d",
                  *common_flags(output)])
    return output, json.loads((output / "analysis.json").read_text())


def test_writes_every_figure_and_the_json(report) -> None:
    output, data = report
    for name in FIGURES:
        path = output / name
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert sorted(data["figures"]) == sorted(FIGURES)
    assert not list(output.glob(".*.tmp"))  # no temporary left behind
    assert [m["label"] for m in data["models"]] == ["a", "b"]
    assert data["num_images"] == 8 and "attention_distance" in data["definitions"]


def test_json_shapes_and_values(report) -> None:
    _, data = report
    for m in data["models"]:
        assert (m["depth"], m["heads"], m["grid"], m["patch_size"]) == (2, 2, [4, 4], [8, 8])
        dist = m["attention_distance"]
        assert len(dist) == 2 and all(len(layer) == 2 for layer in dist)
        # a patch is at most sqrt(2) * 24 px from another on a 4x4 grid of 8-px patches
        assert all(math.isfinite(d) and 0 <= d <= 24 * math.sqrt(2) for layer in dist for d in layer)
        assert len(m["head_similarity"]) == 2
        assert all(-1 - 1e-6 <= s <= 1 + 1e-6 for s in m["head_similarity"])
        maps = m["average_attention_maps"]
        assert maps["layers"] == [1, 2]  # first, middle, last of 2 layers -> layers 1 and 2
        assert len(maps["maps"]) == 2
        for grid in maps["maps"]:
            assert len(grid) == TOKENS and all(len(row) == TOKENS for row in grid)
            assert all(abs(sum(row) - 1) < 1e-5 for row in grid)  # mean of softmax rows


def test_landscape_only_for_the_classifier(report, models) -> None:
    _, data = report
    a, b = data["models"]
    assert "skipped" in a["landscape"]
    one, two = b["landscape"]["1d"], b["landscape"]["2d"]
    assert one["alphas"] == [-1.0, 0.0, 1.0] and len(one["loss"]) == len(one["accuracy"]) == 3
    assert len(two["loss"]) == 3 and all(len(row) == 3 for row in two["loss"])
    assert all(0 <= acc <= 1 for row in two["accuracy"] for acc in row)
    # The centre is the unperturbed model: per-image mean cross-entropy on the analysed images.
    cfg = {**analyze.DEFAULTS, "num_images": 8, "batch_size": 5, "num_workers": 0}
    batches = analyze.load_images(cfg).batches(32, cfg, torch.device("cpu"))
    model = build_model(read_model_file(models["b"]))
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(x) for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    assert one["loss"][1] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
    assert one["accuracy"][1] == pytest.approx((logits.argmax(-1) == labels).float().mean().item())
    assert two["loss"][1][1] == pytest.approx(one["loss"][1], rel=1e-6)


def test_distance_over_batches_equals_one_pass(report, models) -> None:
    _, data = report
    cfg = {**analyze.DEFAULTS, "num_images": 8, "batch_size": 8, "num_workers": 0}
    (images, _), = analyze.load_images(cfg).batches(32, cfg, torch.device("cpu"))
    model = build_model(read_model_file(models["a"]))
    grid, patch = attention_geometry(model)
    expected = [attention_distance(a, grid, patch).tolist() for a in collect_attention(model, images)]
    got = data["models"][0]["attention_distance"]
    assert len(got) == len(expected)
    for layer, want in zip(got, expected):
        assert layer == pytest.approx(want, rel=1e-5)


def test_error_before_writing_anything(models, tmp_path) -> None:
    output = tmp_path / "out"
    with pytest.raises(UserError, match="has 2 layers"):  # found after measuring, before any file
        analyze.main(["--models", f"a={models['a']}", "--layers", "5", "--no-landscape", *common_flags(output)])
    assert not output.exists()
    with pytest.raises(UserError, match="does not exist"):
        analyze.main(["--models", f"a={models['a']}", f"b={tmp_path / 'missing.pt'}", *common_flags(output)])
    assert not output.exists()


def test_model_specs() -> None:
    spec = analyze.parse_model_spec("dino=dino_vit_base")
    assert (spec.label, spec.teacher, spec.path) == ("dino", "dino_vit_base", None)
    assert analyze.parse_model_spec("timm:vit_tiny_patch16_224").label == "timm:vit_tiny_patch16_224"
    with pytest.raises(UserError, match="do not exist"):
        analyze.parse_model_spec("t=dino_vit_base@/nonexistent/dino.pth")
    with pytest.raises(UserError, match="neither an existing file nor a teacher name"):
        analyze.parse_model_spec("x=not_a_model")
    with pytest.raises(UserError, match="used twice"):
        analyze.parse_model_specs(["a=vit_tiny", "a=vit_small"])
    assert analyze.resolve_layers([analyze.parse_layer(t) for t in ["first", "middle", "last", "-1", "2"]],
                                  12, "m") == [0, 6, 11, 1]
    with pytest.raises(UserError):
        analyze.parse_layer("0")


def test_missing_model_file_exits_2_with_one_line() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "analyze.py", "--models", "x=/nonexistent.pt"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr


def test_val_split_analyses_only_the_training_hold_out(tmp_path) -> None:
    """--val-split N --split-seed S picks images from exactly the hold-out that train.py / finetune.py carve
    from the same folder (fd_ref.data.splits.train_val_datasets), never from the images they train on."""
    from PIL import Image

    from fd_ref.data.splits import train_val_datasets
    folder = tmp_path / "images"
    for c in ("a", "b", "c"):
        (folder / c).mkdir(parents=True)
        for i in range(10):
            Image.new("RGB", (8, 8), (10 * i, 20, 30)).save(folder / c / f"{i}.png")
    cfg = {**analyze.DEFAULTS, "data": str(folder), "num_images": 4, "val_split": 7, "split_seed": 3,
           "num_workers": 0}
    images = analyze.load_images(cfg)
    train, val = train_val_datasets(str(folder), None, None, val_split=7, split_seed=3)
    held_out = set(val.indices)
    assert len(images.indices) == 4 and set(images.indices) <= held_out
    assert not set(images.indices) & set(train.indices)
    # asking for more images than the hold-out has gives the whole hold-out
    assert sorted(analyze.load_images({**cfg, "num_images": 50}).indices) == sorted(held_out)
    with pytest.raises(UserError, match="leaves no training images"):
        analyze.load_images({**cfg, "val_split": 30})
