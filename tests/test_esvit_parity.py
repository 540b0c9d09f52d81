"""The EsViT teachers (``esvit_swin_base``, ``esvit_swin_base_s3``) compute what the published FD code computes.

``tests/swin_reference.py`` is an independent plain-torch reference of the Swin the published code loads the
released EsViT checkpoint into (``models/swin_transformer.py``, ``models/esvit.py``) and of the features it
takes (``models/feature_distillation.py``). A tiny reference with every parameter at a random, non-default
value is saved in the released file's format (Microsoft's keys under ``student`` with DDP's ``module.``,
the ``relative_position_index`` buffers, the DINO heads), loaded through ``build_teacher`` (timm's Swin, keys
mapped by ``esvit_to_timm``), and both are run on the same images.

Geometries: the maps shift in the early stages, equal the window in one stage and (64 px) fall below it in
the last, so window clipping (window = map, no shift) is exercised with a smaller relative-position table.
"""
from __future__ import annotations

import math
import re

import pytest
import torch

import fd_ref.models.teachers as teachers
import swin_reference as ref
from swin_windows import mask_windows_column_major
from fd_ref.errors import UserError
from fd_ref.models.teachers import build_teacher, esvit_to_timm

TOL = 1e-4  # max |teacher - reference| in fp32, features of order 1 (seen: 0 on CPU, where timm's unfused
#             attention runs the same operations; the margin is for fused attention and other kernels)
# name -> (img_size, network shape); maps per stage: 16, 8, 4, 2 with window 4; 24, 12, 6, 3 with window 3;
# the published 56, 28, 14, 7 with window 14 (Swin-B's geometry at 224 px, narrow and shallow)
GEOMETRIES = {
    "64px_window4": (64, dict(patch_size=4, embed_dim=8, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=4)),
    "48px_window3": (48, dict(patch_size=2, embed_dim=8, depths=(2, 2, 2, 2), num_heads=(2, 2, 4, 4), window_size=3)),
    "224px_window14": (224, dict(patch_size=4, embed_dim=8, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4),
                                 window_size=14)),
}


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Every parameter at a random value no fresh model has: norms 1 + 0.3 N, biases 0.3 N, bias tables N,
    matrices N / sqrt(fan_in)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("relative_position_bias_table"):
                p.copy_(noise)
            elif p.ndim == 1:
                p.copy_((1.0 if "norm" in name and name.endswith("weight") else 0.0) + 0.3 * noise)
            else:
                p.copy_(noise / math.sqrt(p[0].numel()))


def release(model: ref.SwinReference, path) -> str:
    """Save ``model`` as the released EsViT file (main_esvit.py's save_dict: the DDP student with its DINO heads
    under "student"; the EMA teacher, here all zeros so that loading it instead would show, under "teacher")."""
    student = {f"module.{k}": v.clone() for k, v in model.state_dict().items()}
    width = model.norm.normalized_shape[0]
    heads = ("head.mlp.0.weight", "head.last_layer.weight_g", "head_dense.mlp.0.weight")
    student.update({f"module.{k}": torch.ones(16, width) for k in heads})
    teacher = {k: torch.zeros_like(v) if v.is_floating_point() else v for k, v in student.items()}
    torch.save({"student": student, "teacher": teacher, "epoch": 300}, path)
    return str(path)


def published(shape: dict, img: int, file: str, stages: int) -> ref.SwinReference:
    """The published load_esvit: the network built with ``stages`` stages, the release loaded non-strictly."""
    args = {**shape, "depths": shape["depths"][:stages], "num_heads": shape["num_heads"][:stages]}
    model = ref.SwinReference(img, **args).eval()
    missing = ref.load_released(model, torch.load(file), pop_norm=stages == 3)
    assert missing == (["norm.weight", "norm.bias"] if stages == 3 else [])  # S3: its norm stays at 1 / 0
    return model


