"""Tests for fd_ref.data: datasets, robust image loading, splits, transforms (each against the published
pipeline's ops and parameters), timm's Mixup/CutMix and losses (hand formulas), loaders."""
from __future__ import annotations

import io
import logging
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torchvision.transforms import v2

from fd_ref import data
from fd_ref.data import (
    RobustImageFolder,
    SingleDrawResizedCrop,
    SyntheticImages,
    build_criterion,
    build_dataset,
    build_mixup,
    eval_transform,
    finetune_transform,
    pretrain_transform,
    probe_transform,
    split_indices,
)
from fd_ref.errors import UserError
from fd_ref.sampler import make_loader

# ------------------------------------------------------------------------------------------------ synthetic


def test_synthetic_deterministic_and_labels() -> None:
    a = SyntheticImages(20, num_classes=7, image_size=16, seed=3)
    b = SyntheticImages(20, num_classes=7, image_size=16, seed=3)
    other = SyntheticImages(20, num_classes=7, image_size=16, seed=4)
    assert len(a) == 20 and len(a.classes) == 7 and len(set(a.classes)) == 7
    for i in range(len(a)):
        img, label = a[i]
        assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (16, 16)
        assert 0 <= label < 7 and label == a.targets[i]
        assert np.array_equal(np.asarray(img), np.asarray(b[i][0]))
        assert label == other[i][1]
    assert not np.array_equal(np.asarray(a[0][0]), np.asarray(other[0][0]))
    with pytest.raises(IndexError):
        a.generate(20)


def test_synthetic_is_class_dependent() -> None:
    ds = SyntheticImages(200, num_classes=10, image_size=32, seed=0)
    means = {c: [] for c in range(10)}
    for i in range(len(ds)):
        img, label = ds[i]
        means[label].append(np.asarray(img, dtype=np.float64).mean(axis=(0, 1)))
    centroids = {c: np.mean(v, axis=0) for c, v in means.items()}
    # Same-pattern classes differ in hue: their mean colours are far apart.
    assert np.abs(centroids[0] - centroids[4]).max() > 20
    # A nearest-centroid classifier on mean colour + row/column energy is well above chance (10%).
    def features(img: Image.Image) -> np.ndarray:
        x = np.asarray(img, dtype=np.float64).mean(axis=2)
        return np.array([np.abs(np.diff(x, axis=0)).mean(), np.abs(np.diff(x, axis=1)).mean()])

    feats = np.array([np.concatenate([np.asarray(ds[i][0], dtype=np.float64).mean((0, 1)), features(ds[i][0])])
                      for i in range(len(ds))])
    labels = np.array(ds.targets)
    train, test = feats[:150], feats[150:]
    cents = np.stack([train[labels[:150] == c].mean(0) for c in range(10)])
    scale = train.std(0) + 1e-6
    pred = (((test[:, None, :] - cents[None]) / scale) ** 2).sum(-1).argmin(1)
    assert (pred == labels[150:]).mean() > 0.3


def test_synthetic_bad_arguments() -> None:
    with pytest.raises(UserError):
        SyntheticImages(0)
    with pytest.raises(UserError):
        SyntheticImages(5, num_classes=1)


def test_build_dataset_synthetic_train_val_disjoint() -> None:
    train = build_dataset("synthetic", True, None, synthetic_size=10, seed=1)
    val = build_dataset("Synthetic", False, None, synthetic_size=10, seed=1)
    assert len(train) == 10 and len(val) == 2
    train_imgs = {np.asarray(train[i][0]).tobytes() for i in range(len(train))}
    assert all(np.asarray(val[i][0]).tobytes() not in train_imgs for i in range(len(val)))
    tensor_set = build_dataset("synthetic", True, eval_transform(32), synthetic_size=4)
    x, y = tensor_set[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)


# ------------------------------------------------------------------------------------------------ image folder


