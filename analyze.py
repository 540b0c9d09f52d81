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
fd_ref.models.teachers.build_teacher (dino_vit_base, deit_vit_base, clip_vit_base, clip_vit_large, timm:<name>,
an fd_ref preset such as vit_tiny = random init), or ``teacher_name@weights_file`` for a teacher with local
weights. Teachers see --img-size pixels; fd_ref files their own recorded img_size. All models see the same
images (the validation split of --data, a seeded subset of --num-images), in eval mode, fp32, no grad.

Outputs in --output: attention_distance.png, head_similarity.png, attention_maps.png,
loss_landscape_1d.png, loss_landscape_2d.png (with --landscape-2d) and analysis.json, written last, with
every plotted number. Each file is written to a temporary name and renamed, so none is ever half-written.
The loss landscape needs a classifier head (a finetune.py model): models without one are skipped with a
note. The attention diagnostics need global attention maps (fd_ref and timm ViTs): a CNN or Swin (a timm
backbone of train.py --model timm:<name>) gets the loss landscape only, the rest skipped with one line.
Settings: DEFAULTS below <- --config YAML <- flags (``python analyze.py --help``). The models and measurements
live in fd_ref.analysis.models (equations: fd_ref.analysis.diagnostics), the figures and analysis.json in
fd_ref.analysis.report; this script reads the settings, the images and runs them.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from fd_ref.analysis.models import (Loaded, ModelSpec, attention_model, attention_statistics, head_classes,
                                    landscape_of, load_model, parse_layer, parse_model_spec, parse_model_specs,
                                    resolve_layers)
from fd_ref.analysis.plots import FIGURE as CURVES
from fd_ref.analysis.plots import draw_training_curves, read_run
from fd_ref.analysis.report import (figure_distance, figure_landscape_1d, figure_landscape_2d, figure_maps,
                                    figure_similarity, write_json)
from fd_ref.cli import run_main
from fd_ref.config import resolve_config
from fd_ref.errors import UserError
from fd_ref.files import parse_bool

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

DEFINITIONS = {
    "layers": "layer numbers are 1-based (layer 1 = the first transformer block); per-layer lists start "
              "at layer 1",
    "attention_distance": "[layer][head], pixels of the model's input: mean over images and query patches "
                          "of sum_j a_ij * ||p_i - p_j||_2 with p the patch centres and a the patch-to-patch "
                          "attention renormalised to sum 1 per query (class token excluded); "
                          "fd_ref.analysis.diagnostics.attention_distance",
    "head_similarity": "[layer]: cosine similarity between the attention maps [N, N] (class token "
                       "included) of two distinct heads of the layer, per image, averaged over images and "
                       "head pairs; lower = more diverse heads; null for single-head layers; "
                       "fd_ref.analysis.diagnostics.head_cosine_similarity",
    "average_attention_maps": "{'layers': [layer numbers], 'maps': [[N][N] per layer]}: attention "
                              "probabilities averaged over images and heads, rows = queries, columns = keys, "
                              "token 0 = class token, then patches row-major",
    "landscape": "cross-entropy (mean per image) and top-1 accuracy on the analysed images at "
                 "theta + alpha * d1 (+ beta * d2), d1, d2 filter-normalised random directions (Li et al. 2018) "
                 "drawn from a generator seeded with --seed (the 2-D d1 is the 1-D d1); "
                 "'1d': {alphas, loss, accuracy}, '2d': {alphas, betas, loss[alpha][beta], accuracy}; "
                 "non-finite values are null; {'skipped': reason} for models without a classifier head",
}


def _parse_progress(value: Any) -> bool:
    if value is None:
        return sys.stderr.isatty()
    if isinstance(value, bool):
        return value
    try:
        return parse_bool(str(value).strip())
    except ValueError:
        raise UserError(f"--progress {value!r}: expected true or false") from None


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
    if held_out:  # the same hold-out as fd_ref.data.splits.train_val_datasets carves for training and fine-tuning
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
                  "img_size": loaded.img_size, "num_classes": head_classes(loaded.model),
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
