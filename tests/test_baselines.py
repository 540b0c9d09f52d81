"""The paper's baselines ("teacher fine-tuned") must be the published networks: a timm DeiT-, DINO- or
OpenAI-CLIP-shaped checkpoint (no recorded architecture) loads through finetune.build_finetune_model into a model
that computes the same function as timm's, before any training:

- the linear-probe backbone (class-token pooling, final norm kept) gives timm's ``forward_features``,
  i.e. every token after the final norm;
- the fine-tuning model (mean pooling: the final norm makes way for a fresh ``fc_norm``, as published) gives
  timm's tokens before that final norm;

with no layer scale where the checkpoint has none, CLIP's ``norm_pre`` placed, QuickGELU for CLIP, and no
tensor left unplaced. The comparisons run in fp32; each also shows that the old structure fails them.
"""
from __future__ import annotations

import pytest
import timm
import torch

import finetune
from fd_ref.checkpoint.keys import infer_vit_options
from fd_ref.config import resolve_config
from fd_ref.errors import UserError
from fd_ref.models.vit import QuickGELU, VisionTransformer

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
FLAGS = ["--img-size", "32", "--patch-size", "8", "--depth", "2", "--embed-dim", "32", "--num-heads", "2",
         "--model", "vit_tiny", "--num-classes", "10", "--drop-path", "0.0"]
BASELINES = {  # what timm builds for the paper's teachers, at test size
    "deit": "deit_base_patch16_224",
    "dino": "vit_base_patch16_224",
    "clip": "vit_base_patch16_clip_quickgelu_224",
}


def _timm_checkpoint(kind: str, path) -> torch.nn.Module:
    torch.manual_seed({"deit": 0, "dino": 1, "clip": 2}[kind])
    model = timm.create_model(BASELINES[kind], pretrained=False, num_classes=7, **TINY).eval()
    with torch.no_grad():  # every weight random and non-trivial (norms, biases, k bias, pos embed)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    torch.save({"model": model.state_dict()}, path)  # a head of another task: never loaded
    return model


def _build(path, *extra) -> tuple[torch.nn.Module, str]:
    cfg = resolve_config(finetune.DEFAULTS, FLAGS + ["--pretrained", str(path), *extra])
    return finetune.build_finetune_model(cfg)


def _tokens_before_final_norm(model, x):
    seen = []
    handle = model.norm.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0]))
    try:
        model.forward_features(x)
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("kind", sorted(BASELINES))
def test_baseline_checkpoint_is_the_same_function_as_timm(kind, tmp_path):
    path = tmp_path / f"{kind}.pth"
    reference = _timm_checkpoint(kind, path)
    x = torch.randn(2, 3, 32, 32)

    probe, summary = _build(path, "--linear-probe", "--probe-pool", "cls")  # keeps the final norm
    assert "unexpected" not in summary and "missing" not in summary, summary
    backbone = probe.backbone.eval()
    ft, ft_summary = _build(path)
    ft.eval()
    assert "unexpected" not in ft_summary, ft_summary
    missing = ft_summary.split("missing (left at init): ")[1].split(";")[0].split(", ")
    assert sorted(missing) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"], ft_summary

    for model in (backbone, ft):
        assert isinstance(model, VisionTransformer)
        assert not any(n.endswith("gamma") for n, _ in model.named_parameters())  # no layer scale
        assert model.pos_embed is not None
        clip = kind == "clip"
        assert model.config["pre_norm"] is clip and isinstance(model.norm_pre, torch.nn.LayerNorm) is clip
        assert isinstance(model.blocks[0].mlp.act, QuickGELU) is clip
        assert model.blocks[0].norm1.eps == (1e-5 if clip else 1e-6) == reference.blocks[0].norm1.eps
        assert (model.patch_embed.proj.bias is None) is clip

    with torch.no_grad():
        expected_after = reference.forward_features(x)
        expected_before = _tokens_before_final_norm(reference, x)
        got_after = backbone.forward_features(x)
        got_before = ft.forward_features(x)
    assert got_after.shape == expected_after.shape == (2, 17, 32)
    assert (got_after - expected_after).abs().max().item() <= 1e-5
    assert (got_before - expected_before).abs().max().item() <= 1e-5
    assert expected_before.abs().max() > 1.0  # not a trivial comparison

    # the old structure (layer scale 0.1 from the flags; for CLIP also GELU and no norm_pre) is another function
    old = VisionTransformer(**TINY, layer_scale_init=0.1, pos_embed="abs", global_pool="cls",
                            patch_bias=kind != "clip").eval()
    old.load_state_dict(backbone.state_dict(), strict=False)
    with torch.no_grad():
        assert (old.forward_features(x) - expected_after).abs().max().item() > 1e-2


def test_clip_needs_quick_gelu_and_norm_pre(tmp_path):
    """Each CLIP structural option matters on its own: GELU, or leaving out norm_pre, breaks the parity."""
    path = tmp_path / "clip.pth"
    reference = _timm_checkpoint("clip", path)
    probe, _ = _build(path, "--linear-probe")
    state = probe.backbone.state_dict()
    x = torch.randn(2, 3, 32, 32)
    options = dict(TINY, layer_scale_init=None, pos_embed="abs", ln_eps=1e-5, patch_bias=False)
    with torch.no_grad():
        expected = reference.forward_features(x)
        for wrong in (dict(act_layer="gelu", pre_norm=True), dict(act_layer="quick_gelu", pre_norm=False)):
            model = VisionTransformer(**options, **wrong).eval()
            model.load_state_dict(state, strict=False)
            assert (model.forward_features(x) - expected).abs().max().item() > 1e-3, wrong


def test_infer_vit_options_rule():
    deit = timm.create_model("deit_base_patch16_224", pretrained=False, num_classes=0, **TINY).state_dict()
    clip = timm.create_model("vit_base_patch16_clip_quickgelu_224", pretrained=False, num_classes=0,
                             **TINY).state_dict()
    fd_student = VisionTransformer(**TINY).state_dict()
    assert infer_vit_options(deit) == dict(layer_scale_init=None, qkv_bias=True, patch_bias=True, pre_norm=False,
                                           act_layer="gelu", ln_eps=1e-6)
    assert infer_vit_options(clip) == dict(layer_scale_init=None, qkv_bias=True, patch_bias=False, pre_norm=True,
                                           act_layer="quick_gelu", ln_eps=1e-5)
    assert infer_vit_options(fd_student)["layer_scale_init"] is not None


def test_unplaceable_tensor_is_refused(tmp_path):
    """A DeiT-distilled checkpoint (a second, distillation token) has structure fd_ref's ViT lacks."""
    torch.manual_seed(0)
    model = timm.create_model("deit_base_distilled_patch16_224", pretrained=False, num_classes=0, **TINY)
    path = tmp_path / "deit_distilled.pth"
    torch.save(model.state_dict(), path)
    with pytest.raises(UserError, match="no place for.*dist_token"):
        _build(path)