def _jpeg_bytes(size: tuple[int, int] = (64, 48), mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(0)
    channels = {"RGB": 3, "CMYK": 4}[mode]
    arr = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _make_folder(root: Path) -> dict[str, Path]:
    """A folder with every kind of good and bad file; returns the notable paths."""
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    (root / "c_empty").mkdir()
    paths = {
        "jpeg": root / "a" / "good.jpg",
        "png": root / "a" / "good.png",
        "gray": root / "a" / "gray.png",
        "cmyk": root / "b" / "cmyk.JPG",
        "png16": root / "b" / "deep.png",
        "rgba": root / "b" / "alpha.png",
        "palette": root / "b" / "palette.gif",
        "corrupt": root / "a" / "corrupt.jpg",
        "corrupt_png": root / "b" / "corrupt.png",
        "truncated": root / "a" / "truncated.jpg",
        "empty": root / "b" / "empty.png",
    }
    paths["jpeg"].write_bytes(_jpeg_bytes())
    Image.new("RGB", (20, 10), (10, 200, 30)).save(paths["png"])
    Image.new("L", (8, 8), 77).save(paths["gray"])
    paths["cmyk"].write_bytes(_jpeg_bytes(mode="CMYK"))
    deep = np.array([[65535, 32768], [0, 257]], dtype=np.uint16)
    Image.fromarray(deep).save(paths["png16"])
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 3] = 0  # fully transparent black -> composited onto white
    Image.fromarray(rgba, mode="RGBA").save(paths["rgba"])
    Image.new("P", (6, 6), 3).save(paths["palette"])
    paths["corrupt"].write_bytes(b"this is not an image at all" * 10)
    good_png = io.BytesIO()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(good_png, format="PNG")
    paths["corrupt_png"].write_bytes(good_png.getvalue()[:40] + b"\x00garbage" * 20)
    big = _jpeg_bytes((256, 256))
    paths["truncated"].write_bytes(big[: len(big) // 2])
    paths["empty"].write_bytes(b"")
    (root / "a" / "notes.txt").write_text("not an image")
    (root / "a" / ".hidden.jpg").write_bytes(b"")
    return paths


BAD = ("corrupt", "corrupt_png", "truncated", "empty")


def test_robust_folder_loads_good_and_skips_bad(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    paths = _make_folder(tmp_path)
    ds = RobustImageFolder(tmp_path)
    assert ds.classes == ["a", "b", "c_empty"]
    assert len(ds) == len(paths)  # .txt and hidden files ignored
    with caplog.at_level(logging.WARNING, logger="fd_ref.data"):
        items = [ds[i] for i in range(len(ds))] + [ds[i] for i in range(len(ds))]
    for img, label in items:
        assert img.mode == "RGB" and np.asarray(img).shape[2] == 3 and label in (0, 1)
    assert ds.num_skipped == len(BAD)
    warned = [r for r in caplog.records if "skipping unreadable image" in r.getMessage()]
    assert len(warned) == len(BAD)  # once per file, even though each was visited twice
    by_path = {p: i for i, (p, _) in enumerate(ds.samples)}
    # a bad file yields the next readable sample
    bad_index = by_path[str(paths["corrupt"])]
    img, _ = ds[bad_index]
    assert img.mode == "RGB"


def test_robust_folder_mode_conversions(tmp_path: Path) -> None:
    paths = _make_folder(tmp_path)
    ds = RobustImageFolder(tmp_path)
    deep = np.asarray(ds.load(str(paths["png16"])))
    assert deep.dtype == np.uint8 and deep.shape == (2, 2, 3)
    assert deep[0, 0].tolist() == [255] * 3 and abs(int(deep[0, 1, 0]) - 128) <= 1
    assert deep[1, 0, 0] == 0 and deep[1, 1, 0] == 1  # scaled, not clipped (257 -> 1)
    assert np.asarray(ds.load(str(paths["gray"])))[0, 0].tolist() == [77] * 3
    assert np.asarray(ds.load(str(paths["rgba"])))[0, 0].tolist() == [255] * 3
    for key in ("jpeg", "cmyk", "palette", "png"):
        img = ds.load(str(paths[key]))
        assert img.mode == "RGB" and np.asarray(img).ndim == 3


def test_robust_folder_scan_and_verify(tmp_path: Path) -> None:
    paths = _make_folder(tmp_path)
    ds = RobustImageFolder(tmp_path)
    n = len(ds)
    assert ds.scan() == len(BAD)
    assert len(ds) == n - len(BAD) and ds.num_skipped == len(BAD)
    assert all(Path(p).name not in {paths[k].name for k in BAD} for p, _ in ds.samples)
    assert ds.scan() == 0
    verified = RobustImageFolder(tmp_path, verify=True)
    assert len(verified) == n - len(BAD)


def test_robust_folder_in_dataloader(tmp_path: Path) -> None:
    _make_folder(tmp_path)
    ds = RobustImageFolder(tmp_path, transform=eval_transform(16))
    loader, _ = make_loader(ds, 4, shuffle=True, drop_last=False, num_workers=0, seed=0)
    seen = sum(x.shape[0] for x, _ in loader)
    assert seen == len(ds)


def test_large_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "x").mkdir()
    Image.new("RGB", (400, 300), (5, 6, 7)).save(tmp_path / "x" / "big.png")
    (tmp_path / "x" / "big.jpg").write_bytes(_jpeg_bytes((800, 600)))
    # PIL's own decompression-bomb limit does not stop a legit image.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    ds = RobustImageFolder(tmp_path)
    assert all(ds.load(p).size in {(400, 300), (800, 600)} for p, _ in ds.samples)
    assert Image.MAX_IMAGE_PIXELS == 1000  # restored
    # Above downscale_pixels: shrunk by an integer factor (JPEG via draft, PNG via reduce).
    small = RobustImageFolder(tmp_path, downscale_pixels=20_000)
    sizes = {Path(p).suffix: small.load(p).size for p, _ in small.samples}
    assert sizes[".png"] == (134, 100) and sizes[".jpg"][0] * sizes[".jpg"][1] <= 20_000
    # Above max_pixels even after drafting: skipped with a warning, never a crash.
    Image.new("RGB", (10, 10)).save(tmp_path / "x" / "small.png")
    strict = RobustImageFolder(tmp_path, max_pixels=50_000, downscale_pixels=10**9)
    assert strict.scan() == 2 and strict.num_skipped == 2 and len(strict) == 1


def test_robust_folder_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        RobustImageFolder(tmp_path / "missing")
    with pytest.raises(UserError, match="no class sub-folders"):
        RobustImageFolder(tmp_path)
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "readme.txt").write_text("x")
    with pytest.raises(UserError, match="no images"):
        RobustImageFolder(tmp_path)
    (tmp_path / "cls" / "bad.jpg").write_bytes(b"")
    with pytest.raises(UserError, match="can be read"):
        RobustImageFolder(tmp_path, verify=True)


def test_build_dataset_paths(tmp_path: Path) -> None:
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / split / cls / f"{split}.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "dog" / "extra.png")
    train = build_dataset(str(tmp_path), True, None)
    val = build_dataset(str(tmp_path), False, None)
    assert isinstance(train, RobustImageFolder) and len(train) == 3 and len(val) == 2
    assert train.root.name == "train" and val.root.name == "val"
    flat = build_dataset(str(tmp_path / "train"), False, None)
    assert len(flat) == 3 and flat.classes == ["cat", "dog"]
    (tmp_path / "val" / "bird").mkdir()
    with pytest.raises(UserError, match="different class folders"):
        build_dataset(str(tmp_path), False, None)
    with pytest.raises(UserError, match="neither"):
        build_dataset(str(tmp_path / "nope"), True, None)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
@pytest.mark.parametrize("error", [urllib.error.URLError("offline"), RuntimeError("Dataset not found")])
def test_cifar_offline_raises_user_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, error: Exception
) -> None:
    calls: list[bool] = []

    class Offline:
        def __init__(self, *args: object, download: bool = False, **kwargs: object) -> None:
            calls.append(download)
            raise error

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Offline)
    monkeypatch.setattr(torchvision.datasets, "CIFAR100", Offline)
    with pytest.raises(UserError, match="--data"):
        build_dataset(name, True, None, root_cache=tmp_path)
    assert calls == [False, True]


