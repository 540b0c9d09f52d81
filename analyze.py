"""Section 4 diagnostics of feature distillation (Wei et al., arXiv 2205.14141), models side by side.

Attention distance per head, head diversity, average attention maps and loss landscapes, drawn for one or
more models next to each other:

    python analyze.py                                                  # the student of `python train.py`
    python analyze.py --models fd=out/quickstart/student.pt teacher=vit_tiny@teacher.pt
    python analyze.py --img-size 224 --data /data/imagenet --models \\
        dino=dino_vit_base@dino_vitbase16_pretrain.pth fd=out/fd_dino/student.pt
    python analyze.py --models base=out/ft_base/best.pt fd=out/ft_fd/best.pt --landscape-2d
    python analyze.py --log out/quickstart out/quickstart_ft      # training curves from log.jsonl

A model is ``label=source``; ``source`` is a file written by train.py / finetune.py (student.pt, best.pt,
checkpoint.pt: the architecture comes from its recorded model_config), a teacher name of
fd_ref.teachers.build_teacher (dino_vit_base, deit_vit_base, clip_vit_base, clip_vit_large, timm:<name>,
an fd_ref preset such as vit_tiny = random init), or ``teacher_name@weights_file`` for a teacher with local
weights. Teachers see --img-size pixels; fd_ref files their own recorded img_size. All models see the same
images (the validation split of --data, a seeded subset of --num-images), in eval mode, fp32, no grad.

Outputs in --output: attention_distance.png, head_similarity.png, attention_maps.png,
loss_landscape_1d.png, loss_landscape_2d.png (with --landscape-2d) and analysis.json, written last, with
every plotted number. Each file is written to a temporary name and renamed, so none is ever half-written.
The loss landscape needs a classifier head (a finetune.py model): models without one are skipped with a
note. The attention diagnostics need global attention maps (fd_ref and timm ViTs): a CNN or Swin (a timm
backbone of train.py --model timm:<name>) gets the loss landscape only, the rest skipped with one line. Settings: DEFAULTS below <- --config YAML <- flags (``python analyze.py --help``).
"""
from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from fd_ref.analysis import (
    attention_distance,
    attention_geometry,
    average_attention_map,
    collect_attention,
    head_cosine_similarity,
    loss_landscape,
)
from fd_ref.checkpoint import load_vit
from fd_ref.cli import run_main
from fd_ref.config import resolve_config
from fd_ref.errors import UserError
from fd_ref.plots import FIGURE as CURVES
from fd_ref.plots import draw_training_curves, read_run
from fd_ref.teachers import ESVIT_NAMES, PAPER_TEACHERS, build_teacher
from fd_ref.timm_backbone import TimmBackbone
from fd_ref.vit import PRESETS

# ----------------------------------------------------------------------------------------------------------
# Defaults: the student of the train.py quickstart on built-in synthetic images, fully offline.
DEFAULTS = dict(
    # models
    models=["student=out/quickstart/student.pt"],  # label=source, source: a .pt file | teacher name | name@weights
    log=[],                      # run folders (label=folder): draw their training curves from log.jsonl instead
    img_size=32,                 # input size of teachers (fd_ref files use their recorded img_size)
    # data
    data="synthetic",            # synthetic | cifar10 | cifar100 | ImageFolder path (its val/ split if any)
    num_images=64,               # images analysed (a seeded subset of the validation split)
    val_split=0,                 # >0: analyse the hold-out train.py / finetune.py carve from --data's training
                                 # images with the same --val-split N --split-seed S (images no stage trained on)
    split_seed=0,
    synthetic_classes=10,        # classes of the synthetic set (match finetune.py's for the landscape)
    batch_size=32,
    num_workers=2,
    # attention maps
    layers=["first", "middle", "last"],  # layers whose average attention map is drawn: first | middle |
                                         # last | a 1-based layer number (negative: from the end)
    # loss landscape (models with a classifier head only)
    landscape=True,
    landscape_radius=1.0,        # alpha in [-radius, radius] along filter-normalised random directions
    landscape_steps=11,          # points per direction (the 2-D grid is steps x steps)
    landscape_2d=False,          # also the 2-D landscape (steps^2 evaluations per model)
    # run
    output="out/analysis",
    dpi=120,                     # resolution of the PNG figures
    device="auto",               # auto (cuda if available) | cpu | cuda | cuda:1 ...
    seed=0,
    progress=None,               # None: progress bars on a terminal, plain lines otherwise
)
# ----------------------------------------------------------------------------------------------------------

