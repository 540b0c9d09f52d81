"""An fd-ref model as a timm / Hugging Face folder that plain timm loads, with no fd-ref import:

    model = timm.create_model("local-dir:FOLDER", pretrained=True)      # or "hf-hub:USER/REPO" once pushed

The folder holds ``config.json`` (timm's ``architecture``, ``model_args`` and ``pretrained_cfg``: input
size, mean/std, interpolation, crop_pct, num_classes), ``model.safetensors`` and a ``README.md`` model card.

fd_ref's ViT is timm's ``Beit`` with other key names (``fd_ref.checkpoint.keys.to_timm_beit``):

    pos_embed "shared_rpb" (an FD student)      -> use_shared_rel_pos_bias=True, one table for all blocks
    pos_embed "rpb"        (a fine-tuned model) -> use_rel_pos_bias=True, one table per block
    pos_embed "abs"                             -> use_abs_pos_emb=True
    layer_scale_init g (or none)                -> init_values g (or None); the learned gammas are loaded
    global_pool "cls": norm, class token        -> global_pool "token" (norm on every token)
    global_pool "avg": mean of patches, fc_norm -> global_pool "avg" (fc_norm after pooling)

A timm student (``train.py --model timm:<name>``) is written as itself: ``architecture`` its timm name,
``model_args`` its recorded timm arguments, the weights those of the wrapped timm model.

Every export is checked before anything is written: the timm model and the fd_ref model run on the same
random input in fp32 and must agree (features and, with a head, logits). A model timm's ``Beit`` cannot
express (a linear probe, an option such as pre-norm or QuickGELU) is refused with one line.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN, IMAGENET_DEFAULT_STD as IMAGENET_STD

from fd_ref.errors import UserError
from fd_ref.files import current_umask
from fd_ref.models.from_file import ModelFile, build_model, read_model_file
from fd_ref.models.vit import PRESETS

BEIT_ARCHITECTURE = "beit_base_patch16_224"  # any registered Beit entry point: model_args set every size
DEFAULT_CROP_PCT = 0.875
TOLERANCE = 1e-4  # max |timm - fd_ref| allowed in the export check, relative to max(1, max |fd_ref|)


def beit_model_args(config: Mapping[str, Any], path: Path | str = "the model") -> dict[str, Any]:
    """timm ``Beit`` constructor arguments for an fd_ref ViT ``config`` (see the module docstring);
    a configuration Beit cannot express raises one :class:`UserError`."""
    def refuse(what: str) -> UserError:
        return UserError(f"{path} cannot be exported to timm's Beit: {what}")

    if "timm" in config:
        raise refuse(f"it is a timm backbone (timm:{config['timm']}), not fd_ref's ViT; export_model writes it "
                     f"as that timm model")
    if config.get("linear_probe"):
        raise refuse("it is a linear probe (BatchNorm + linear head on a frozen backbone); export the "
                     "student it was probed from")
    if config.get("pre_norm"):
        raise refuse("it has a pre-norm before the blocks (pre_norm=True, a CLIP-shaped model)")
    act = config.get("act_layer", "gelu")
    if act not in (None, "gelu"):
        raise refuse(f"its MLP uses act_layer={act!r} (Beit has exact GELU only)")
    pos = config.get("pos_embed", "shared_rpb")
    if pos not in ("shared_rpb", "rpb", "abs"):
        raise refuse(f"unknown pos_embed {pos!r}")
    pool = config.get("global_pool", "cls")
    if pool not in ("cls", "avg"):
        raise refuse(f"unknown global_pool {pool!r}")
    scale = config.get("layer_scale_init", 0.1)
    return dict(img_size=int(config.get("img_size", 224)), patch_size=int(config.get("patch_size", 16)),
                in_chans=int(config.get("in_chans", 3)), embed_dim=int(config.get("embed_dim", 768)),
                depth=int(config.get("depth", 12)), num_heads=int(config.get("num_heads", 12)),
                mlp_ratio=float(config.get("mlp_ratio", 4.0)), qkv_bias=bool(config.get("qkv_bias", True)),
                init_values=float(scale) if scale else 0.0,  # 0, not None: timm drops None arguments
                use_abs_pos_emb=pos == "abs", use_rel_pos_bias=pos == "rpb",
                use_shared_rel_pos_bias=pos == "shared_rpb",
                num_classes=int(config.get("num_classes", 0)), global_pool="avg" if pool == "avg" else "token",
                drop_path_rate=0.0)


def _training_config(mf: ModelFile) -> dict[str, Any]:
    """The training settings behind a file: recorded in it (checkpoint.pt) or config.yaml beside it."""
    if isinstance(mf.blob.get("config"), Mapping):
        return dict(mf.blob["config"])
    beside = mf.path.parent / "config.yaml"
    if beside.is_file():
        import yaml
        try:
            data = yaml.safe_load(beside.read_text())
            return data if isinstance(data, dict) else {}
        except yaml.YAMLError:
            return {}
    return {}


def _results(mf: ModelFile) -> dict[str, Any]:
    """The numbers to quote: results.json beside the file, else the metrics a best.pt records."""
    beside = mf.path.parent / "results.json"
    if beside.is_file():
        try:
            return json.loads(beside.read_text())
        except json.JSONDecodeError:
            pass
    return {"best": dict(mf.blob["metrics"])} if isinstance(mf.blob.get("metrics"), Mapping) else {}


def pretrained_cfg(args: Mapping[str, Any], crop_pct: float) -> dict[str, Any]:
    """timm's preprocessing description: fd-ref models all take ImageNet-normalised, bicubic-resized,
    centre-cropped images (fd_ref.data.eval_transform)."""
    size = args["img_size"]
    return {"input_size": [args["in_chans"], size, size], "fixed_input_size": True, "interpolation": "bicubic",
            "crop_pct": crop_pct, "crop_mode": "center", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
            "num_classes": args["num_classes"], "first_conv": "patch_embed.proj", "classifier": "head",
            "custom_load": False}


def _max_difference(fd_model: torch.nn.Module, timm_model: torch.nn.Module, args: Mapping[str, Any]) -> float:
    """max |timm - fd_ref| / max(1, max |fd_ref|) over the features (and the logits with a head), fp32."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, args["in_chans"], args["img_size"], args["img_size"], generator=gen)
    with torch.no_grad():
        pairs = [(fd_model.forward_features(x), timm_model.forward_features(x))]
        if args["num_classes"] > 0:
            pairs.append((fd_model(x), timm_model(x)))
    worst = 0.0
    for ours, theirs in pairs:
        if ours.shape != theirs.shape:
            return math.inf
        worst = max(worst, float((ours - theirs).abs().max()) / max(1.0, float(ours.abs().max())))
    return worst


