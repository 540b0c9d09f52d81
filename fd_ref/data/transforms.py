"""The transform pipelines, each as the published code builds it: distillation (Sec. 3 / App. A:
RandomResizedCrop + flip + normalisation), fine-tuning (timm's ``create_transform`` with the BEiT/FD recipe:
RandAugment "rand-m9-mstd0.5-inc1", random erasing 0.25), linear probing (single-draw crop + flip) and
evaluation (resize + centre crop), and the normalisation statistics (ImageNet's, OpenAI CLIP's).

Each pipeline ends either in float32 normalised images (the default) or, with ``uint8=True``, in the
8-bit images before the conversion: the training scripts load those (4x fewer bytes through the loader
workers' shared memory and the copy to the GPU, less work per worker) and finish the pipeline on the device
at the start of the step with :class:`DeviceNormalize` (conversion, normalisation and, for fine-tuning,
random erasing), as timm's prefetching loader and FFCV do. The conversion and normalisation are the same
arithmetic in the same order, so the images are bit-identical either way."""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from torchvision.transforms import v2

from fd_ref.errors import UserError

#: ImageNet's normalisation (timm's constants): every transform here, and the teachers' expected input
#: (fd_ref.models.teachers).
IMAGENET_MEAN: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN
IMAGENET_STD: tuple[float, float, float] = IMAGENET_DEFAULT_STD

# ---------------------------------------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------------------------------------

#: OpenAI CLIP's normalisation (timm's constants): what the published evaluation transform uses (see
#: :func:`eval_transform`).
CLIP_MEAN: tuple[float, float, float] = OPENAI_CLIP_MEAN
CLIP_STD: tuple[float, float, float] = OPENAI_CLIP_STD

#: Interpolation names accepted by the crop settings.
INTERPOLATIONS: dict[str, v2.InterpolationMode] = {
    "bilinear": v2.InterpolationMode.BILINEAR,
    "bicubic": v2.InterpolationMode.BICUBIC,
    "nearest": v2.InterpolationMode.NEAREST,
}
#: ``eval_transform(norm=...)``: our consistent ImageNet statistics, or the published evaluation's CLIP ones.
EVAL_NORMS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "published": (CLIP_MEAN, CLIP_STD),
}
_BICUBIC = v2.InterpolationMode.BICUBIC


def _interpolation(name: str) -> v2.InterpolationMode:
    if name not in INTERPOLATIONS:
        raise UserError(f"crop interpolation must be one of {', '.join(INTERPOLATIONS)}, got {name!r}")
    return INTERPOLATIONS[name]


def _to_normalized_tensor(mean: tuple[float, ...] = IMAGENET_MEAN,
                          std: tuple[float, ...] = IMAGENET_STD, uint8: bool = False) -> list[Any]:
    if uint8:  # DeviceNormalize does the rest, a batch at a time
        return [v2.ToImage(), v2.ToPureTensor()]
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]


class DeviceNormalize:
    """The end of a pipeline built with ``uint8=True``, applied to a whole batch on its device:

        images = (uint8 / 255 - mean) / std        computed as  x.float() * (1/255), then (x - mean) / std

    (torchvision's ``ToDtype(float32, scale=True)`` and ``Normalize``, the same operations in the same order,
    so the result is bit-identical to the per-image pipeline), then, when ``random_erasing`` > 0, timm's
    ``RandomErasing`` on the normalised batch (as in the fine-tuning pipeline: each image erased with that
    probability, ``erasing_mode`` "pixel" = per-pixel normal noise; drawn from Python's ``random`` and the
    device's generator, which checkpoints keep). A float batch is taken as already normalised and only erased.
    The mean and std live on the device once, so a step copies nothing from the host for them."""

    def __init__(self, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD,
                 random_erasing: float = 0.0, erasing_mode: str = "pixel", erasing_count: int = 1) -> None:
        if not 0 <= random_erasing <= 1:
            raise UserError(f"random erasing probability must be in [0, 1], got {random_erasing}")
        self.mean, self.std = tuple(mean), tuple(std)
        self.random_erasing, self.erasing_mode, self.erasing_count = random_erasing, erasing_mode, erasing_count
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor, Any]] = {}

    def _constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, Any]:
        if device not in self._on:
            from timm.data.random_erasing import RandomErasing
            erase = (RandomErasing(self.random_erasing, mode=self.erasing_mode, max_count=self.erasing_count,
                                   device=device) if self.random_erasing > 0 else None)
            self._on[device] = (torch.tensor(self.mean, dtype=torch.float32, device=device).view(-1, 1, 1),
                                torch.tensor(self.std, dtype=torch.float32, device=device).view(-1, 1, 1), erase)
        return self._on[device]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        mean, std, erase = self._constants(images.device)
        if images.dtype == torch.uint8:
            images = images.to(torch.float32).mul_(1.0 / 255).sub_(mean).div_(std)
        return erase(images) if erase is not None else images