# ------------------------------------------------------------------------------------------------ splits


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 300), frac=st.floats(0, 1), seed=st.integers(0, 2**31 - 1))
def test_split_indices_properties(n: int, frac: float, seed: int) -> None:
    val_size = int(frac * n)
    train_idx, val_idx = split_indices(n, val_size, seed)
    assert len(val_idx) == val_size and len(train_idx) == n - val_size
    assert set(train_idx).isdisjoint(val_idx) and set(train_idx) | set(val_idx) == set(range(n))
    assert split_indices(n, val_size, seed) == (train_idx, val_idx)


def test_split_indices_bad_size_and_seed_dependence() -> None:
    with pytest.raises(UserError):
        split_indices(5, 6, 0)
    with pytest.raises(UserError):
        split_indices(5, -1, 0)
    assert split_indices(100, 10, 0) != split_indices(100, 10, 1)


# ------------------------------------------------------------------------------------------------ transforms


@pytest.mark.parametrize("source", ["pil", "small_pil", "tensor"])
def test_transform_shapes(source: str) -> None:
    torch.manual_seed(0)
    if source == "pil":
        img = Image.new("RGB", (50, 37), (100, 150, 200))
    elif source == "small_pil":
        img = Image.new("RGB", (7, 5), (100, 150, 200))
    else:
        img = torch.randint(0, 256, (3, 40, 30), dtype=torch.uint8)
    transforms = [pretrain_transform(24), pretrain_transform(24, min_scale=0.67, interpolation="bicubic"),
                  probe_transform(24), eval_transform(24), eval_transform(24, norm="published")]
    if source != "tensor":  # timm's RandAugment ops are PIL operations; every dataset here yields PIL images
        transforms += [finetune_transform(24), finetune_transform(24, auto_augment="none", random_erasing=0)]
    for transform in transforms:
        for _ in range(3):
            out = transform(img)
            assert out.shape == (3, 24, 24) and out.dtype == torch.float32 and torch.isfinite(out).all()