FIGURES = dict(distance="attention_distance.png", similarity="head_similarity.png",
               maps="attention_maps.png", landscape_1d="loss_landscape_1d.png",
               landscape_2d="loss_landscape_2d.png")
JSON_NAME = "analysis.json"
_UMASK = os.umask(0o022)  # read the process umask (only settable), restored on the next line
os.umask(_UMASK)

DEFINITIONS = {
    "layers": "layer numbers are 1-based (layer 1 = the first transformer block); per-layer lists start "
              "at layer 1",
    "attention_distance": "[layer][head], pixels of the model's input: mean over images and query patches "
                          "of sum_j a_ij * ||p_i - p_j||_2 with p the patch centres and a the patch-to-patch "
                          "attention renormalised to sum 1 per query (class token excluded); "
                          "fd_ref.analysis.attention_distance",
    "head_similarity": "[layer]: cosine similarity between the attention maps [N, N] (class token "
                       "included) of two distinct heads of the layer, per image, averaged over images and "
                       "head pairs; lower = more diverse heads; null for single-head layers; "
                       "fd_ref.analysis.head_cosine_similarity",
    "average_attention_maps": "{'layers': [layer numbers], 'maps': [[N][N] per layer]}: attention "
                              "probabilities averaged over images and heads, rows = queries, columns = keys, "
                              "token 0 = class token, then patches row-major",
    "landscape": "cross-entropy (mean per image) and top-1 accuracy on the analysed images at "
                 "theta + alpha * d1 (+ beta * d2), d1, d2 filter-normalised random directions (Li et al. 2018) "
                 "drawn from a generator seeded with --seed (the 2-D d1 is the 1-D d1); "
                 "'1d': {alphas, loss, accuracy}, '2d': {alphas, betas, loss[alpha][beta], accuracy}; "
                 "non-finite values are null; {'skipped': reason} for models without a classifier head",
}


# ----------------------------------------------------------------------------------------------------------
# Model specifications
# ----------------------------------------------------------------------------------------------------------
@dataclass
class ModelSpec:
    label: str
    source: str                      # as given on the command line
    teacher: Optional[str] = None    # a build_teacher name, or None for an fd_ref file
    path: Optional[str] = None       # the fd_ref file, or the teacher's local weights


def _is_teacher_name(name: str) -> bool:
    return name.startswith("timm:") or name in PAPER_TEACHERS or name in ESVIT_NAMES or name in PRESETS


def _teacher_names() -> str:
    return ", ".join([*PAPER_TEACHERS, *ESVIT_NAMES, "timm:<name>", *PRESETS])


