"""Top-1 / top-5 evaluation over a (sharded) validation loader: fine-tuning's metric (paper Sec. 4)."""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from fd_ref.data.images import skipped_images
from fd_ref.data.sampler import make_loader
from fd_ref.engine.job import Run


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device,
             normalize: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) and cross-entropy over the (sharded) validation set, computed in float32
    whatever the training precision (published ``main_finetune.py::validate`` runs without autocast); with
    ``skipped_val_images`` when unreadable validation files were skipped (all ranks). ``normalize``: applied
    to each batch on the device (the loader's uint8 images -> normalised floats)."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(5, dtype=torch.float64, device=device)  # correct1, correct5, loss_sum, count, skipped
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        images = normalize(images) if normalize is not None else images
        with torch.autocast(device.type, enabled=False):
            logits = model(images)
        top5 = logits.float().topk(min(5, logits.shape[1]), dim=1).indices
        totals[0] += (top5[:, 0] == labels).sum()
        totals[1] += (top5 == labels[:, None]).any(1).sum()
        totals[2] += F.cross_entropy(logits.float(), labels, reduction="sum")
        totals[3] += len(labels)
    totals[4] = skipped_images(loader)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(totals)
    model.train(was_training)
    n = max(totals[3].item(), 1)
    metrics = {"top1": 100 * totals[0].item() / n, "top5": 100 * totals[1].item() / n,
               "val_loss": totals[2].item() / n}
    if totals[4].item():
        metrics["skipped_val_images"] = int(totals[4].item())
    return metrics


def eval_loader(dataset, run: Run):
    """The evaluation loader of a run (in order, sharded over its ranks, every image kept) and its sampler."""
    info = run.info
    return make_loader(dataset, run.batch_size, seed=run.seed, shuffle=False, rank=info.rank,
                       world_size=info.world_size, num_workers=run.num_workers, drop_last=False)