def gap(geometry: str, tmp_path, after_norm: bool = True, seed: int = 0) -> dict[str, float]:
    """max |teacher - published reference| for both teachers on one batch."""
    img, shape = GEOMETRIES[geometry]
    full = ref.SwinReference(img, **shape)
    randomise(full, seed)
    file = release(full, tmp_path / "checkpoint_best.pth")
    images = torch.randn(2, 3, img, img, generator=torch.Generator().manual_seed(seed + 1))
    out = {}
    for name, stages in (("esvit_swin_base", 4), ("esvit_swin_base_s3", 3)):
        teacher = build_teacher(name, img_size=img, checkpoint=file, timm_kwargs=dict(shape),
                                feat_after_norm=after_norm)
        with torch.no_grad():
            expected = published(shape, img, file, stages)(images, after_norm=after_norm)
            got = teacher(images)
        assert got.shape == expected.shape, name
        side = img // shape["patch_size"] // 2 ** (stages - 1)
        width = shape["embed_dim"] * 2 ** (stages - 1)  # published: embed_dim * 8, or * 4 with PRED_FEAT_S3
        assert (teacher.grid, teacher.embed_dim, teacher.num_prefix_tokens) == ((side, side), width, 0)
        out[name] = (got - expected).abs().max().item()
    return out


@pytest.mark.parametrize("after_norm", [True, False], ids=["after_norm", "before_norm"])
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_esvit_teachers_match_the_published_swin(geometry, after_norm, tmp_path):
    """Both teachers give the published network's features (after / before its final norm) within TOL."""
    for name, err in gap(geometry, tmp_path, after_norm).items():
        assert err <= TOL, f"{name}: max |teacher - published| = {err:.2e}"


def _transposed(fn):
    return lambda w: fn(w).T


WRONG = {  # one convention of the published Swin replaced by a plausible wrong one
    "merge_order_row_major": lambda mp: mp.setattr(ref, "MERGE_ORDER", ((0, 0), (0, 1), (1, 0), (1, 1))),
    "roll_direction": lambda mp: mp.setattr(ref, "ROLL", 1),
    "no_shift_mask": lambda mp: mp.setattr(
        ref, "shift_mask", lambda H, W, w, s: torch.zeros((H // w) * (W // w), w * w, w * w)),
    "relative_index_transposed": lambda mp: mp.setattr(ref, "relative_index", _transposed(ref.relative_index)),
    "mask_windows_column_major": lambda mp: mp.setattr(ref, "shift_mask", mask_windows_column_major(ref.shift_mask)),
    "clipped_window_keeps_its_shift": lambda mp: mp.setattr(
        ref, "window_and_shift", lambda res, w, shifted: (min(res, w), min(res, w) // 2 if shifted else 0)),
    "qk_scale_one": lambda mp: mp.setattr(ref, "QK_SCALE", 1.0),
}


@pytest.mark.parametrize("wrong", list(WRONG))
def test_parity_detects_each_convention(wrong, monkeypatch, tmp_path):
    """The comparison is sharp enough to see each convention: with one of them wrong in the reference, the
    teachers are off by far more than TOL (at 64 px each convention acts in the first three stages)."""
    WRONG[wrong](monkeypatch)
    errors = gap("64px_window4", tmp_path)
    assert min(errors.values()) > 100 * TOL, errors


def _downsample_not_moved(blob, num_stages=4):
    """Microsoft's ``layers.i.downsample`` left in stage i (the rest mapped as it should be)."""
    out = {}
    for k, v in esvit_to_timm(blob, num_stages).items():
        m = re.match(r"layers\.(\d+)\.downsample\.(.*)", k)
        out[f"layers.{int(m[1]) - 1}.downsample.{m[2]}" if m else k] = v
    return out


def _merge_blocks_reordered(blob, num_stages=4):
    """The right keys, but each merging's reduction read as if the 2 x 2 blocks came in row-major order."""
    state = esvit_to_timm(blob, num_stages)
    for k in [k for k in state if re.match(r"layers\.\d+\.downsample\.reduction\.weight", k)]:
        w = state[k]
        state[k] = w.reshape(w.shape[0], 4, -1)[:, [0, 2, 1, 3]].reshape(w.shape)
    return state


def test_wrong_mappings_fail(monkeypatch, tmp_path):
    """A mapping that leaves Microsoft's ``layers.i.downsample`` in place (timm merges at the START of stage
    i + 1) is refused at load; one that loads but reorders the merged neighbours breaks the parity."""
    monkeypatch.setattr(teachers, "esvit_to_timm", _downsample_not_moved)
    with pytest.raises(UserError, match="does not fit"):
        gap("64px_window4", tmp_path)
    monkeypatch.setattr(teachers, "esvit_to_timm", _merge_blocks_reordered)
    errors = gap("64px_window4", tmp_path)
    assert min(errors.values()) > 100 * TOL, errors