def parse_model_spec(text: str) -> ModelSpec:
    """``label=source`` (or a bare source, labelled by its file stem / teacher name) -> :class:`ModelSpec`.
    Checks that named files exist, so a typo fails at once, before any model runs."""
    text = str(text).strip()
    if "=" in text and not Path(text).is_file():
        label, source = (part.strip() for part in text.split("=", 1))
    else:
        label, source = "", text
    if not source:
        raise UserError(f"--models {text!r} has no source; write label=<student.pt|best.pt|checkpoint.pt> or "
                        f"label=<teacher name>[@weights]")
    name, at, weights = source.partition("@")
    if _is_teacher_name(name.strip()):
        name, weights = name.strip(), weights.strip()
        if at and not weights:
            raise UserError(f"--models {text!r}: nothing after '@'; write {name}@<weights file>")
        if weights and not Path(weights).is_file():
            raise UserError(f"--models {text!r}: teacher weights {weights} do not exist; check the path")
        return ModelSpec(label or name, source, teacher=name, path=weights or None)
    if not Path(source).is_file():
        if Path(source).suffix or os.sep in source or "/" in source:
            raise UserError(f"--models {text!r}: {source} does not exist; pass a student.pt / best.pt / "
                            f"checkpoint.pt of train.py or finetune.py (run `python train.py` for the default)")
        raise UserError(f"--models {text!r}: {source!r} is neither an existing file nor a teacher name "
                        f"({_teacher_names()})")
    return ModelSpec(label or Path(source).stem, source, path=source)


def parse_model_specs(texts: list) -> list[ModelSpec]:
    if not texts:
        raise UserError("no models to analyse; pass --models label=source [label=source ...]")
    specs = [parse_model_spec(t) for t in texts]
    labels = [s.label for s in specs]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise UserError(f"--models: label {duplicates[0]!r} is used twice; give every model its own label")
    return specs


def parse_layer(token: Any) -> str | int:
    """``first`` / ``middle`` / ``last`` or a non-zero 1-based layer number (negative: from the end)."""
    text = str(token).strip().lower()
    if text in ("first", "middle", "last"):
        return text
    try:
        number = int(text)
    except ValueError:
        number = 0
    if number == 0:
        raise UserError(f"--layers {token!r}: use first, middle, last or a 1-based layer number "
                        f"(negative counts from the end)")
    return number


def resolve_layers(tokens: list[str | int], depth: int, label: str) -> list[int]:
    """Layer tokens -> distinct 0-based block indices, in the given order."""
    out: list[int] = []
    for token in tokens:
        if token == "first":
            index = 0
        elif token == "middle":
            index = depth // 2
        elif token == "last":
            index = depth - 1
        else:
            index = token - 1 if token > 0 else depth + token
            if not 0 <= index < depth:
                raise UserError(f"--layers {token}: model {label!r} has {depth} layers (1..{depth})")
        if index not in out:
            out.append(index)
    return out


def _parse_progress(value: Any) -> bool:
    if value is None:
        return sys.stderr.isatty()
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise UserError(f"--progress {value!r}: expected true or false")


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device; use auto, cpu or cuda[:i]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available here; use --device cpu")
    return device


# ----------------------------------------------------------------------------------------------------------
# Data: the same images for every model, transformed at each model's input size
# ----------------------------------------------------------------------------------------------------------
class _Transformed(Dataset):
    def __init__(self, base: Dataset, indices: list[int], transform: Callable) -> None:
        self.base, self.indices, self.transform = base, indices, transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        image, label = self.base[self.indices[i]]
        return self.transform(image), int(label)


