"""analyze.py's models: ``label=source`` specifications, loading each model (an fd_ref file, a teacher name,
``teacher@weights``), and the per-model measurements (attention statistics, loss landscape) built on the
equations of :mod:`fd_ref.analysis.diagnostics`."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from fd_ref.analysis.diagnostics import (attention_distance, attention_geometry, average_attention_map,
                                         collect_attention, head_cosine_similarity, loss_landscape)
from fd_ref.errors import UserError
from fd_ref.models.from_file import build_model, read_model_file
from fd_ref.models.teachers import ESVIT_NAMES, PAPER_TEACHERS, build_teacher
from fd_ref.models.timm_backbone import TimmBackbone
from fd_ref.models.vit import PRESETS


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
        mf = read_model_file(spec.path)
        if mf.linear_probe and mf.is_timm:
            raise UserError(f"{spec.path} is a linear probe of a timm backbone; analyse the checkpoint it was "
                            f"probed from")
        model, summary = build_model(mf), mf.summary
        if mf.linear_probe:  # finetune.py --linear-probe: the frozen backbone is what is analysed
            model = model.backbone
        img_size = model.img_size
        preprocess = _identity
    model = model.float().to(device).eval().requires_grad_(False)
    return Loaded(model, int(img_size), preprocess, summary)


def _identity(images: torch.Tensor) -> torch.Tensor:
    return images


def head_classes(model: nn.Module) -> int:
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
    num_classes = head_classes(loaded.model)
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