def _steps(transform) -> list:
    return list(transform.transforms)


def test_pretrain_transform_ops_and_parameters() -> None:
    """Published data/data_fd.py: RandomResizedCrop(scale=(MIN_SCALE, 1), ratio=(3/4, 4/3), torchvision's
    default bilinear interpolation), flip, ImageNet mean/std."""
    crop, flip, *rest = _steps(pretrain_transform(224))
    assert isinstance(crop, v2.RandomResizedCrop) and crop.size == (224, 224)
    assert crop.interpolation == v2.InterpolationMode.BILINEAR
    assert crop.scale == (0.08, 1.0) and crop.ratio == pytest.approx((3 / 4, 4 / 3))
    assert isinstance(flip, v2.RandomHorizontalFlip) and flip.p == 0.5
    (norm,) = [s for s in rest if isinstance(s, v2.Normalize)]
    assert tuple(norm.mean) == data.IMAGENET_MEAN and tuple(norm.std) == data.IMAGENET_STD
    crop = _steps(pretrain_transform(224, min_scale=0.67, interpolation="bicubic"))[0]
    assert crop.scale == (0.67, 1.0) and crop.interpolation == v2.InterpolationMode.BICUBIC
    for bad in (dict(min_scale=0.0), dict(min_scale=1.5), dict(interpolation="lanczos")):
        with pytest.raises(UserError):
            pretrain_transform(224, **bad)


RAND_INC_OPS = {"AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
                "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing",
                "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"}


def test_finetune_transform_is_timms_published_pipeline() -> None:
    """data/data_finetune.py: timm create_transform, bicubic RandomResizedCrop(0.08-1), flip, RandAugment
    rand-m9-mstd0.5-inc1 with timm's own ops, no colour jitter (timm drops it under RandAugment), ImageNet
    normalisation, RandomErasing(0.25, pixel)."""
    from timm.data.auto_augment import RandAugment
    from timm.data.random_erasing import RandomErasing
    from timm.data.transforms import RandomResizedCropAndInterpolation

    steps = _steps(finetune_transform(224))
    crop = steps[0]
    assert isinstance(crop, RandomResizedCropAndInterpolation) and crop.size == (224, 224)
    assert crop.interpolation == Image.BICUBIC or "bicubic" in repr(crop)
    assert crop.scale == (0.08, 1.0) and crop.ratio == pytest.approx((3 / 4, 4 / 3))
    (ra,) = [s for s in steps if isinstance(s, RandAugment)]
    assert ra.num_layers == 2 and ra.choice_weights is None
    assert {op.name for op in ra.ops} == RAND_INC_OPS and len(ra.ops) == 15
    assert {"Invert", "SolarizeAdd"} <= {op.name for op in ra.ops}
    for op in ra.ops:
        assert (op.prob, op.magnitude, op.magnitude_std, op.magnitude_max) == (0.5, 9, 0.5, None)
        assert op.kwargs["fillcolor"] == tuple(round(255 * m) for m in data.IMAGENET_MEAN)
        assert op.kwargs["resample"] == Image.BICUBIC
    assert not [s for s in steps if type(s).__name__ == "ColorJitter"]
    (erase,) = [s for s in steps if isinstance(s, RandomErasing)]
    assert (erase.probability, erase.mode, erase.max_count) == (0.25, "pixel", 1)
    (norm,) = [s for s in steps if type(s).__name__ == "Normalize"]
    assert torch.allclose(torch.as_tensor(norm.mean), torch.tensor(data.IMAGENET_MEAN))
    assert torch.allclose(torch.as_tensor(norm.std), torch.tensor(data.IMAGENET_STD))
    assert steps.index(ra) < steps.index(norm) < steps.index(erase)


