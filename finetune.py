"""Fine-tuning and linear probing (paper Sec. 4): where the value of feature distillation is measured.

    python finetune.py                   # quickstart: fine-tune out/quickstart/student.pt on the synthetic set
    python finetune.py --from-scratch    # the same model trained from random weights (a supervised baseline)
    python finetune.py --linear-probe    # frozen backbone, BatchNorm + linear head
    python finetune.py --knn             # frozen backbone, weighted k-NN (DINO's): no training
    torchrun --nproc_per_node 8 finetune.py --config configs/ft_clip_vit_base.yaml \
        --pretrained out/fd_clip_vit_base/student.pt --data /data/imagenet

Settings: DEFAULTS below <- --config YAML <- flags (``python finetune.py --help``). Outputs in --output:
checkpoint.pt (resume state), best.pt (best validation top-1), config.yaml, log.jsonl, results.json.
The loop is fd_ref.engine.trainer.Trainer, the same one train.py runs.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from fd_ref.cli import run_main
from fd_ref.config import help_from_source, resolve_config
from fd_ref.data import (EVAL_NORMS, DeviceNormalize, build_criterion, build_mixup, eval_transform,
                         finetune_transform, probe_transform)
from fd_ref.data.splits import class_count, train_val_datasets
from fd_ref.engine import setup
from fd_ref.engine.job import Job, Run
from fd_ref.engine.resume import resume_or_start
from fd_ref.engine.trainer import Trainer
from fd_ref.errors import UserError
from fd_ref.eval.evaluate import eval_loader, evaluate
from fd_ref.eval.knn_eval import knn_evaluate
from fd_ref.files import write_text_atomic
from fd_ref.models.finetune_model import build_finetune_model
from fd_ref.models.from_file import build_model, read_model_file
from fd_ref.models.probe import PROBE_POOLS
from fd_ref.models.timm_backbone import TimmBackbone
from fd_ref.models.vit import VisionTransformer
from fd_ref.optim.groups import build_optimizer, build_timm_optimizer
from fd_ref.optim.lars import Lars

# ----------------------------------------------------------------------------------------------------------
# Defaults: the offline quickstart, fine-tuning the student that `python train.py` wrote.
DEFAULTS = dict(
    # data
    data="synthetic",            # synthetic | cifar10 | cifar100 | folder with train/ and val/ (or use --val-split)
    synthetic_size=1024,
    num_classes=10,
    img_size=32,
    val_split=0,                 # hold out this many training images as validation (folders without val/)
    split_seed=0,                # the hold-out is fixed by this seed, not by --seed
    train_subset=0,              # train on a fixed random subset of this size (0: all)
    num_workers=2,
    data_in_memory=False,        # decode an image folder once into memory (small images: keeps a GPU fed)
    # model
    pretrained="out/quickstart/student.pt",  # fd_ref student.pt / best.pt, timm ViT or BEiT weights
    from_scratch=False,          # ignore --pretrained: random initialisation
    linear_probe=False,          # freeze the backbone, train BatchNorm(affine=False) + linear head (LARS, plain CE)
    probe_pool="avg",            # linear probe features: avg (mean patch token + LayerNorm) | cls (normed class token)
    knn=False,                   # no training: weighted k-NN accuracy of the frozen backbone's probe features (fd_ref.eval.knn_eval)
    knn_k=20,                    # neighbours of the k-NN (DINO: 20)
    knn_temperature=0.07,        # vote weight exp(similarity / T) (DINO: 0.07)
    model="vit_tiny",            # architecture when the checkpoint does not record one (or from scratch); timm:<name> too
    model_kwargs=None,           # timm arguments of a timm:<name> model from scratch or of a published FD SwinV2 file
    patch_size=8,
    depth=4,
    embed_dim=None,
    num_heads=None,
    pos_embed="rpb",             # from scratch: rpb | abs | shared_rpb (pretrained FD students become rpb)
    drop_path=0.1,
    layer_scale=0.1,
    # recipe (the FD / BEiT fine-tuning recipe)
    epochs=3,
    batch_size=64,
    accum_steps=1,
    lr=1.25e-3,                  # per 512 images
    min_lr=2.5e-7,               # per 512 images, scaled like lr
    warmup_lr=2.5e-7,            # per 512 images, scaled like lr (published)
    warmup_epochs=1,
    layer_decay=0.6,             # lr scale decay^(L+1-layer); 1.0 switches it off
    weight_decay=0.05,
    clip_grad=5.0,               # max gradient norm (0: none)
    label_smoothing=0.1,
    mixup=0.8,
    cutmix=1.0,
    mix_switch_prob=0.5,
    auto_augment="rand-m9-mstd0.5-inc1",  # timm RandAugment string | none
    color_jitter=0.4,            # applied only with auto_augment none (timm's rule)
    random_erasing=0.25,         # probability; timm's "pixel" mode
    crop_pct=0.875,              # evaluation: resize to img_size / crop_pct, centre crop img_size
    eval_norm="imagenet",        # evaluation normalisation: imagenet | published (CLIP mean/std, as published)
    precision="auto",            # training: auto (bf16 on GPU and CPUs with native bf16, else fp32) | fp32 | bf16 | fp16; evaluation: fp32
    grad_checkpointing=False,
    compile=False,
    attention="auto",            # attention kernel: auto (FlexAttention on a CUDA GPU; SDPA, or the explicit formula where faster, on the CPU) | flex | sdpa | explicit
    nan_policy="stop",
    # run
    output="out/quickstart_ft",
    resume=None,
    allow_config_change=False,   # resume even though settings other than run control differ from the checkpoint's
    eval_only=False,             # evaluate --pretrained (or --resume) as the file records it (head included), then exit
    eval_every=1,                # evaluate every N epochs (and always after the last)
    max_steps=0,
    save_every=0,
    log_every=10,
    seed=0,
    progress=None,
    tensorboard=False,           # also write loss, lr, grad norm, img/s, MFU (and evaluation) to OUTPUT/tensorboard
)
# ----------------------------------------------------------------------------------------------------------


def evaluate_only(cfg: dict, run: Run) -> dict[str, float]:
    """--eval-only: the model in --pretrained (or --resume) exactly as the file records it (architecture,
    head, fc_norm), on the validation split of --data; no training flag is needed, nothing is written."""
    path = cfg["resume"] or cfg["pretrained"]
    model_file = read_model_file(path)
    if model_file.num_classes == 0:
        raise UserError(f"{path} has no classification head (a distilled student?); --eval-only evaluates a "
                        f"fine-tuned model: pass --pretrained OUT/best.pt or OUT/checkpoint.pt of finetune.py")
    model = build_model(model_file)  # a linear probe too: backbone, BatchNorm and head as recorded
    img_size = int(model_file.config.get("img_size", cfg["img_size"]))
    transform = eval_transform(img_size, cfg["crop_pct"], norm=cfg["eval_norm"], uint8=True)
    _, val_set = train_val_datasets(cfg["data"], transform, transform, val_split=cfg["val_split"],
                                    split_seed=cfg["split_seed"], synthetic_size=cfg["synthetic_size"],
                                    img_size=img_size, seed=cfg["seed"])
    data_classes = class_count(val_set)
    if data_classes and data_classes != model_file.num_classes:
        raise UserError(f"{path} classifies {model_file.num_classes} classes but {cfg['data']} has "
                        f"{data_classes}; evaluate it on the data it was fine-tuned for")
    loader, _ = eval_loader(val_set, run)
    info = run.info
    metrics = evaluate(model.to(info.device), loader, info.device, DeviceNormalize(*EVAL_NORMS[cfg["eval_norm"]]))
    if info.is_main:
        print(f"evaluated {path} ({model_file.num_classes} classes, {img_size} px) on {len(val_set)} images of "
              f"{cfg['data']}", flush=True)
        print(json.dumps(metrics), flush=True)
    return metrics


def main(argv=None) -> dict:
    cfg = resolve_config(DEFAULTS, argv, prog="finetune.py", description=__doc__.splitlines()[0],
                         help_text=help_from_source(__file__))
    run = setup.start_run(cfg, DEFAULTS, tensorboard=cfg["tensorboard"] and not cfg["eval_only"])
    if cfg["eval_only"]:
        return evaluate_only(cfg, run)
    info = run.info

    if cfg["probe_pool"] not in PROBE_POOLS:
        raise UserError(f"--probe-pool must be one of {', '.join(PROBE_POOLS)}, got {cfg['probe_pool']!r}")
    if cfg["knn"]:  # the frozen backbone as the linear probe sees it, then k-NN instead of training
        return knn_evaluate(*build_finetune_model({**cfg, "linear_probe": True}), cfg, info)
    if not cfg["linear_probe"] and (cfg["mixup"] > 0 or cfg["cutmix"] > 0) and cfg["batch_size"] % 2:
        raise UserError(f"mixup/cutmix need an even --batch-size, got {cfg['batch_size']}; "
                        "pass an even one or --mixup 0 --cutmix 0")
    # The loaders yield uint8 images; the DeviceNormalize objects finish them on the device (conversion,
    # normalisation, and fine-tuning's random erasing after the normalisation).
    if cfg["linear_probe"]:  # the published linear probe: crop + flip only
        train_tf, normalize = probe_transform(cfg["img_size"], uint8=True), DeviceNormalize()
    else:
        train_tf = finetune_transform(cfg["img_size"], auto_augment=cfg["auto_augment"],
                                      color_jitter=cfg["color_jitter"], random_erasing=cfg["random_erasing"],
                                      uint8=True)
        normalize = DeviceNormalize(random_erasing=cfg["random_erasing"])
    val_tf = eval_transform(cfg["img_size"], cfg["crop_pct"], norm=cfg["eval_norm"], uint8=True)
    val_normalize = DeviceNormalize(*EVAL_NORMS[cfg["eval_norm"]])
    train_set, val_set = train_val_datasets(
        cfg["data"], train_tf, val_tf, val_split=cfg["val_split"],
        split_seed=cfg["split_seed"], train_subset=cfg["train_subset"], synthetic_size=cfg["synthetic_size"],
        img_size=cfg["img_size"], seed=cfg["seed"], in_memory=cfg["data_in_memory"])
    data_classes = class_count(train_set)
    if data_classes > cfg["num_classes"]:
        raise UserError(f"the data has {data_classes} classes but --num-classes is {cfg['num_classes']}; "
                        f"pass --num-classes {data_classes}")

    model, summary = build_finetune_model(cfg)
    model.to(info.device)
    if info.is_main:
        print(summary, flush=True)
    if cfg["grad_checkpointing"] and isinstance(model, (VisionTransformer, TimmBackbone)):
        model.set_grad_checkpointing(True)
    ddp, forward = setup.wrap_model(model, run)

    lr = run.lrs["base_lr"]
    layer_decay = cfg["layer_decay"] if cfg["layer_decay"] < 1.0 else None
    if cfg["linear_probe"]:  # published main_linear.py: LARS over the head (momentum 0.9, trust 0.001)
        optimizer = Lars(model.head.parameters(), lr=lr, weight_decay=cfg["weight_decay"])
    elif isinstance(model, TimmBackbone):  # timm's own grouping of the family's layers
        optimizer = build_timm_optimizer(model, lr=lr, weight_decay=cfg["weight_decay"], layer_decay=layer_decay)
    else:
        optimizer = build_optimizer(model, lr=lr, weight_decay=cfg["weight_decay"], layer_decay=layer_decay,
                                    num_layers=model.depth)
    val_loader, _ = eval_loader(val_set, run)
    # published main_finetune.py: timm Mixup + SoftTargetCrossEntropy (or label-smoothed / plain CE without
    # mixing); published main_linear.py: no mixing, plain cross-entropy
    mix = None if cfg["linear_probe"] else build_mixup(cfg["num_classes"], cfg["mixup"], cfg["cutmix"],
                                                       cfg["mix_switch_prob"], cfg["label_smoothing"])
    criterion = build_criterion(mix is not None, 0.0 if cfg["linear_probe"] else cfg["label_smoothing"])

    def step_fn(batch) -> torch.Tensor:
        images = normalize(batch[0].to(info.device, non_blocking=True))  # uint8 -> a new tensor: mixing in place
        # leaves the loader's batch intact
        targets = batch[1].to(info.device, non_blocking=True)
        if mix is not None:
            images, targets = mix(images, targets)
        return criterion(forward(images).float(), targets)

    def on_epoch_end(epoch: int) -> dict:
        if (epoch + 1) % max(1, cfg["eval_every"]) and epoch + 1 != cfg["epochs"]:
            return {}
        return evaluate(model, val_loader, info.device, val_normalize)

    results_path = Path(cfg["output"]) / "results.json"
    trainer = Trainer(run, Job(step_fn, model, optimizer, train_set, deliverable=results_path, network=model,
                               model_config=model.config, ddp=ddp, on_epoch_end=on_epoch_end, best_metric="top1"))
    if not resume_or_start(trainer):
        return json.loads(results_path.read_text())  # that run already finished: its results
    if info.is_main:
        mode = "linear probe" if cfg["linear_probe"] else "from scratch" if cfg["from_scratch"] else "fine-tune"
        print(f"{mode}: {len(train_set)} train / {len(val_set)} val images, {info.world_size} process(es), "
              f"{run.precision}, batch {run.total_batch}, lr {lr:.2e}", flush=True)
    history = trainer.fit()
    evals = [h for h in history if "top1" in h]
    # evaluated again when the last evaluation is not in this attempt's history (a --max-steps stop, or a rerun
    # that resumed after it): the record of the uninterrupted run, with the step and the epoch of that step
    final = evals[-1] if evals and evals[-1]["epoch"] == cfg["epochs"] - 1 else {
        "step": trainer.step, "epoch": max(trainer.step - 1, 0) // trainer.steps_per_epoch,
        **evaluate(model, val_loader, info.device, val_normalize)}
    best = max([trainer.best] + [h["top1"] for h in evals])  # trainer.best: also epochs before a resume
    results = {"final": final, "best_top1": best if math.isfinite(best) else final["top1"],
               "epochs": cfg["epochs"], "steps": trainer.step, "pretrained": None if cfg["from_scratch"]
               else cfg["pretrained"], "mode": "linear_probe" if cfg["linear_probe"] else "finetune"}
    if info.is_main:
        if final.get("skipped_val_images"):
            print(f"note: {final['skipped_val_images']} unreadable validation image(s) skipped (named in the "
                  f"warnings above)", flush=True)
        write_text_atomic(results_path, json.dumps(results, indent=2))
        print(f"top-1 {final['top1']:.2f}%  top-5 {final['top5']:.2f}%  (best top-1 "
              f"{results['best_top1']:.2f}%)  -> {Path(cfg['output']) / 'results.json'}", flush=True)
    return results


if __name__ == "__main__":
    run_main(main)
