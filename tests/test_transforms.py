"""Tests for the transforms of fd_ref.data, each against the published pipeline's ops and parameters: the
distillation crop, timm's fine-tuning pipeline (RandAugment, random erasing), the evaluation and linear-probe
transforms, the single-draw crop."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torchvision.transforms import v2

from fd_ref import data
from fd_ref.data import (
    SingleDrawResizedCrop,
    SyntheticImages,
    eval_transform,
    finetune_transform,
    pretrain_transform,
    probe_transform,
)
from fd_ref.errors import UserError


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
    from fd_ref.data.sampler import SeededDataset

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
@given(height=st.integers(1, 400), width=st.integers(1, 400), seed=st.integers(0, 10_000),
       low=st.floats(0.05, 0.5), span=st.floats(0.05, 0.5))
def test_single_draw_crop_box(height: int, width: int, seed: int, low: float, span: float) -> None:
    """The box lies inside the image; unclamped, its area fraction lies in the drawn scale range and its
    aspect ratio in [3/4, 4/3], each up to the rounding of h and w to whole pixels."""
    crop = SingleDrawResizedCrop(8, scale=(low, low + span))
    torch.manual_seed(seed)
    top, left, h, w = crop.box(height, width)
    assert 0 <= h <= height and 0 <= w <= width
    assert 0 <= top <= height - h and 0 <= left <= width - w
    if 10 <= h < height and 10 <= w < width:  # not clamped
        grow, shrink = (1 + 0.5 / h) * (1 + 0.5 / w), (1 - 0.5 / h) * (1 - 0.5 / w)
        frac = h * w / (height * width)
        assert low * shrink / grow <= frac * 1.000001 and frac <= (low + span) * grow / shrink * 1.000001
        assert 3 / 4 * (1 - 0.5 / w) / (1 + 0.5 / h) <= w / h <= 4 / 3 * (1 + 0.5 / w) / (1 - 0.5 / h)


def test_single_draw_crop_draws_once() -> None:
    """One draw per image, whatever the shape: on a 4 x 400 image no box of ratio 3/4-4/3 fits, and the
    crop keeps its draw clamped to the image (w = 4, h = round(sqrt(s A / r)) in [24, 46] for s in [0.5, 1])
    instead of retrying and falling back to a centre crop; it leaves the generator where it leaves it for
    a square image (the same number of draws)."""
    crop = SingleDrawResizedCrop(8, scale=(0.5, 1.0))
    heights, tops = set(), set()
    for seed in range(40):
        torch.manual_seed(seed)
        top, left, h, w = crop.box(400, 4)
        after_thin = torch.rand(()).item()
        torch.manual_seed(seed)
        crop.box(400, 400)
        assert torch.rand(()).item() == after_thin
        assert w == 4 and left == 0 and 24 <= h <= 46 and 0 <= top <= 400 - h
        heights.add(h)
        tops.add(top)
    assert len(heights) > 5 and len(tops) > 20


def test_single_draw_crop_box_distribution() -> None:
    """On a 1000 x 1000 image with scale (0.1, 0.5) (never clamped): the area fraction is uniform on
    (0.1, 0.5), the log aspect ratio uniform on (log 3/4, log 4/3), the corner uniform over the free
    positions (Kolmogorov-Smirnov distance of 2000 fixed-seed draws below 0.04; the 1% critical value is 0.036)."""
    crop = SingleDrawResizedCrop(8, scale=(0.1, 0.5))
    torch.manual_seed(0)
    boxes = [crop.box(1000, 1000) for _ in range(2000)]
    fractions = np.array([h * w / 1e6 for _, _, h, w in boxes])
    log_ratios = np.array([np.log(w / h) for _, _, h, w in boxes])
    corners = np.array([top / (1000 - h) for top, _, h, _ in boxes])

    def ks_uniform(x: np.ndarray, lo: float, hi: float) -> float:
        x = np.sort((x - lo) / (hi - lo))
        i = np.arange(1, len(x) + 1)
        return float(max((i / len(x) - x).max(), (x - (i - 1) / len(x)).max()))

    assert ks_uniform(fractions, 0.1, 0.5) < 0.04
    assert ks_uniform(log_ratios, np.log(3 / 4), np.log(4 / 3)) < 0.04
    assert ks_uniform(corners, 0.0, 1.0) < 0.04
    assert ks_uniform(fractions, 0.1, 0.6) > 0.1  # the check can tell another range


# -- uint8 from the loader, normalised on the device --------------------------------------------------------
def _photo(seed: int, size=(61, 47)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))


def _both(build, image: Image.Image, seed: int, normalize: data.DeviceNormalize) -> tuple[torch.Tensor, torch.Tensor]:
    """(the float pipeline's image, the uint8 pipeline's image normalised as a batch), same random draws."""
    old_tf, new_tf = build(False), build(True)
    for generator in (torch.manual_seed, random.seed, np.random.seed):  # timm's ops draw from all three
        generator(seed)
    old = old_tf(image)
    for generator in (torch.manual_seed, random.seed, np.random.seed):
        generator(seed)
    small = new_tf(image)
    assert small.dtype == torch.uint8 and type(small) is torch.Tensor
    return old, normalize(torch.stack([small, small]))[1]


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_uint8_pipelines_normalised_on_the_device_are_bit_identical(seed: int) -> None:
    """Distillation, probing and evaluation (both normalisations): the crop as uint8, then DeviceNormalize on
    the batch = torchvision's ToDtype + Normalize per image, to the bit."""
    image = _photo(seed)
    cases = [(lambda u: pretrain_transform(16, uint8=u), data.DeviceNormalize()),
             (lambda u: probe_transform(16, uint8=u), data.DeviceNormalize()),
             (lambda u: eval_transform(16, uint8=u), data.DeviceNormalize()),
             (lambda u: eval_transform(16, norm="published", uint8=u), data.DeviceNormalize(*data.EVAL_NORMS["published"]))]
    for build, normalize in cases:
        old, new = _both(build, image, seed, normalize)
        assert old.dtype == new.dtype == torch.float32
        assert torch.equal(old, new)


def test_uint8_finetune_pipeline_then_device_erasing() -> None:
    """Fine-tuning: without erasing, the uint8 pipeline + DeviceNormalize = timm's float pipeline (up to the
    last bit of ToTensor's division); with erasing, DeviceNormalize erases after normalising: erased pixels are
    N(0, 1) noise, the rest the normalised image, and about the asked share of images is erased."""
    image = _photo(3, size=(80, 64))
    old, new = _both(lambda u: finetune_transform(32, random_erasing=0.0, uint8=u), image, 5, data.DeviceNormalize())
    torch.testing.assert_close(new, old, rtol=0, atol=1e-6)
    torch.manual_seed(5)
    batch = torch.stack([finetune_transform(32, random_erasing=0.25, uint8=True)(image) for _ in range(64)])
    plain = data.DeviceNormalize()(batch)
    erased = data.DeviceNormalize(random_erasing=0.25)(batch)
    changed = (erased != plain).flatten(1).any(1)
    assert 4 <= int(changed.sum()) <= 32  # 16 expected
    assert torch.equal(erased[~changed], plain[~changed])
    noise = erased[changed][erased[changed] != plain[changed]]
    assert abs(float(noise.mean())) < 0.1 and abs(float(noise.std()) - 1) < 0.1
    with pytest.raises(UserError, match="random erasing probability"):
        data.DeviceNormalize(random_erasing=1.5)