def test_posterize_at_full_magnitude_gives_black_not_an_error() -> None:
    """PosterizeIncreasing at magnitude 10 keeps 0 bits: black, as with the published runs' Pillow (recent
    Pillow raises instead, which would stop a run on ~0.1% of images)."""
    import copy

    from timm.data.auto_augment import RandAugment

    (ra,) = [s for s in _steps(finetune_transform(32)) if isinstance(s, RandAugment)]
    img = Image.new("RGB", (32, 32), (200, 120, 60))
    for op in ra.ops:
        if op.name.startswith("Posterize"):
            full = copy.copy(op)
            full.prob, full.magnitude, full.magnitude_std = 1.0, 10, 0.0
            assert np.asarray(full(img)).max() == 0
            mid = copy.copy(full)
            mid.magnitude = 5  # 4 - int(2.0) = 2 bits kept
            assert np.array_equal(np.asarray(mid(img)), np.asarray(img) & 0b11000000)


def test_finetune_transform_settings() -> None:
    """auto_augment none brings the configured colour jitter back (timm's rule); 0 disables erasing."""
    from timm.data.auto_augment import RandAugment

    steps = _steps(finetune_transform(32, auto_augment="none", random_erasing=0))
    (jitter,) = [s for s in steps if type(s).__name__ == "ColorJitter"]
    assert jitter.brightness == jitter.contrast == jitter.saturation == (0.6, 1.4) and jitter.hue is None
    assert not [s for s in steps if isinstance(s, RandAugment) or type(s).__name__ == "RandomErasing"]
    assert not [s for s in _steps(finetune_transform(32, auto_augment="none", color_jitter=0))
                if type(s).__name__ == "ColorJitter"]
    (ra,) = [s for s in _steps(finetune_transform(32, auto_augment="rand-m5-mstd1.0")) if isinstance(s, RandAugment)]
    assert {op.name for op in ra.ops} >= {"Posterize", "Solarize"}  # inc0: the non-increasing op variants
    assert {(op.magnitude, op.magnitude_std) for op in ra.ops} == {(5, 1.0)}
    for bad in ("autoaug-v0", "rand-q3"):
        with pytest.raises(UserError):
            finetune_transform(32, auto_augment=bad)


def test_finetune_transform_seeded_per_sample() -> None:
    """Through SeededDataset, timm's augmentation (python random, numpy, torch) is fixed by (seed, epoch, index)."""
    from fd_ref.sampler import SeededDataset

    ds = SeededDataset(SyntheticImages(4, image_size=32, transform=finetune_transform(32)), seed=3)
    a = [ds[(0, i)][0] for i in range(4)]
    b = [ds[(0, i)][0] for i in reversed(range(4))][::-1]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(ds[(1, 0)][0], a[0])


def test_eval_transform_ops_and_normalisation() -> None:
    """Resize int(size / crop_pct) bicubic (256 for 224), centre crop; ImageNet statistics by default, CLIP's
    with norm="published" (the published evaluation)."""
    resize, crop, *rest = _steps(eval_transform(224))
    assert isinstance(resize, v2.Resize) and resize.size == [256] and resize.interpolation == v2.InterpolationMode.BICUBIC
    assert isinstance(crop, v2.CenterCrop) and crop.size == (224, 224)
    for norm, (mean, std) in (("imagenet", (data.IMAGENET_MEAN, data.IMAGENET_STD)),
                              ("published", ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)))):
        (n,) = [s for s in _steps(eval_transform(224, norm=norm)) if isinstance(s, v2.Normalize)]
        assert tuple(n.mean) == mean and tuple(n.std) == std
        # an image of exactly one grey level maps to (v - mean) / std per channel
        img = Image.new("RGB", (40, 30), (128, 64, 200))
        out = eval_transform(16, norm=norm)(img)
        expected = (torch.tensor([128, 64, 200]) / 255 - torch.tensor(mean)) / torch.tensor(std)
        assert torch.allclose(out, expected[:, None, None].expand_as(out), atol=1e-5)
    assert eval_transform(16)(img).ne(eval_transform(16, norm="published")(img)).all()
    with pytest.raises(UserError):
        eval_transform(16, crop_pct=0)
    with pytest.raises(UserError):
        eval_transform(16, norm="clip400m")