def model_card(mf: ModelFile, args: Mapping[str, Any], folder_name: str, repo_id: Optional[str]) -> str:
    train_cfg, results = _training_config(mf), _results(mf)
    teacher = mf.blob.get("teacher") or train_cfg.get("teacher")
    if isinstance(teacher, (list, tuple)):  # several teachers (train.py --teacher A B): named together
        teacher = " + ".join(map(str, teacher))
    elif teacher in PRESETS and not train_cfg.get("teacher_checkpoint") and "teacher_checkpoint" in train_cfg:
        teacher = f"{teacher} (randomly initialised: a machinery check, not a real distillation)"
    kind = ("fine-tuned classifier" if args["num_classes"] > 0 else
            "feature-distilled student (backbone, no classifier)")
    name = f"hf-hub:{repo_id}" if repo_id else f"local-dir:{folder_name}"
    lines = [
        "---", "library_name: timm", "tags:", "- image-feature-extraction" if not args["num_classes"]
        else "- image-classification", "- feature-distillation", "- fd-ref", "---", "",
        f"# {repo_id or folder_name}", "",
        f"A {kind} trained with [fd-ref](https://arxiv.org/abs/2205.14141)'s Feature Distillation "
        "(Wei et al., *Contrastive Learning Rivals Masked Image Modeling in Fine-tuning via Feature "
        "Distillation*, arXiv 2205.14141), stored as timm's `Beit`.", "",
        "| | |", "|---|---|",
        f"| exported from | `{mf.path.name}` |",
        f"| teacher | {teacher or 'not recorded'} |",
        f"| architecture | ViT, {args['depth']} blocks, width {args['embed_dim']}, {args['num_heads']} heads, "
        f"patch {args['patch_size']}, {args['img_size']} px |",
        "| position | " + ("one relative position bias table shared by all blocks" if args["use_shared_rel_pos_bias"]
                           else "a relative position bias table per block" if args["use_rel_pos_bias"]
                           else "absolute embedding") + " |",
        f"| layer scale | {args['init_values'] if args['init_values'] else 'none'} (initial value) |",
        f"| pooling | {'mean of patch tokens + fc_norm' if args['global_pool'] == 'avg' else 'class token'} |",
        f"| classes | {args['num_classes'] or 'none (features only)'} |",
        "| input | ImageNet mean/std, bicubic resize, centre crop |",
    ]
    recipe_keys = ("data", "epochs", "batch_size", "accum_steps", "lr", "weight_decay", "layer_decay",
                   "drop_path", "whiten", "beta", "total_batch", "lr_scaled", "mode")
    recipe = {k: train_cfg[k] for k in recipe_keys if k in train_cfg}
    if recipe:
        lines += ["", "## Recipe", "", "| setting | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in recipe.items()]
    if results:
        lines += ["", "## Results", "", "```json", json.dumps(results, indent=2, sort_keys=True)[:4000], "```"]
    lines += ["", "## Use", "", "```python", "import timm, torch", "",
              f'model = timm.create_model("{name}", pretrained=True).eval()',
              "cfg = timm.data.resolve_data_config({}, model=model)",
              "transform = timm.data.create_transform(**cfg)        # resize, crop, normalise as in training",
              "with torch.no_grad():"]
    if args["num_classes"]:
        lines += ["    logits = model(transform(image).unsqueeze(0))   # image: a PIL image"]
    else:
        lines += ["    tokens = model.forward_features(transform(image).unsqueeze(0))  # [1, 1 + N, C]",
                  "",
                  "# fine-tune it: a new head on top of the class token",
                  f'clf = timm.create_model("{name}", pretrained=True, num_classes=1000)']
    lines += ["```", ""]
    return "\n".join(lines)


def _write_folder(folder: Path, state: Mapping[str, torch.Tensor], config: Mapping[str, Any], card: str) -> None:
    """config.json, model.safetensors and README.md, written into a temporary folder next to ``folder`` that
    then takes its place (an existing ``folder`` is swapped out): on any failure nothing is left behind."""
    from safetensors.torch import save_file

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        save_file(dict(state), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "README.md").write_text(card)
        umask = current_umask()
        for path in tmp.iterdir():  # mkdtemp / safetensors create private files; give the usual permissions
            path.chmod(0o666 & ~umask)
        tmp.chmod(0o777 & ~umask)
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            folder.rename(old)
            tmp.rename(folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _timm_model_args(name: str, kwargs: Mapping[str, Any], img_size: int, num_classes: int) -> dict[str, Any]:
    """The ``timm.create_model`` arguments that rebuild a timm student: its recorded kwargs, its class count,
    and ``img_size`` where the model takes one (CNNs do not)."""
    import timm

    args = {**dict(kwargs or {}), "num_classes": int(num_classes)}
    try:
        timm.create_model(name, pretrained=False, **{"img_size": img_size, **args})
        return {"img_size": img_size, **args}
    except TypeError as e:
        if "img_size" not in str(e):
            raise
        return args


def _export_timm_backbone(mf: ModelFile, folder: Path, repo_id: Optional[str]) -> dict[str, Any]:
    """A timm student (``train.py --model timm:<name>``, fine-tuned or not) as itself: architecture = its
    timm name, model_args = its recorded kwargs, the weights of the wrapped timm model. Checked like the
    ViT export: timm's model rebuilt from config.json must give the same features and logits."""
    import timm

    backbone = build_model(mf)
    inner, name = backbone.model, str(mf.config["timm"])
    img_size = int(mf.config.get("img_size") or 224)
    args = _timm_model_args(name, mf.config.get("timm_kwargs") or {}, img_size, backbone.num_classes)
    rebuilt = timm.create_model(name, pretrained=False, **args).eval()
    rebuilt.load_state_dict(inner.state_dict(), strict=True)
    x = torch.randn(2, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pairs = [(inner.forward_features(x), rebuilt.forward_features(x)), (inner(x), rebuilt(x))]
    difference = max(float((a - b).abs().max()) / max(1.0, float(a.abs().max())) for a, b in pairs)
    if not difference <= TOLERANCE:
        raise UserError(f"{mf.path} cannot be exported as timm's {name}: the rebuilt model differs by "
                        f"{difference:.2e} (> {TOLERANCE:g})")
    crop_pct = float(_training_config(mf).get("crop_pct") or DEFAULT_CROP_PCT)
    cfg = {"input_size": [3, img_size, img_size], "interpolation": "bicubic", "crop_pct": crop_pct,
           "crop_mode": "center", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
           "num_classes": args["num_classes"]}
    config = {"architecture": name, "num_classes": args["num_classes"], "num_features": backbone.num_features,
              "model_args": {k: v for k, v in args.items() if k != "num_classes"}, "pretrained_cfg": cfg}
    load = f"hf-hub:{repo_id}" if repo_id else f"local-dir:{folder.name}"
    card = "\n".join([
        "---", "library_name: timm", "tags:", "- feature-distillation", "- fd-ref", "---", "",
        f"# {repo_id or folder.name}", "",
        f"timm's `{name}` ({'fine-tuned classifier' if args['num_classes'] else 'feature-distilled student'}) "
        "trained with fd-ref's Feature Distillation (Wei et al., arXiv 2205.14141).", "",
        f"Teacher: {mf.blob.get('teacher') or _training_config(mf).get('teacher') or 'not recorded'}. "
        f"Input: {img_size} px, ImageNet mean/std, bicubic resize, centre crop.", "",
        "```python", "import timm", f'model = timm.create_model("{load}", pretrained=True).eval()', "```", ""])
    state = {k: v.detach().contiguous().clone() for k, v in inner.state_dict().items()}
    _write_folder(folder, state, config, card)
    return {"folder": str(folder), "architecture": name, "model_args": config["model_args"],
            "max_difference": difference, "num_classes": args["num_classes"]}


def export_model(source: str | os.PathLike, folder: str | os.PathLike, *, overwrite: bool = False,
                 repo_id: Optional[str] = None) -> dict[str, Any]:
    """Write ``folder`` (config.json, model.safetensors, README.md) for the model in ``source``.

    Everything is built and checked in a temporary folder next to ``folder``, which then takes its place:
    on any failure nothing is left behind, and an existing ``folder`` is replaced only with ``overwrite``.
    Returns a summary (architecture, model_args, the checked max difference)."""
    import timm

    from fd_ref.checkpoint.keys import to_timm_beit

    source, folder = Path(source), Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder} is a file; pass a folder to export into")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise UserError(f"{folder} exists and is not empty; pass --overwrite to replace it, or another folder")
    mf = read_model_file(source)
    if "timm" in mf.config and mf.linear_probe:
        raise UserError(f"{source} cannot be exported: it is a linear probe (BatchNorm + linear head on a frozen "
                        f"backbone); export the student it was probed from")
    if "timm" in mf.config:  # a timm student: exported as that timm model
        return _export_timm_backbone(mf, folder, repo_id)
    args = beit_model_args(mf.config, source)
    fd_model = build_model(mf)
    timm_model = timm.create_model(BEIT_ARCHITECTURE, pretrained=False, **args).eval()
    result = timm_model.load_state_dict(to_timm_beit(fd_model.state_dict()), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise UserError(f"{source} cannot be exported to timm's Beit: keys do not map "
                        f"(missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]})")
    difference = _max_difference(fd_model, timm_model, args)
    if not difference <= TOLERANCE:
        raise UserError(f"{source} cannot be exported to timm's Beit: its outputs differ from fd-ref's by "
                        f"{difference:.2e} (> {TOLERANCE:g}); the model has an option Beit does not express")
    crop_pct = float(_training_config(mf).get("crop_pct") or DEFAULT_CROP_PCT)
    config = {"architecture": BEIT_ARCHITECTURE, "num_classes": args["num_classes"],
              "num_features": args["embed_dim"], "global_pool": args["global_pool"],
              "model_args": {k: v for k, v in args.items() if k != "drop_path_rate"},
              "pretrained_cfg": pretrained_cfg(args, crop_pct)}

    state = {k: v.detach().contiguous().clone() for k, v in timm_model.state_dict().items()}
    _write_folder(folder, state, config, model_card(mf, args, folder.name, repo_id))
    return {"folder": str(folder), "architecture": BEIT_ARCHITECTURE, "model_args": config["model_args"],
            "max_difference": difference, "num_classes": args["num_classes"]}


def push_to_hub(folder: str | os.PathLike, repo_id: str, private: bool = False) -> str:
    """Upload ``folder`` to the Hugging Face hub as model repo ``repo_id`` (huggingface_hub's own
    configuration: HF_TOKEN / login, HF_ENDPOINT, proxies, HF_HUB_OFFLINE). Returns the repo URL."""
    try:
        import huggingface_hub as hf
    except ImportError:
        raise UserError("--push-to-hub needs the huggingface_hub package (pip install huggingface_hub)") from None
    from fd_ref.models.hub import hub_error_message

    try:
        api = hf.HfApi()
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                          commit_message="Upload fd-ref model")
    except Exception as e:  # noqa: BLE001 - network, auth and hub errors come in many types
        raise UserError(f"could not push {folder} to the hub as {repo_id}: {hub_error_message(e)}; the folder "
                        f"is written, push it later with `huggingface-cli upload {repo_id} {folder}`") from None
    return str(url)
