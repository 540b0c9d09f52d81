"""Fine-tuning and linear probing (paper Sec. 4): where the value of feature distillation is measured.

    python finetune.py                   # quickstart: fine-tune out/quickstart/student.pt on the synthetic set
    python finetune.py --from-scratch    # the same model trained from random weights (a supervised baseline)
    python finetune.py --linear-probe    # frozen backbone, BatchNorm + linear head
    python finetune.py --knn             # frozen backbone, weighted k-NN (DINO's): no training
    torchrun --nproc_per_node 8 finetune.py --config configs/ft_clip_vit_base.yaml \
        --pretrained out/fd_clip_vit_base/student.pt --data /data/imagenet

Settings: DEFAULTS below <- --config YAML <- flags (``python finetune.py --help``). Outputs in --output:
checkpoint.pt (resume state), best.pt (best validation top-1), config.yaml, log.jsonl, results.json.
The loop is fd_ref.engine.Trainer, the same one train.py runs.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from fd_ref import run
from fd_ref.checkpoint import (expand_shared_rpb, infer_vit_options, load_file, load_weights, model_state,
                               to_fd_ref_keys)
from fd_ref.cli import run_main
from fd_ref.config import help_from_source, resolve_config
from fd_ref.data import build_criterion, build_mixup, eval_transform, finetune_transform, probe_transform
from fd_ref.errors import UserError
from fd_ref.files import write_text_atomic
from fd_ref.knn_eval import knn_evaluate
from fd_ref.lars import Lars
from fd_ref.loop_output import skipped_images
from fd_ref.model_file import build_vit, load_strict, read_model_file, vit_arguments
from fd_ref.optim import build_optimizer
from fd_ref.position import resize_relative_position_bias_table
from fd_ref.probe import PROBE_POOLS, LinearProbe
from fd_ref.splits import train_val_datasets
from fd_ref.swinv2_init import is_swinv2
from fd_ref.swinv2_keys import load_published_swinv2
from fd_ref.timm_backbone import (TimmBackbone, backbone_state, build_from_config, build_timm_optimizer,
                                  is_timm_config, is_timm_name, load_backbone, parse_kwargs)
from fd_ref.vit import VisionTransformer, preset_arguments

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
    knn=False,                   # no training: weighted k-NN accuracy of the frozen backbone's probe features (fd_ref.knn_eval)
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


def adapt_state(state: dict, model: VisionTransformer, source_config: dict | None) -> dict:
    """Turn a pretrained state into one for ``model``: fd_ref keys, the shared RPB copied into every
    block, relative position tables and absolute position embeddings resized to the model's grid."""
    state = to_fd_ref_keys(state)
    if "rel_pos_bias.table" in state and model.pos_embed_type == "rpb":
        state = expand_shared_rpb(state, model.depth)
    old = (tuple([source_config["img_size"] // source_config["patch_size"]] * 2)
           if source_config and {"img_size", "patch_size"} <= set(source_config) else None)
    for key, value in list(state.items()):
        if key.endswith("rel_pos_bias.table"):
            h = w = None
            if old is None:  # infer the grid from the table's length: (2H-1)^2 + 3 rows
                side = int(round((value.shape[0] - 3) ** 0.5))
                h = w = (side + 1) // 2
            grid = old or (h, w)
            if tuple(grid) != tuple(model.grid):
                state[key] = resize_relative_position_bias_table(value, grid, model.grid)
        elif key == "pos_embed" and model.pos_embed is not None and value.shape != model.pos_embed.shape:
            cls, patches = value[:, :1], value[:, 1:]
            side = int(round(patches.shape[1] ** 0.5))
            img = patches.reshape(1, side, side, -1).permute(0, 3, 1, 2)
            img = F.interpolate(img, size=model.grid, mode="bicubic", align_corners=False)
            state[key] = torch.cat([cls, img.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)
    return state


def shape_flags(cfg: dict) -> dict:
    """The ViT shape flags (``--patch-size``, ``--depth``, ``--embed-dim``, ``--num-heads``) as preset overrides."""
    return {k: cfg[k] for k in ("patch_size", "depth", "embed_dim", "num_heads")}


def build_model(cfg: dict) -> tuple[nn.Module, str]:
    """The network to fine-tune and a one-paragraph summary of what was loaded.

    A checkpoint that records its ``model_config`` (fd_ref's student.pt / best.pt) is rebuilt from it. One
    that does not (timm DeiT / DINO / OpenAI CLIP ViTs, BEiT releases: the paper's baselines) takes its
    widths from ``--model`` and the shape flags and its structure from its own keys
    (``fd_ref.checkpoint.infer_vit_options``): no gammas -> no layer scale; ``pos_embed`` -> absolute
    position embedding; ``norm_pre`` -> an OpenAI CLIP tower (pre-norm, QuickGELU, LayerNorm eps 1e-5,
    no patch-embedding bias); its k bias is dropped, exactly (it cancels in the softmax). So the loaded
    network is the published one. A tensor the model has no place for is refused, with one line. With
    ``--model timm:<name>`` such a file is a SwinV2 saved by the published FD code (:func:`build_published_swinv2`).
    """
    probe = cfg["linear_probe"]
    if cfg["from_scratch"] or not cfg["pretrained"]:
        if probe:
            raise UserError("--linear-probe needs --pretrained weights (a frozen random backbone is no probe)")
        if is_timm_name(cfg["model"]):
            model = TimmBackbone(cfg["model"], cfg["img_size"], parse_kwargs(cfg["model_kwargs"]),
                                 drop_path_rate=cfg["drop_path"])
            model.reset_classifier(cfg["num_classes"])
            return model, f"random initialisation of {cfg['model']} (from scratch), timm's classifier head"
        model = VisionTransformer(**preset_arguments(cfg["model"], **shape_flags(cfg)),
                                  img_size=cfg["img_size"], pos_embed=cfg["pos_embed"],
                                  drop_path_rate=cfg["drop_path"], layer_scale_init=cfg["layer_scale"],
                                  num_classes=cfg["num_classes"], global_pool="avg")
        return model, "random initialisation (from scratch)"
    path = cfg["pretrained"]
    if not Path(path).exists():
        raise UserError(f"pretrained weights {path} not found; run `python train.py` first, pass "
                        f"--pretrained PATH, or --from-scratch")
    blob = load_file(path)
    source = blob.get("model_config") if isinstance(blob, dict) else None
    if is_timm_config(source):
        return build_timm_model(cfg, blob, source, path)
    if not source and is_timm_name(cfg["model"]):
        return build_published_swinv2(cfg, blob, path)
    if source:  # an older model_config may lack some keys: those take the constructor's defaults
        arch = {k: source[k] for k in ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias",
                                       "layer_scale_init", "act_layer", "pre_norm", "ln_eps", "patch_bias")
                if k in source}
        pos = source.get("pos_embed", "shared_rpb")
    else:
        arch = {**preset_arguments(cfg["model"], **shape_flags(cfg)), **infer_vit_options(model_state(blob))}
        state_keys = set(model_state(blob))
        pos = "abs" if "pos_embed" in state_keys else "shared_rpb" if any(
            k.endswith("rel_pos_bias.relative_position_bias_table") or k == "rel_pos_bias.table"
            for k in state_keys) else "rpb"
    if probe:
        model = VisionTransformer(**arch, img_size=cfg["img_size"], pos_embed=pos, num_classes=0,
                                  global_pool="cls")
    else:
        model = VisionTransformer(**arch, img_size=cfg["img_size"], drop_path_rate=cfg["drop_path"],
                                  pos_embed="rpb" if pos == "shared_rpb" else pos,
                                  num_classes=cfg["num_classes"], global_pool="avg")
    # a pretrained head of another task and the FD projection are never loaded; mean pooling drops `norm`
    ignore = (r"head\..*", r"projection\..*", r"fc_norm\..*") + (() if probe else (r"norm\..*",))
    own = set(model.state_dict()) | {"rel_pos_bias.table"}  # a shared table is placed in every block
    unplaced = [k for k in to_fd_ref_keys(model_state(blob))
                if k not in own and not any(re.fullmatch(p, k) for p in ignore)]
    if unplaced:
        swinv2 = any(".rpe_mlp." in k for k in unplaced)  # the published FD code's SwinV2
        raise UserError(f"pretrained weights {path} hold tensors fd_ref's ViT has no place for "
                        f"({', '.join(unplaced[:4])}{', ...' if len(unplaced) > 4 else ''}); "
                        + ("it is a SwinV2 of the published FD code: pass --model timm:swinv2_base_window8_256 "
                           "--model-kwargs '{window_size: 14}' (SwinV2-B) or the shape it was distilled with"
                           if swinv2 else "a ViT with other structure is not supported"))
    state = adapt_state(model_state(blob), model, source)
    summary = load_weights(model, state, what=f"model from {path}", ignore=ignore)
    if probe:
        model = LinearProbe(model, cfg["num_classes"], pool=cfg["probe_pool"])
    return model, summary


def build_timm_model(cfg: dict, blob, source: dict, path: str) -> tuple[nn.Module, str]:
    """A timm backbone's file (fd_ref.timm_backbone), rebuilt from its recorded timm name and arguments:
    fine-tuning gets timm's own classifier head (``reset_classifier``) and ``--drop-path``; the linear
    probe freezes it (features: the mean of its last map's tokens + a LayerNorm without affine, or the class
    token of a timm ViT). A classifier head in the file (a fine-tuned model) is not carried over."""
    if source.get("linear_probe"):
        raise UserError(f"{path} is a linear probe; fine-tune the checkpoint it was probed from")
    if int(source.get("img_size", cfg["img_size"])) != cfg["img_size"]:
        raise UserError(f"{path} was trained at {source.get('img_size')} px but --img-size is {cfg['img_size']}; "
                        f"pass --img-size {source.get('img_size')}")
    state = {"model." + k: v for k, v in backbone_state(source, model_state(blob)).items()}  # head, projection out
    backbone = load_backbone(source, state, path, num_classes=0,
                             drop_path_rate=0.0 if cfg["linear_probe"] else cfg["drop_path"])
    summary = f"loaded timm:{source['timm']} ({len(state)} tensors) from {path}"
    return head_or_probe(backbone, cfg, summary, "timm's classifier head")


def head_or_probe(backbone: TimmBackbone, cfg: dict, summary: str, head: str) -> tuple[nn.Module, str]:
    """A loaded timm backbone as what finetune.py trains: the linear probe on it (frozen; ``--probe-pool
    cls`` only with a class token), or the backbone with its classifier head for ``--num-classes``
    (``reset_classifier``); ``head`` names that head in the returned summary line."""
    if cfg["linear_probe"]:
        if cfg["probe_pool"] == "cls" and backbone.num_prefix_tokens == 0:
            raise UserError(f"--probe-pool cls needs a class token; timm:{backbone.timm_name} has none: use "
                            f"--probe-pool avg")
        return LinearProbe(backbone, cfg["num_classes"], pool=cfg["probe_pool"]), summary
    backbone.reset_classifier(cfg["num_classes"])
    return backbone, summary + f", {head} for {cfg['num_classes']} classes"


def build_published_swinv2(cfg: dict, blob, path: str) -> tuple[nn.Module, str]:
    """A SwinV2 saved by the published FD code (its ``main_fd.py`` checkpoint, or the encoder's state dict),
    which records no architecture: the timm SwinV2 ``--model`` / ``--model-kwargs`` / ``--img-size`` name (the
    published SwinV2-B: ``timm:swinv2_base_window8_256`` with ``{window_size: 14}`` at 224 px), loaded as the
    published fine-tuning loads it (:mod:`fd_ref.swinv2_keys`: the encoder only, the projection, the teacher
    and any head dropped, every backbone tensor required), then a fresh head drawn as published (or the
    linear probe), as for fd-ref's own timm students (:func:`build_timm_model`)."""
    backbone = TimmBackbone(cfg["model"], cfg["img_size"], parse_kwargs(cfg["model_kwargs"]),
                            drop_path_rate=0.0 if cfg["linear_probe"] else cfg["drop_path"])
    if not is_swinv2(backbone.model):
        raise UserError(f"{path} records no architecture; with --model {cfg['model']} (not a SwinV2) there is "
                        f"no published layout to read it in: a timm model loads an fd-ref student.pt, or a "
                        f"SwinV2 saved by the published FD code with --model timm:swinv2_*; leave --model out to "
                        f"read a ViT file (timm, DeiT, DINO, CLIP, BEiT) into fd-ref's ViT")
    return head_or_probe(backbone, cfg, load_published_swinv2(backbone, blob, path), "a fresh head")


def evaluate_only(cfg: dict, info) -> dict[str, float]:
    """--eval-only: the model in --pretrained (or --resume) exactly as the file records it (architecture,
    head, fc_norm), on the validation split of --data; no training flag is needed, nothing is written."""
    path = cfg["resume"] or cfg["pretrained"]
    mf = read_model_file(path)
    if mf.num_classes == 0:
        raise UserError(f"{path} has no classification head (a distilled student?); --eval-only evaluates a "
                        f"fine-tuned model: pass --pretrained OUT/best.pt or OUT/checkpoint.pt of finetune.py")
    if mf.linear_probe:
        backbone = (build_from_config(mf.config, num_classes=0) if mf.is_timm else
                    VisionTransformer(**vit_arguments({**mf.config, "num_classes": 0})))
        model = LinearProbe(backbone, mf.num_classes, pool=mf.config.get("probe_pool", "avg"))
        load_strict(model, mf.state, mf.path)
    else:
        model = build_vit(mf)
    img_size = int(mf.config.get("img_size", cfg["img_size"]))
    transform = eval_transform(img_size, cfg["crop_pct"], norm=cfg["eval_norm"])
    _, val_set = train_val_datasets(cfg["data"], transform, transform, val_split=cfg["val_split"],
                                    split_seed=cfg["split_seed"], synthetic_size=cfg["synthetic_size"],
                                    img_size=img_size, seed=cfg["seed"])
    base = val_set.dataset if isinstance(val_set, torch.utils.data.Subset) else val_set
    data_classes = len(getattr(base, "classes", None) or [])
    if data_classes and data_classes != mf.num_classes:
        raise UserError(f"{path} classifies {mf.num_classes} classes but {cfg['data']} has {data_classes}; "
                        f"evaluate it on the data it was fine-tuned for")
    loader, _ = run.eval_loader(val_set, cfg, info)
    metrics = evaluate(model.to(info.device), loader, info.device)
    if info.is_main:
        print(f"evaluated {path} ({mf.num_classes} classes, {img_size} px) on {len(val_set)} images of "
              f"{cfg['data']}", flush=True)
        print(json.dumps(metrics), flush=True)
    return metrics


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) and cross-entropy over the (sharded) validation set, computed in float32
    whatever the training precision (published ``main_finetune.py::validate`` runs without autocast); with
    ``skipped_val_images`` when unreadable validation files were skipped (all ranks)."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(5, dtype=torch.float64, device=device)  # correct1, correct5, loss_sum, count, skipped
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
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


def main(argv=None) -> dict:
    cfg = resolve_config(DEFAULTS, argv, prog="finetune.py", description=__doc__.splitlines()[0],
                         help_text=help_from_source(__file__))
    info, precision = run.start(cfg, tensorboard=cfg["tensorboard"] and not cfg["eval_only"])
    if cfg["eval_only"]:
        return evaluate_only(cfg, info)

    if cfg["probe_pool"] not in PROBE_POOLS:
        raise UserError(f"--probe-pool must be one of {', '.join(PROBE_POOLS)}, got {cfg['probe_pool']!r}")
    if cfg["knn"]:  # the frozen backbone as the linear probe sees it, then k-NN instead of training
        return knn_evaluate(*build_model({**cfg, "linear_probe": True}), cfg, info)
    if not cfg["linear_probe"] and (cfg["mixup"] > 0 or cfg["cutmix"] > 0) and cfg["batch_size"] % 2:
        raise UserError(f"mixup/cutmix need an even --batch-size, got {cfg['batch_size']}; "
                        "pass an even one or --mixup 0 --cutmix 0")
    if cfg["linear_probe"]:  # the published linear probe: crop + flip only
        train_tf = probe_transform(cfg["img_size"])
    else:
        train_tf = finetune_transform(cfg["img_size"], auto_augment=cfg["auto_augment"],
                                      color_jitter=cfg["color_jitter"], random_erasing=cfg["random_erasing"])
    val_tf = eval_transform(cfg["img_size"], cfg["crop_pct"], norm=cfg["eval_norm"])
    train_set, val_set = train_val_datasets(
        cfg["data"], train_tf, val_tf, val_split=cfg["val_split"],
        split_seed=cfg["split_seed"], train_subset=cfg["train_subset"], synthetic_size=cfg["synthetic_size"],
        img_size=cfg["img_size"], seed=cfg["seed"], in_memory=cfg["data_in_memory"])
    base = train_set.dataset if isinstance(train_set, torch.utils.data.Subset) else train_set
    data_classes = len(getattr(base, "classes", None) or [])
    if data_classes > cfg["num_classes"]:
        raise UserError(f"the data has {data_classes} classes but --num-classes is {cfg['num_classes']}; "
                        f"pass --num-classes {data_classes}")

    model, summary = build_model(cfg)
    model.to(info.device)
    if info.is_main:
        print(summary, flush=True)
    if cfg["grad_checkpointing"] and isinstance(model, (VisionTransformer, TimmBackbone)):
        model.set_grad_checkpointing(True)
    ddp, forward = run.wrap_model(model, info, cfg)

    lrs, total_batch = run.scaled_lrs(cfg, info)
    lr = lrs["base_lr"]
    if cfg["linear_probe"]:  # published main_linear.py: LARS over the head (momentum 0.9, trust 0.001)
        optimizer = Lars(model.head.parameters(), lr=lr, weight_decay=cfg["weight_decay"])
    elif isinstance(model, TimmBackbone):  # timm's own grouping of the family's layers
        layer_decay = cfg["layer_decay"] if cfg["layer_decay"] < 1.0 else None
        optimizer = build_timm_optimizer(model, lr=lr, weight_decay=cfg["weight_decay"], layer_decay=layer_decay)
    else:
        layer_decay = cfg["layer_decay"] if cfg["layer_decay"] < 1.0 else None
        optimizer = build_optimizer(model, lr=lr, weight_decay=cfg["weight_decay"], layer_decay=layer_decay,
                                    num_layers=model.depth)
    loader, sampler = run.train_loader(train_set, cfg, info)
    val_loader, _ = run.eval_loader(val_set, cfg, info)
    scheduler = run.warmup_cosine(optimizer, lrs, sampler, cfg)
    # published main_finetune.py: timm Mixup + SoftTargetCrossEntropy (or label-smoothed / plain CE without
    # mixing); published main_linear.py: no mixing, plain cross-entropy
    mix = None if cfg["linear_probe"] else build_mixup(cfg["num_classes"], cfg["mixup"], cfg["cutmix"],
                                                       cfg["mix_switch_prob"], cfg["label_smoothing"])
    criterion = build_criterion(mix is not None, 0.0 if cfg["linear_probe"] else cfg["label_smoothing"])

    def step_fn(batch) -> torch.Tensor:
        images = batch[0].to(info.device, non_blocking=True)
        targets = batch[1].to(info.device, non_blocking=True)
        if mix is not None:
            if images.data_ptr() == batch[0].data_ptr():  # timm mixes in place: keep the loader's batch intact
                images = images.clone()
            images, targets = mix(images, targets)
        return criterion(forward(images).float(), targets)

    def on_epoch_end(epoch: int) -> dict:
        if (epoch + 1) % max(1, cfg["eval_every"]) and epoch + 1 != cfg["epochs"]:
            return {}
        return evaluate(model, val_loader, info.device)

    results_path = Path(cfg["output"]) / "results.json"
    trainer = run.begin(cfg, DEFAULTS, info, precision, total_batch, lrs, results_path, best_metric="top1",
                        step_fn=step_fn, state_module=model, optimizer=optimizer, scheduler=scheduler,
                        loader=loader, sampler=sampler, model_config=model.config, ddp=ddp,
                        on_epoch_end=on_epoch_end)
    if trainer is None:
        return json.loads(results_path.read_text())  # that run already finished: its results
    if info.is_main:
        mode = "linear probe" if cfg["linear_probe"] else "from scratch" if cfg["from_scratch"] else "fine-tune"
        print(f"{mode}: {len(train_set)} train / {len(val_set)} val images, {info.world_size} process(es), "
              f"{precision}, batch {total_batch}, lr {lr:.2e}", flush=True)
    history = run.fit(trainer)
    evals = [h for h in history if "top1" in h]
    final = evals[-1] if evals and evals[-1]["epoch"] == cfg["epochs"] - 1 else evaluate(
        model, val_loader, info.device)
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