def pretrain_transform(size: int, *, min_scale: float = 0.08, interpolation: str = "bilinear",
                       uint8: bool = False) -> v2.Compose:
    """Pre-training (distillation) augmentation: RandomResizedCrop + flip + ImageNet normalisation.

    FD uses only this light augmentation (Sec. 3, App. A). The crop covers a fraction of the image area drawn
    from ``[min_scale, 1]`` with aspect ratio in ``[3/4, 4/3]``, resized with ``interpolation``. The published
    code (``data/data_fd.py``) uses torchvision's default interpolation (bilinear) and ``min_scale`` = 0.08 in
    its 300-epoch configs, 0.67 (its ``config.py`` default) in the CLIP ViT-B 100-epoch one. The dataset
    yields one crop per image and the training loop feeds *the same tensor* to teacher and student.
    Output: float32 ``[3, size, size]`` (``uint8=True``: uint8, normalised later by :class:`DeviceNormalize`).
    """
    if not 0 < min_scale <= 1:
        raise UserError(f"crop min scale must be in (0, 1], got {min_scale}; the published values are 0.08 and 0.67")
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=(min_scale, 1.0), ratio=(3 / 4, 4 / 3),
                             interpolation=_interpolation(interpolation), antialias=True),
        v2.RandomHorizontalFlip(),
        *_to_normalized_tensor(uint8=uint8),
    ])


def finetune_transform(
    size: int,
    *,
    auto_augment: str = "rand-m9-mstd0.5-inc1",
    color_jitter: float = 0.4,
    random_erasing: float = 0.25,
    erasing_mode: str = "pixel",
    erasing_count: int = 1,
    uint8: bool = False,
) -> Callable[[Any], torch.Tensor]:
    """Fine-tuning augmentation: timm's ``create_transform`` with the BEiT/FD settings (App. A), as the
    published ``data/data_finetune.py`` builds it.

    In order: RandomResizedCrop(0.08-1, ratio 3/4-4/3, bicubic) + flip, timm's RandAugment ``auto_augment``
    ("rand-m9-mstd0.5-inc1": 2 ops from timm's 15, each applied with probability 0.5 at a magnitude drawn
    from N(9, 0.5) clipped to [0, 10], the "increasing" op variants, Invert and SolarizeAdd among them),
    ImageNet normalisation, and timm's RandomErasing (probability ``random_erasing``, ``erasing_mode``
    "pixel" = per-pixel normal noise). ``ColorJitter(color_jitter)`` is applied only when RandAugment is
    off (``auto_augment="none"``): timm drops colour jitter whenever RandAugment is on, so the published
    configuration (jitter 0.4 with RandAugment) applies none. 0 / "none" disables a piece.
    Takes PIL images (timm's RandAugment ops are PIL operations); randomness comes from Python's ``random``,
    NumPy and torch, which :class:`fd_ref.data.sampler.SeededDataset` seeds per sample. ``uint8=True`` stops
    after RandAugment with the uint8 image (timm's prefetcher layout): normalisation and random erasing are
    then :class:`DeviceNormalize`'s, with the same settings.
    """
    from timm.data import create_transform

    aa = None if auto_augment.strip().lower() in ("", "none") else auto_augment.strip()
    if aa is not None and not aa.startswith("rand"):
        raise UserError(f"auto_augment must be a timm RandAugment string like rand-m9-mstd0.5-inc1, or none; "
                        f"got {auto_augment!r}")
    if not 0 <= random_erasing <= 1:
        raise UserError(f"random erasing probability must be in [0, 1], got {random_erasing}")
    try:
        transform = create_transform(
            size, is_training=True, color_jitter=color_jitter if color_jitter > 0 else None, auto_augment=aa,
            re_prob=random_erasing, re_mode=erasing_mode, re_count=erasing_count, interpolation="bicubic",
            mean=IMAGENET_MEAN, std=IMAGENET_STD, use_prefetcher=uint8)
    except (AssertionError, ValueError, KeyError) as err:
        raise UserError(f"timm could not build the fine-tuning transform from auto_augment={auto_augment!r} "
                        f"({type(err).__name__}: {err}); check the string") from err
    for step in transform.transforms:
        for op in getattr(step, "ops", ()):
            if op.name.startswith("Posterize"):
                op.aug_fn = _posterize_keep_bits
    return transform


