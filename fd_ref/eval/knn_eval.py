"""``finetune.py --knn``: the weighted k-NN accuracy (fd_ref.eval.knn) of a frozen backbone on --data.

    features = the pooled feature the linear probe uses (fd_ref.models.probe.LinearProbe.features: the mean patch
               token + a LayerNorm without affine, or the normed class token with --probe-pool cls)
               of every training and every validation image, with the evaluation transform (resize, centre
               crop), in fp32 like every evaluation, in batches (only the [N, C] features are kept)
    k-NN     = each validation image classified by its k nearest training images (k 20, T 0.07)

Top-1 / top-5 go to OUTPUT/results.json and, as JSON, to the last line printed. One process does the work
(under torchrun, the other ranks return at once).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

from fd_ref.data import EVAL_NORMS, DeviceNormalize, eval_transform
from fd_ref.data.sampler import make_loader
from fd_ref.data.splits import train_val_datasets
from fd_ref.eval.knn import knn_accuracy
from fd_ref.files import write_text_atomic


@torch.no_grad()
def extract(probe: nn.Module, dataset, cfg: Mapping[str, Any],
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [N, C] float32 on the CPU, labels [N]) of every image of ``dataset`` (uint8 images,
    normalised on the device), in order."""
    loader, _ = make_loader(dataset, cfg["batch_size"], seed=0, shuffle=False, rank=0, world_size=1,
                            num_workers=cfg["num_workers"], drop_last=False)
    feats, labels = [], []
    normalize = DeviceNormalize(*EVAL_NORMS[cfg["eval_norm"]])
    for images, targets in loader:
        f = probe.features(normalize(images.to(device, non_blocking=True)))
        feats.append(f.float().cpu())
        labels.append(targets)
    return torch.cat(feats), torch.cat(labels)


def knn_evaluate(probe: nn.Module, summary: str, cfg: Mapping[str, Any], info) -> dict:
    """The k-NN evaluation of ``probe``'s backbone (module docstring); returns results.json's content."""
    if not info.is_main:
        return {}
    print(summary, flush=True)
    transform = eval_transform(cfg["img_size"], cfg["crop_pct"], norm=cfg["eval_norm"], uint8=True)
    train_set, val_set = train_val_datasets(
        cfg["data"], transform, transform, val_split=cfg["val_split"], split_seed=cfg["split_seed"],
        train_subset=cfg["train_subset"], synthetic_size=cfg["synthetic_size"], img_size=cfg["img_size"],
        seed=cfg["seed"], in_memory=cfg["data_in_memory"])
    probe.to(info.device).eval()
    train_f, train_y = extract(probe, train_set, cfg, info.device)
    val_f, val_y = extract(probe, val_set, cfg, info.device)
    num_classes = max(cfg["num_classes"], int(train_y.max()) + 1, int(val_y.max()) + 1)
    metrics = knn_accuracy(train_f, train_y, val_f, val_y, num_classes, k=cfg["knn_k"],
                           temperature=cfg["knn_temperature"])
    results = {"knn": {**metrics, "k": cfg["knn_k"], "temperature": cfg["knn_temperature"],
                       "train_images": len(train_y), "val_images": len(val_y)},
               "pretrained": cfg["pretrained"], "mode": "knn"}
    out = Path(cfg["output"])
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "results.json", json.dumps(results, indent=2))
    print(f"k-NN (k {cfg['knn_k']}, T {cfg['knn_temperature']}) on {len(val_y)} images, {len(train_y)} "
          f"neighbours: top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%  -> {out / 'results.json'}",
          flush=True)
    print(json.dumps(results["knn"]), flush=True)
    return results