@dataclass
class Images:
    base: Dataset
    indices: list[int]
    num_classes: Optional[int]
    cache: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)

    def batches(self, size: int, cfg: dict, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The analysed images as ``(images [B, 3, size, size], labels [B])`` batches on ``device``."""
        if size not in self.cache:
            from fd_ref.data import eval_transform
            loader = DataLoader(_Transformed(self.base, self.indices, eval_transform(size)),
                                batch_size=cfg["batch_size"], shuffle=False, num_workers=cfg["num_workers"])
            self.cache[size] = [(x.float().to(device), y.to(device)) for x, y in loader]
        return self.cache[size]


def load_images(cfg: dict) -> Images:
    from fd_ref.data import build_dataset  # torchvision: imported only once the settings are checked

    n = cfg["num_images"]
    held_out = cfg["val_split"] > 0
    base = build_dataset(cfg["data"], train=held_out, transform=None, synthetic_size=5 * n,
                         synthetic_val_size=n, synthetic_classes=cfg["synthetic_classes"],
                         synthetic_image_size=cfg["img_size"], seed=cfg["seed"])
    if held_out:  # the same hold-out as fd_ref.splits.train_val_datasets carves for training and fine-tuning
        from fd_ref.data import split_indices
        if len(base) <= cfg["val_split"]:
            raise UserError(f"--val-split {cfg['val_split']} leaves no training images out of {len(base)}")
        pool = split_indices(len(base), cfg["val_split"], cfg["split_seed"])[1]
    else:
        pool = list(range(len(base)))
    total = len(pool)
    if total > n:  # a seeded subset: image folders are sorted by class, so the first n would be one class
        generator = torch.Generator().manual_seed(cfg["seed"])
        indices = sorted(pool[i] for i in torch.randperm(total, generator=generator)[:n].tolist())
    else:
        indices = list(pool)
        if total < n:
            print(f"note: --data {cfg['data']} has {total} images, fewer than --num-images {n}; using all",
                  flush=True)
    classes = getattr(base, "classes", None)
    return Images(base, indices, len(classes) if classes is not None else None)


# ----------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Loaded:
    model: nn.Module
    img_size: int
    preprocess: Callable[[torch.Tensor], torch.Tensor]
    summary: str


def load_model(spec: ModelSpec, cfg: dict, device: torch.device) -> Loaded:
    """Build the model of ``spec`` in eval mode, fp32, frozen, on ``device``."""
    if spec.teacher is not None:
        teacher = build_teacher(spec.teacher, img_size=cfg["img_size"], checkpoint=spec.path)
        model = teacher.model
        img_size = cfg["img_size"]
        scale, shift = teacher.scale.float().to(device), teacher.shift.float().to(device)
        renormalise = teacher.renormalise

        def preprocess(images: torch.Tensor) -> torch.Tensor:  # ImageNet-normalised -> the teacher's stats
            return images * scale + shift if renormalise else images

        weights = f"weights {spec.path}" if spec.path else (
            "random init" if spec.teacher in PRESETS else "pretrained weights")
        summary = f"teacher {spec.teacher} ({weights})"
    else:
        model, summary = load_vit(spec.path)
        img_size = model.img_size
        preprocess = _identity
    model = model.float().to(device).eval().requires_grad_(False)
    return Loaded(model, int(img_size), preprocess, summary)


def _identity(images: torch.Tensor) -> torch.Tensor:
    return images


def _num_classes(model: nn.Module) -> int:
    n = getattr(model, "num_classes", 0)
    return n if isinstance(n, int) else 0


# ----------------------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------------------
_ATTENTION_PARTS = ("qkv", "num_heads", "head_dim", "scale", "q_norm", "k_norm")


def attention_model(model: nn.Module) -> tuple[Optional[nn.Module], str]:
    """The network whose global attention maps the Sec. 4 diagnostics read, or None and why not: fd_ref
    ViTs and timm ViTs (also inside an fd_ref timm backbone) have them; CNNs and windowed attention (Swin)
    have none, so only the loss landscape applies to them."""
    net = model.model if isinstance(model, TimmBackbone) else model
    if hasattr(net, "attention_maps"):
        return net, ""
    blocks = getattr(net, "blocks", None)
    if (blocks is not None and len(blocks) and hasattr(getattr(net, "patch_embed", None), "grid_size")
            and all(hasattr(getattr(b, "attn", None), n) for b in blocks for n in _ATTENTION_PARTS)):
        return net, ""
    kind = f"timm:{model.timm_name}" if isinstance(model, TimmBackbone) else type(net).__name__
    return None, f"{kind} has no global self-attention maps (a CNN, or windowed attention)"


def attention_statistics(loaded: Loaded, batches, layer_tokens, label: str, progress: bool) -> dict:
    """Per-layer attention distance [L][heads], head similarity [L] and the chosen average maps, each an
    exact image-weighted mean over the batches (every statistic is a mean over images)."""
    grid, patch = attention_geometry(loaded.model)
    distance = similarity = maps = None
    total = 0
    iterator = batches
    if progress:
        from tqdm import tqdm
        iterator = tqdm(batches, desc=f"{label}: attention", leave=False)
    for images, _ in iterator:
        attn = collect_attention(loaded.model, loaded.preprocess(images))
        b = images.shape[0]
        d = torch.stack([attention_distance(a.float(), grid, patch) for a in attn]).double()
        m = torch.stack([average_attention_map(a.float()) for a in attn]).double()
        heads = attn[0].shape[1]
        s = (torch.stack([head_cosine_similarity(a.float()) for a in attn]).double() if heads > 1 else None)
        distance = d * b if distance is None else distance + d * b
        maps = m * b if maps is None else maps + m * b
        if s is not None:
            similarity = s * b if similarity is None else similarity + s * b
        total += b
    distance, maps = distance / total, maps / total
    depth, heads = distance.shape
    chosen = resolve_layers(layer_tokens, depth, label)
    p_h, p_w = (patch, patch) if isinstance(patch, int) else patch
    return {
        "depth": depth, "heads": heads, "grid": list(grid), "patch_size": [int(p_h), int(p_w)],
        "tokens": int(maps.shape[-1]),
        "attention_distance": distance.tolist(),
        "head_similarity": (similarity / total).tolist() if similarity is not None else [None] * depth,
        "average_attention_maps": {"layers": [i + 1 for i in chosen], "maps": [maps[i].tolist() for i in chosen]},
    }


def landscape_of(loaded: Loaded, batches, data_classes: Optional[int], cfg: dict, progress: bool) -> dict:
    """1-D (and 2-D) loss landscape of a classifier: cross-entropy and accuracy per image."""
    num_classes = _num_classes(loaded.model)
    if num_classes <= 0:
        return {"skipped": "no classifier head (num_classes=0): the landscape needs a model of finetune.py"}
    if data_classes is not None and data_classes != num_classes:
        return {"skipped": f"the head has {num_classes} classes but --data has {data_classes}"}
    top_label = max(int(labels.max()) for _, labels in batches)
    if top_label >= num_classes:
        return {"skipped": f"the head has {num_classes} classes but --data has label {top_label}"}
    total = sum(int(images.shape[0]) for images, _ in batches)
    correct: list[int] = []

    def loss_fn(model: nn.Module, batch) -> torch.Tensor:
        # loss_landscape averages loss_fn over batches; sum * len(batches) / total makes that average the
        # exact per-image mean even when the last batch is smaller. Accuracy comes from the same forward.
        images, labels = batch
        logits = model(loaded.preprocess(images)).float()
        correct.append(int((logits.argmax(dim=-1) == labels).sum()))
        return F.cross_entropy(logits, labels, reduction="sum") * (len(batches) / total)

    result = {}
    for directions in ([1, 2] if cfg["landscape_2d"] else [1]):
        correct.clear()
        out = loss_landscape(loaded.model, loss_fn, batches, radius=cfg["landscape_radius"],
                             steps=cfg["landscape_steps"], directions=directions, seed=cfg["seed"],
                             progress=progress)
        # loss_fn ran once per (point, batch), points in order, batches inner: regroup the counts per point.
        per_point = len(batches)
        points = len(correct) // per_point
        if points * per_point != len(correct) or points != cfg["landscape_steps"] ** directions:
            raise RuntimeError("loss_landscape called the loss function in an unexpected pattern")
        accuracy = [sum(correct[k * per_point:(k + 1) * per_point]) / total for k in range(points)]
        if directions == 2:
            steps = cfg["landscape_steps"]
            accuracy = [accuracy[k * steps:(k + 1) * steps] for k in range(steps)]
        out["accuracy"] = accuracy
        result[f"{directions}d"] = out
    return result


# ----------------------------------------------------------------------------------------------------------
# Figures (matplotlib's object API on the Agg canvas: no display, no global pyplot state)
# ----------------------------------------------------------------------------------------------------------
def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save_atomic(write: Callable[[str], None], path: Path) -> None:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then rename it to ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _save_figure(fig, path: Path, dpi: int) -> None:
    _save_atomic(lambda tmp: fig.savefig(tmp, format="png", dpi=dpi), path)


def _finite(values) -> list[float]:
    """Non-finite values (a diverged landscape point) become NaN for plotting."""
    return [v if v is not None and math.isfinite(v) else float("nan") for v in values]


def _model_title(r: dict) -> str:
    return (f"{r['label']}\n({r['img_size']} px, patch {r['patch_size'][0]}, {r['depth']} layers x "
            f"{r['heads']} heads)")


def _integer_ticks(axis) -> None:
    from matplotlib.ticker import MaxNLocator
    axis.set_major_locator(MaxNLocator(integer=True))


def figure_distance(results: list[dict], path: Path, dpi: int = 120) -> None:
    n = len(results)
    fig = _new_figure(max(4.0, 3.6 * n), 3.8)
    axes = fig.subplots(1, n, sharey=True, squeeze=False)[0]
    for i, (ax, r) in enumerate(zip(axes, results)):
        color = f"C{i}"
        for layer, heads in enumerate(r["attention_distance"], start=1):
            ax.scatter([layer] * len(heads), heads, s=14, color=color, alpha=0.75, linewidths=0)
        means = [sum(h) / len(h) for h in r["attention_distance"]]
        ax.plot(range(1, r["depth"] + 1), means, color=color, alpha=0.4, lw=1, label="mean over heads")
        ax.set_title(_model_title(r), fontsize=9)
        ax.set_xlabel("layer")
        _integer_ticks(ax.xaxis)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    axes[0].set_ylabel("average attention distance (pixels)")
    top = max(max(max(h) for h in r["attention_distance"]) for r in results)
    axes[0].set_ylim(0, 1.08 * top if math.isfinite(top) and top > 0 else 1.0)
    fig.suptitle("Attention distance of every head (one dot per head)", fontsize=10)
    _save_figure(fig, path, dpi)


def figure_similarity(results: list[dict], path: Path, dpi: int = 120) -> None:
    fig = _new_figure(6.0, 4.0)
    ax = fig.subplots()
    for i, r in enumerate(results):
        values = [v if v is not None else float("nan") for v in r["head_similarity"]]
        ax.plot(range(1, r["depth"] + 1), values, marker="o", ms=4, color=f"C{i}", label=r["label"])
    ax.set_xlabel("layer")
    _integer_ticks(ax.xaxis)
    ax.set_ylabel("mean cosine similarity between heads")
    ax.set_title("Head similarity: cosine between the attention maps of two heads\n"
                 "(per image, averaged over images and head pairs; lower = more diverse)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save_figure(fig, path, dpi)


def figure_maps(results: list[dict], path: Path, dpi: int = 120) -> None:
    rows = len(results)
    cols = max(len(r["average_attention_maps"]["layers"]) for r in results)
    fig = _new_figure(3.2 * cols + 0.5, 3.0 * rows + 0.6)
    axes = fig.subplots(rows, cols, squeeze=False)
    for row, r in enumerate(results):
        chosen = r["average_attention_maps"]
        for col in range(cols):
            ax = axes[row][col]
            if col >= len(chosen["layers"]):
                ax.set_axis_off()
                continue
            image = ax.imshow(chosen["maps"][col], cmap="viridis", interpolation="nearest")
            fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
            ax.set_title(f"{r['label']}: layer {chosen['layers'][col]}", fontsize=9)
            ax.set_xlabel("key token", fontsize=8)
            ax.set_ylabel("query token", fontsize=8)
            ax.tick_params(labelsize=7)
            _integer_ticks(ax.xaxis)
            _integer_ticks(ax.yaxis)
    fig.suptitle("Average attention maps (mean over images and heads; token 0 = class token)", fontsize=10)
    _save_figure(fig, path, dpi)


def figure_landscape_1d(results: list[dict], path: Path, dpi: int = 120) -> None:
    fig = _new_figure(9.0, 3.8)
    ax_loss, ax_acc = fig.subplots(1, 2)
    for i, r in enumerate(results):
        one = r["landscape"]["1d"]
        ax_loss.plot(one["alphas"], _finite(one["loss"]), marker="o", ms=3, color=f"C{i}", label=r["label"])
        ax_acc.plot(one["alphas"], _finite(one["accuracy"]), marker="o", ms=3, color=f"C{i}", label=r["label"])
    ax_loss.set_ylabel("cross-entropy")
    ax_acc.set_ylabel("top-1 accuracy")
    ax_acc.set_ylim(-0.03, 1.03)
    for ax in (ax_loss, ax_acc):
        ax.set_xlabel("alpha (filter-normalised direction)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("1-D loss landscape along a random filter-normalised direction", fontsize=10)
    _save_figure(fig, path, dpi)


def figure_landscape_2d(results: list[dict], path: Path, dpi: int = 120) -> None:
    n = len(results)
    fig = _new_figure(max(4.5, 4.2 * n), 3.9)
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, r in zip(axes, results):
        two = r["landscape"]["2d"]
        # contourf wants z[row = beta][col = alpha]; the landscape is loss[alpha][beta].
        z = [[_finite(row)[j] for row in two["loss"]] for j in range(len(two["betas"]))]
        contour = ax.contourf(two["alphas"], two["betas"], z, levels=20, cmap="viridis")
        fig.colorbar(contour, ax=ax, label="cross-entropy")
        ax.plot([0], [0], marker="+", color="white", ms=10)
        ax.set_title(r["label"], fontsize=9)
        ax.set_xlabel("alpha (direction 1)")
        ax.set_ylabel("beta (direction 2)")
    fig.suptitle("2-D loss landscape (Li et al. 2018 filter-normalised directions)", fontsize=10)
    _save_figure(fig, path, dpi)


# ----------------------------------------------------------------------------------------------------------
# JSON
# ----------------------------------------------------------------------------------------------------------
def _json_safe(obj: Any) -> Any:
    """Non-finite floats -> None (strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def write_json(obj: Any, path: Path) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(_json_safe(obj), f, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
    _save_atomic(write, path)


# ----------------------------------------------------------------------------------------------------------
def _check_settings(cfg: dict) -> None:
    for key in ("num_images", "batch_size", "landscape_steps", "dpi"):
        if cfg[key] < 1:
            raise UserError(f"--{key.replace('_', '-')} must be at least 1, got {cfg[key]}")
    if cfg["num_workers"] < 0:
        raise UserError(f"--num-workers must be >= 0, got {cfg['num_workers']}")
    if not cfg["landscape_radius"] > 0 or not math.isfinite(cfg["landscape_radius"]):
        raise UserError(f"--landscape-radius must be a positive number, got {cfg['landscape_radius']}")
    if not cfg["layers"]:
        raise UserError("--layers needs at least one layer (first, middle, last or a layer number)")


def main(argv=None) -> None:
    cfg = resolve_config(DEFAULTS, argv, prog="analyze.py", description=__doc__.splitlines()[0])
    _check_settings(cfg)
    if cfg["log"]:  # training curves only: loss and lr against step, runs side by side
        runs = [read_run(str(spec)) for spec in cfg["log"]]
        path = draw_training_curves(runs, Path(cfg["output"]) / CURVES, dpi=cfg["dpi"])
        print(f"wrote: {path} ({len(runs)} run(s): {', '.join(label for label, _ in runs)})", flush=True)
        return
    specs = parse_model_specs(cfg["models"])
    layer_tokens = [parse_layer(t) for t in cfg["layers"]]
    progress = _parse_progress(cfg["progress"])
    device = _resolve_device(cfg["device"])
    output = Path(cfg["output"])
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output} is a file; pass a folder")
    torch.manual_seed(cfg["seed"])

    images = load_images(cfg)
    print(f"analysing {len(specs)} model(s) on {len(images.indices)} images of {cfg['data']} ({device})",
          flush=True)
    results: list[dict] = []
    models_iter = specs
    if progress:
        from tqdm import tqdm
        models_iter = tqdm(specs, desc="models")
    for i, spec in enumerate(models_iter, start=1):
        loaded = load_model(spec, cfg, device)
        print(f"[{i}/{len(specs)}] {spec.label}: {spec.source}: {loaded.summary}", flush=True)
        batches = images.batches(loaded.img_size, cfg, device)
        result = {"label": spec.label, "source": spec.source, "kind": "teacher" if spec.teacher else "fd_ref",
                  "img_size": loaded.img_size, "num_classes": _num_classes(loaded.model),
                  "load_summary": loaded.summary}
        net, why_not = attention_model(loaded.model)
        if net is None:
            result["attention"] = {"skipped": why_not}
            print(f"    skipped for {spec.label}: attention distance, head similarity, attention maps: {why_not}",
                  flush=True)
        else:
            with_net = Loaded(net, loaded.img_size, loaded.preprocess, loaded.summary)
            result.update(attention_statistics(with_net, batches, layer_tokens, spec.label, progress))
            means = ", ".join(f"{sum(h) / len(h):.1f}" for h in result["attention_distance"])
            print(f"    attention distance per layer (px, mean over heads): {means}", flush=True)
        if cfg["landscape"]:
            result["landscape"] = landscape_of(loaded, batches, images.num_classes, cfg, progress)
            if "skipped" in result["landscape"]:
                print(f"    note: no loss landscape for {spec.label}: {result['landscape']['skipped']}", flush=True)
            else:
                one = result["landscape"]["1d"]
                centre = one["alphas"].index(min(one["alphas"], key=abs))
                print(f"    landscape: loss {one['loss'][centre]:.4f} at alpha {one['alphas'][centre]:g}, "
                      f"{min(one['loss']):.4f}..{max(one['loss']):.4f} over +-{cfg['landscape_radius']:g}",
                      flush=True)
        else:
            result["landscape"] = None
        results.append(result)
        del loaded  # free the model before the next one
    images.cache.clear()

    # Everything is measured; now write. Figures first, analysis.json last: it lists the figures of this run.
    output.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def draw(key: str, fn: Callable[..., None], subset: list[dict]) -> None:
        path = output / FIGURES[key]
        fn(subset, path, dpi=cfg["dpi"])
        written.append(path)

    with_attention = [r for r in results if "attention_distance" in r]
    if with_attention:
        draw("distance", figure_distance, with_attention)
        draw("similarity", figure_similarity, with_attention)
        draw("maps", figure_maps, with_attention)
    else:
        print("note: no model has attention maps, so no attention figures", flush=True)
    with_landscape = [r for r in results if r["landscape"] and "1d" in r["landscape"]]
    if with_landscape:
        draw("landscape_1d", figure_landscape_1d, with_landscape)
        if cfg["landscape_2d"]:
            if cfg["landscape_steps"] >= 2:
                draw("landscape_2d", figure_landscape_2d, with_landscape)
            else:
                print("note: no 2-D landscape figure with --landscape-steps 1 (a single point)", flush=True)
    elif cfg["landscape"]:
        print("note: no model has a classifier head, so no loss landscape figure", flush=True)

    report = {"settings": {k: v for k, v in cfg.items()}, "definitions": DEFINITIONS,
              "figures": [p.name for p in written], "num_images": len(images.indices), "models": results}
    json_path = output / JSON_NAME
    write_json(report, json_path)
    written.append(json_path)
    print("wrote:", flush=True)
    for path in written:
        print(f"  {path}", flush=True)


if __name__ == "__main__":
    run_main(main)