def test_probe_transform_ops() -> None:
    """data/data_linear.py: single-draw RandomResizedCrop(0.08-1, 3/4-4/3, bicubic) + flip + ImageNet norm."""
    crop, flip, *rest = _steps(probe_transform(224))
    assert isinstance(crop, SingleDrawResizedCrop) and crop.size == 224
    assert crop.scale == (0.08, 1.0) and crop.ratio == pytest.approx((3 / 4, 4 / 3))
    assert crop.interpolation == v2.InterpolationMode.BICUBIC
    assert isinstance(flip, v2.RandomHorizontalFlip)
    (n,) = [s for s in rest if isinstance(s, v2.Normalize)]
    assert tuple(n.mean) == data.IMAGENET_MEAN and tuple(n.std) == data.IMAGENET_STD
    assert not [s for s in rest if type(s).__name__ in ("ColorJitter", "RandomErasing")]


@settings(max_examples=60, deadline=None)
@given(height=st.integers(1, 400), width=st.integers(1, 400), seed=st.integers(0, 10_000))
def test_single_draw_crop_box(height: int, width: int, seed: int) -> None:
    """The box lies inside the image; unclamped, its area is the drawn fraction of the image (up to rounding)
    and its aspect ratio within [3/4, 4/3] (up to rounding)."""
    crop = SingleDrawResizedCrop(8)
    torch.manual_seed(seed)
    top, left, h, w = crop.box(height, width)
    assert 0 <= h <= height and 0 <= w <= width
    assert 0 <= top <= height - h and 0 <= left <= width - w
    if 20 <= h < height and 20 <= w < width:  # not clamped, large enough for rounding not to matter much
        frac = h * w / (height * width)
        assert 0.08 * 0.85 <= frac <= 1.0 * 1.15
        assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1


# ------------------------------------------------------------------------------------------------ mixup / loss


def test_mixup_is_timms_with_the_published_settings() -> None:
    from timm.data import Mixup

    mix = build_mixup(1000)
    assert isinstance(mix, Mixup)
    assert (mix.mixup_alpha, mix.cutmix_alpha, mix.switch_prob, mix.mode, mix.label_smoothing, mix.mix_prob,
            mix.num_classes, mix.cutmix_minmax, mix.correct_lam) == (0.8, 1.0, 0.5, "batch", 0.1, 1.0, 1000, None, True)
    assert build_mixup(10, 0.0, 0.0) is None
    for bad in (dict(mixup=-1.0), dict(switch_prob=2.0), dict(label_smoothing=1.0)):
        with pytest.raises(UserError):
            build_mixup(10, **bad)


@settings(max_examples=40, deadline=None)
@given(half=st.integers(1, 4), classes=st.integers(2, 12), smoothing=st.floats(0, 0.5), seed=st.integers(0, 1000))
def test_mixup_targets_follow_the_hand_formula(half: int, classes: int, smoothing: float, seed: int) -> None:
    """Mixup only: image b becomes lam * x_b + (1 - lam) * x_{B-1-b}; its target is
    lam * smooth(y_b) + (1 - lam) * smooth(y_{B-1-b}), smooth(y) = one_hot(y) (1 - eps) + eps / K."""
    batch = 2 * half
    np.random.seed(seed)
    images = torch.arange(batch, dtype=torch.float64)[:, None, None, None].expand(batch, 3, 4, 4).clone()
    labels = torch.randint(0, classes, (batch,), generator=torch.Generator().manual_seed(seed))
    out, targets = build_mixup(classes, mixup=0.8, cutmix=0.0, label_smoothing=smoothing)(images.clone(), labels)
    lam = (out[0, 0, 0, 0].item() - (batch - 1)) / (0 - (batch - 1))  # out[0] = lam * 0 + (1 - lam) * (B - 1)
    hand_images = lam * images + (1 - lam) * images.flip(0)
    torch.testing.assert_close(out, hand_images)
    smooth = torch.nn.functional.one_hot(labels, classes).double() * (1 - smoothing) + smoothing / classes
    hand = lam * smooth + (1 - lam) * smooth.flip(0)
    torch.testing.assert_close(targets.double(), hand, rtol=1e-5, atol=1e-6)
    assert torch.allclose(targets.sum(1).double(), torch.ones(batch, dtype=torch.float64), atol=1e-5)


