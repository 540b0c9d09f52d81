"""Saving and loading weights safely, and the key conversions FD needs.

- ``save_atomic``: write to a temporary file in the same folder, flush to disk, then rename, so a crash
  or SIGKILL mid-write never leaves a half-written checkpoint under the real name; a full disk or a
  read-only folder becomes one :class:`UserError`, with the old file untouched and the temporary removed.
- ``load_file``: ``torch.load(weights_only=True)`` (a pickle that would run code is refused) or
  safetensors; every failure becomes one readable :class:`UserError`.
- ``expand_shared_rpb``: FD's shared relative position bias (one table for the whole student, paper
  Sec. 3.1) is copied into every block before fine-tuning, where each block then learns its own.
- ``to_timm_beit`` / ``from_timm_beit``: map an fd_ref ViT state dict to and from timm's ``Beit`` keys,
  so a distilled student drops into any timm pipeline.
"""
from __future__ import annotations

import errno
import os
import pickle
import re
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

from .errors import UserError
from .files import WRAPPER_PREFIXES, strip_prefixes, write_atomic


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` atomically (temporary file + fsync + rename). An OS error on the way (no
    space, a quota, a read-only or unwritable folder) raises :class:`UserError`; ``path`` keeps its old
    content and no temporary file stays behind."""
    path = Path(path)
    try:
        _save_atomic(obj, path)
    except OSError as e:
        reason = e.strerror or str(e)
        code = f", {errno.errorcode[e.errno]}" if e.errno in errno.errorcode else ""
        raise UserError(f"could not write {path} ({reason}{code}); the previous {path.name}, if any, is "
                        f"unchanged and no temporary file was left; free space or make {path.parent} "
                        f"writable") from None


def _save_atomic(obj: Any, path: Path) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            sink = _KeepWriteError(f)
            try:
                torch.save(obj, sink)
            except RuntimeError:
                # torch's zip writer reports a failed write as "unexpected pos ...": raise the OS error itself
                if sink.error is not None:
                    raise sink.error from None
                raise
            f.flush()
            os.fsync(f.fileno())
    write_atomic(path, write)


class _KeepWriteError:
    """A write-only file wrapper that remembers the first OSError its file raised (no space, quota, ...)."""

    def __init__(self, f) -> None:
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.f.flush()


def remove_stale_temporaries(folder: str | os.PathLike) -> int:
    """Delete ``.*.tmp`` files left by an interrupted ``save_atomic``; returns how many."""
    count = 0
    for tmp in Path(folder).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
        count += 1
    return count


def load_file(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """Load a .pt/.pth (weights only, never arbitrary code) or .safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; check the path")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file as load_safetensors
        try:
            return load_safetensors(str(path), device=str(map_location))
        except Exception as e:  # noqa: BLE001 - any parse error is the user's file
            raise UserError(f"checkpoint {path} is not a readable safetensors file ({e})") from None
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        refused = [line.strip() for line in str(e).splitlines() if "GLOBAL" in line]
        if any("yacs.config.CfgNode" in line for line in refused):  # published main_fd.py's save_checkpoint
            raise UserError(f"{path} is a training checkpoint of the published FD code: its 'config' is a yacs "
                            f"CfgNode, which a weights-only load refuses; if you trust the file, keep its weights "
                            f"(with yacs installed): python -c \"import torch; torch.save({{'model': torch.load("
                            f"'{path}', weights_only=False)['model']}}, 'weights.pth')\" and pass weights.pth"
                            ) from None
        if refused:  # the pickle names a callable (e.g. os.system) that unpickling would call
            raise UserError(f"refused to load {path}: it holds objects other than weights, which could run "
                            f"code ({refused[0][:160]}); only load checkpoints you trust, re-saved as plain "
                            f"tensors") from None
        raise UserError(f"checkpoint {path} is not a PyTorch checkpoint or is corrupt ({_reason(e)}); use "
                        f"another copy or an earlier checkpoint") from None
    except Exception as e:  # noqa: BLE001 - any other parse failure: a truncated or damaged file
        raise UserError(f"checkpoint {path} is truncated or corrupt ({_reason(e)}); use another "
                        f"copy or an earlier checkpoint") from None


def _reason(error: Exception) -> str:
    """The informative part of a loading error: its last meaningful line, first sentence, <= 120 chars."""
    lines = [line.strip() for line in str(error).splitlines()
             if line.strip() and not line.strip().startswith(("Weights only load failed", "Check the doc"))]
    if not lines:
        return "the file ends too early" if isinstance(error, EOFError) else type(error).__name__
    text = lines[-1] if "WeightsUnpickler error" in str(error) else lines[0]
    text = text.split(". ")[0].rstrip(".")[:120]
    return text if isinstance(error, (RuntimeError, pickle.UnpicklingError)) else f"{type(error).__name__}: {text}"


_WRAPPER_KEYS = ("model", "state_dict", "student", "module", "model_ema")
_PREFIXES = WRAPPER_PREFIXES + ("encoder.",)  # encoder.: some released checkpoints


def model_state(obj: Any) -> dict[str, torch.Tensor]:
    """The model weights inside a loaded checkpoint: unwraps {"model": ...}-style containers and strips
    the prefixes DDP (``module.``), torch.compile (``_orig_mod.``) and the FD wrapper (``student.``) add."""
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError("checkpoint holds no state dict of tensors (expected a dict of weights, or one "
                        "under 'model' / 'state_dict')")
    return {strip_prefixes(key, _PREFIXES): value for key, value in obj.items()}


def load_strict(model: nn.Module, state: Mapping[str, torch.Tensor], path: Any,
                what: str = "the architecture it records") -> None:
    """``model.load_state_dict(state)`` with every key required; a mismatch becomes one line (``path`` does
    not match ``what``)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
              if k in own and own[k].shape != v.shape]
    if missing or unexpected or shapes:
        detail = (f"{len(shapes)} tensors differ in shape (e.g. {shapes[0]})" if shapes else
                  f"missing {', '.join(missing[:4])}" if missing else f"unexpected {', '.join(unexpected[:4])}")
        raise UserError(f"{path} does not match {what} ({detail}); the file is damaged or was edited")
    model.load_state_dict(state, strict=True)


def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor], what: str = "model",
                 ignore: tuple[str, ...] = ()) -> str:
    """Load ``state`` into ``model`` non-strictly, refusing shape mismatches, and return a one-paragraph
    summary of missing / unexpected keys (keys matching a regex in ``ignore`` are dropped silently)."""
    own = model.state_dict()
    state = {k: v for k, v in state.items() if not any(re.fullmatch(p, k) for p in ignore)}
    mismatched = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
                  if k in own and own[k].shape != v.shape]
    if mismatched:
        raise UserError(f"{what} checkpoint is for another architecture: {len(mismatched)} tensors differ "
                        f"in shape (e.g. {mismatched[0]}); pass the matching --model / --img-size")
    result = model.load_state_dict(state, strict=False)
    if not set(state) & set(own):
        raise UserError(f"{what} checkpoint shares no parameter names with the model; is it the right file?")

    def short(keys: list[str]) -> str:
        return ", ".join(keys[:6]) + (f", ... ({len(keys)} in all)" if len(keys) > 6 else "")

    parts = [f"loaded {len(state) - len(result.unexpected_keys)} tensors into the {what}"]
    if result.missing_keys:
        parts.append(f"missing (left at init): {short(result.missing_keys)}")
    if result.unexpected_keys:
        parts.append(f"unexpected (ignored): {short(result.unexpected_keys)}")
    return "; ".join(parts)


def expand_shared_rpb(state_dict: Mapping[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """Replace the shared ``rel_pos_bias.table`` by a copy in every block,
    ``blocks.{i}.attn.rel_pos_bias.table = rel_pos_bias.table`` for i < depth (fine-tuning, Sec. 3.1)."""
    out = dict(state_dict)
    table = out.pop("rel_pos_bias.table", None)
    if table is None:
        return out
    for i in range(depth):
        out[f"blocks.{i}.attn.rel_pos_bias.table"] = table.clone()
    return out


_TO_BEIT = [
    (r"rel_pos_bias\.table", "rel_pos_bias.relative_position_bias_table"),
    (r"blocks\.(\d+)\.attn\.rel_pos_bias\.table", r"blocks.\1.attn.relative_position_bias_table"),
    (r"blocks\.(\d+)\.ls1\.gamma", r"blocks.\1.gamma_1"),
    (r"blocks\.(\d+)\.ls2\.gamma", r"blocks.\1.gamma_2"),
]


def _rename(state_dict: Mapping[str, torch.Tensor], rules: list[tuple[str, str]],
            drop: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Apply the first matching (regex, replacement) rule to each key; drop keys ending in ``drop``."""
    out = {}
    for key, value in state_dict.items():
        if drop and key.endswith(drop):
            continue
        for pattern, repl in rules:
            if re.fullmatch(pattern, key):
                key = re.sub(pattern, repl, key)
                break
        out[key] = value
    return out


def to_timm_beit(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fd_ref ViT keys -> timm ``Beit`` keys (the rest already agree)."""
    return _rename(state_dict, _TO_BEIT)


def from_timm_beit(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm ``Beit`` keys (also the BEiT / FD official release) -> fd_ref ViT keys."""
    back = [
        (r"rel_pos_bias\.relative_position_bias_table", "rel_pos_bias.table"),
        (r"blocks\.(\d+)\.attn\.relative_position_bias_table", r"blocks.\1.attn.rel_pos_bias.table"),
        (r"blocks\.(\d+)\.gamma_1", r"blocks.\1.ls1.gamma"),
        (r"blocks\.(\d+)\.gamma_2", r"blocks.\1.ls2.gamma"),
    ]
    return _rename(state_dict, back, drop=("relative_position_index", "k_bias"))  # derived buffers


def from_timm_vit(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm ``VisionTransformer`` keys (DeiT, DINO, ...) -> fd_ref ViT keys.

    timm's ViT has one bias for q, k and v; fd_ref keeps q and v biases only. Dropping the k bias is
    exact: it adds q_i . b_k to every logit of query i, a constant that the softmax over j cancels.
    """
    out = {}
    for key, value in state_dict.items():
        m = re.fullmatch(r"blocks\.(\d+)\.attn\.qkv\.bias", key)
        if m:
            q, _k, v = value.chunk(3)
            out[f"blocks.{m.group(1)}.attn.q_bias"] = q
            out[f"blocks.{m.group(1)}.attn.v_bias"] = v
        else:
            out[key] = value
    return out


def to_fd_ref_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Any supported layout (fd_ref, timm Beit / BEiT release, timm ViT) -> fd_ref ViT keys."""
    keys = set(state_dict)
    if any(k.endswith(("gamma_1", "relative_position_bias_table")) for k in keys):
        return from_timm_beit(state_dict)
    if any(k.endswith("attn.qkv.bias") for k in keys):
        return from_timm_vit(state_dict)
    return dict(state_dict)


def infer_vit_options(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The structural ``VisionTransformer`` options of a checkpoint that records no architecture (a timm
    DeiT / DINO / CLIP ViT, a BEiT release), read from its keys (any layout ``to_fd_ref_keys`` accepts):

    - ``layer_scale_init``: None without gammas (DeiT, DINO, CLIP have no layer scale); with them 1.0, a
      placeholder that the checkpoint's gammas overwrite;
    - ``qkv_bias``: a q/v (or qkv) bias is present;
    - ``patch_bias``: the patch embedding has a bias (CLIP's has none);
    - ``pre_norm``: a ``norm_pre`` LayerNorm before the first block is present. In a ViT checkpoint this
      marks an OpenAI CLIP image tower (timm's ``*_clip_*.openai``; DeiT and DINO have none), and a
      checkpoint holds no record of its activation, so the rule is: ``norm_pre`` present -> CLIP ->
      ``act_layer="quick_gelu"`` (x * sigmoid(1.702 x), the activation OpenAI CLIP was trained with) and
      ``ln_eps=1e-5`` (torch's default, CLIP's); otherwise ``"gelu"`` and 1e-6. (A CLIP-shaped model
      trained with exact GELU, e.g. some OpenCLIP releases, would need its model_config recorded.)
    """
    keys = set(to_fd_ref_keys(state_dict))
    clip = "norm_pre.weight" in keys
    return dict(
        layer_scale_init=1.0 if any(k.endswith(("ls1.gamma", "ls2.gamma")) for k in keys) else None,
        qkv_bias=any(k.endswith(("attn.q_bias", "attn.v_bias")) for k in keys),
        patch_bias="patch_embed.proj.bias" in keys,
        pre_norm=clip,
        act_layer="quick_gelu" if clip else "gelu",
        ln_eps=1e-5 if clip else 1e-6,
    )


def check_model_config(config: Mapping[str, Any], source: str | os.PathLike) -> dict[str, Any]:
    """``config`` (a checkpoint's ``model_config``) if :class:`~fd_ref.vit.VisionTransformer` accepts all its
    keys; a newer checkpoint's unknown keys raise one :class:`UserError` naming them."""
    import inspect

    from .vit import VisionTransformer

    accepted = set(inspect.signature(VisionTransformer.__init__).parameters) - {"self"}
    unknown = sorted(set(config) - accepted)
    if unknown:
        raise UserError(f"{source} records model_config keys this version of fd_ref does not know: "
                        f"{', '.join(f'{k}={config[k]!r}' for k in unknown)}; it was written by a newer "
                        f"version, so update fd_ref (or load its weights with --pretrained and --model)")
    return dict(config)


def load_vit(path: str | os.PathLike, **overrides):
    """Rebuild an fd_ref ViT from a file that records its ``model_config`` (student.pt, best.pt,
    checkpoint.pt of train.py / finetune.py) and load its weights; ``overrides`` change constructor
    arguments (e.g. ``num_classes``). Returns ``(model, summary)``."""
    from .vit import VisionTransformer

    blob = load_file(path)
    config = blob.get("model_config") if isinstance(blob, Mapping) else None
    if not config:
        raise UserError(f"{path} does not record its architecture (no model_config); build the model "
                        f"with --model and load it as --pretrained instead")
    state = model_state(blob)
    if "timm" in config:  # a timm backbone (fd_ref.timm_backbone): rebuilt from its timm name and arguments
        from .timm_backbone import load_backbone
        if config.get("linear_probe"):
            raise UserError(f"{path} is a linear probe of a timm backbone; analyse the checkpoint it was probed "
                            f"from")
        model = load_backbone({**config, **overrides}, state, path)
        return model, f"loaded timm:{config['timm']} from {Path(path).name}"
    probe_pool = config.get("probe_pool", "cls") if config.get("linear_probe") else None
    if probe_pool:  # finetune.py --linear-probe: the frozen backbone is the ViT
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
        config = {k: v for k, v in config.items() if k not in ("linear_probe", "probe_pool")}
    model = VisionTransformer(**check_model_config({**config, **overrides}, path))
    if probe_pool == "avg":  # fd_ref.probe.LinearProbe: the mean-pooling probe drops the final norm
        model.norm = torch.nn.Identity()
    summary = load_weights(model, to_fd_ref_keys(state), what=Path(path).name, ignore=(r"projection\..*",))
    return model, summary
