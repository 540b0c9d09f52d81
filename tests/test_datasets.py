"""Tests for the datasets of fd_ref.data: synthetic images, the robust image folder (every kind of good and
bad file, large images, in-memory decoding), dataset paths, CIFAR offline, train/val splits."""
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

from fd_ref.data import (
    RobustImageFolder,
    SyntheticImages,
    build_dataset,
    eval_transform,
    split_indices,
)
from fd_ref.errors import UserError
from fd_ref.data.sampler import make_loader

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