def _posterize_keep_bits(image: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's posterize op, but keeping 0 bits gives a black image instead of an error.

    timm's "PosterizeIncreasing" keeps ``4 - int(4 * m / 10)`` bits, so 0 at magnitude 10 (reached when the
    drawn N(9, 0.5) magnitude is clipped). The Pillow of the published runs turned such an image black;
    recent Pillow (13 here) raises ValueError instead, which would stop a run now and then.
    """
    from PIL import ImageOps

    if bits_to_keep >= 8:
        return image
    if bits_to_keep <= 0:
        return Image.new(image.mode, image.size)
    return ImageOps.posterize(image, bits_to_keep)


class SingleDrawResizedCrop(torch.nn.Module):
    """RandomResizedCrop with one draw and no retries (the crop of the published linear probe,
    ``data/data_linear.py``, after BYOL's TensorFlow code).

    Area fraction ``s ~ U(scale)`` and log aspect ratio ``log r ~ U(log ratio)``; then
    ``w = min(round(sqrt(s * A * r)), W)``, ``h = min(round(sqrt(s * A / r)), H)`` for an image of ``W x H``
    pixels and area ``A``, and the box's corner is uniform over the positions that keep it inside the image.
    torchvision's version instead retries up to 10 times for a box that fits and falls back to a centre crop.
    The box is resized to ``size x size``. Randomness: torch's generator.
    """

    def __init__(self, size: int, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), interpolation: str = "bicubic") -> None:
        super().__init__()
        self.size, self.scale, self.ratio = size, scale, ratio
        self.interpolation = _interpolation(interpolation)

    def box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """Draw ``(top, left, h, w)`` for an image of ``height x width`` pixels."""
        area = height * width * torch.empty(()).uniform_(*self.scale).item()
        log_ratio = torch.log(torch.tensor(self.ratio, dtype=torch.float64))
        aspect = math.exp(torch.empty((), dtype=torch.float64).uniform_(log_ratio[0].item(), log_ratio[1].item()).item())
        w = min(int(round(math.sqrt(area * aspect))), width)
        h = min(int(round(math.sqrt(area / aspect))), height)
        top = int(torch.randint(0, height - h + 1, ()).item())
        left = int(torch.randint(0, width - w + 1, ()).item())
        return top, left, h, w

    def forward(self, image: Any) -> Any:
        height, width = v2.functional.get_size(image)
        top, left, h, w = self.box(height, width)
        return v2.functional.resized_crop(image, top, left, max(h, 1), max(w, 1), [self.size, self.size],
                                          interpolation=self.interpolation, antialias=True)

    def extra_repr(self) -> str:
        return f"size={self.size}, scale={self.scale}, ratio={self.ratio}, interpolation={self.interpolation.value}"


def probe_transform(size: int, uint8: bool = False) -> v2.Compose:
    """Linear-probe augmentation (published ``data/data_linear.py``): :class:`SingleDrawResizedCrop`
    (0.08-1, bicubic) + flip + ImageNet normalisation. No RandAugment, colour jitter, erasing or mixing."""
    return v2.Compose([SingleDrawResizedCrop(size), v2.RandomHorizontalFlip(), *_to_normalized_tensor(uint8=uint8)])


def eval_transform(size: int, crop_pct: float = 0.875, norm: str = "imagenet", uint8: bool = False) -> v2.Compose:
    """Evaluation: resize the short side to ``int(size / crop_pct)`` (bicubic; 256 for 224), centre-crop
    ``size``, normalise.

    ``norm="imagenet"`` (default) normalises with the ImageNet statistics training uses. The published
    evaluation (``data/data_finetune.py`` and ``data/data_linear.py``, ``build_transform``) normalises with
    CLIP's mean/std although its training transforms use ImageNet's, and its published top-1 figures were
    measured that way: ``norm="published"`` reproduces it, for side-by-side comparison.
    """
    if not 0 < crop_pct <= 1:
        raise UserError(f"crop_pct must be in (0, 1], got {crop_pct}; 0.875 is the usual value")
    if norm not in EVAL_NORMS:
        raise UserError(f"eval normalisation must be one of {', '.join(EVAL_NORMS)}, got {norm!r}")
    return v2.Compose([
        v2.Resize(int(size / crop_pct), interpolation=_BICUBIC, antialias=True),
        v2.CenterCrop(size),
        *_to_normalized_tensor(*EVAL_NORMS[norm], uint8=uint8),
    ])