def test_cutmix_lambda_is_the_kept_area() -> None:
    np.random.seed(1)
    images = torch.stack([torch.zeros(3, 16, 16), torch.ones(3, 16, 16)])
    mix = build_mixup(2, mixup=0.0, cutmix=1.0, label_smoothing=0.0)
    for _ in range(10):
        out, targets = mix(images.clone(), torch.tensor([0, 1]))
        pasted = out[0, 0].mean().item()  # fraction of image 0 now coming from image 1
        assert targets[0, 1].item() == pytest.approx(pasted, abs=1e-6)


def _log_softmax_by_hand(z: torch.Tensor) -> torch.Tensor:
    z = z.double()
    m = z.max(dim=1, keepdim=True).values
    return z - m - torch.log(torch.exp(z - m).sum(dim=1, keepdim=True))


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 6), classes=st.integers(2, 9), smoothing=st.floats(0.01, 0.5), seed=st.integers(0, 1000))
def test_fine_tuning_losses_follow_the_hand_formulas(batch: int, classes: int, smoothing: float, seed: int) -> None:
    """build_criterion picks timm's losses as main_finetune.py does; each equals its formula."""
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(batch, classes, generator=g)
    labels = torch.randint(0, classes, (batch,), generator=g)
    soft = torch.softmax(torch.randn(batch, classes, generator=g), dim=1)
    logp = _log_softmax_by_hand(logits)

    soft_ce = build_criterion(True, smoothing)
    assert isinstance(soft_ce, SoftTargetCrossEntropy)
    expected = -(soft.double() * logp).sum(1).mean()
    assert soft_ce(logits, soft).item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)

    ls_ce = build_criterion(False, smoothing)
    assert isinstance(ls_ce, LabelSmoothingCrossEntropy)
    nll = -logp[torch.arange(batch), labels]
    expected = ((1 - smoothing) * nll + smoothing * (-logp).mean(1)).mean()
    assert ls_ce(logits, labels).item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)

    plain = build_criterion(False, 0.0)
    assert type(plain) is torch.nn.CrossEntropyLoss and plain.label_smoothing == 0.0
    assert plain(logits, labels).item() == pytest.approx(nll.mean().item(), rel=1e-5, abs=1e-6)


def test_in_memory_folder_gives_the_same_images_and_drops_bad_files(tmp_path):
    """in_memory=True decodes each file once: every item equals the decoded-from-disk item, bad files are
    dropped and counted as by scan(), the decoding is shared by a second dataset of the folder, and the
    memory limit refuses with one line."""
    rng = np.random.default_rng(0)
    for cls, n in (("a", 3), ("b", 4)):
        (tmp_path / cls).mkdir()
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (5 + i, 7, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "a" / "broken.png").write_bytes(b"not an image")
    disk = RobustImageFolder(tmp_path, verify=True)
    memory = RobustImageFolder(tmp_path, in_memory=True)
    assert memory.samples == disk.samples and memory.num_skipped == disk.num_skipped == 1
    for i in range(len(disk)):
        (a, la), (b, lb) = disk[i], memory[i]
        assert la == lb and np.array_equal(np.asarray(a), np.asarray(b))
    again = RobustImageFolder(tmp_path, in_memory=True)
    assert again._decoded is memory._decoded and again.num_skipped == 1
    (tmp_path / "b" / "9.png").write_bytes((tmp_path / "b" / "0.png").read_bytes())  # a new file set
    with pytest.raises(UserError, match="decoded; turn off --data-in-memory"):
        RobustImageFolder(tmp_path, in_memory=True, max_memory_bytes=100)
