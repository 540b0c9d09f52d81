"""finetune.py fine-tunes a SwinV2 saved by the published FD code (the paper's FD-EsViT row, Table 1).

The file is made here from the independent reference of the published network (``tests/swinv2_reference.py``,
every parameter random) and laid out as the published ``main_fd.py`` saves it (``utils.py::save_checkpoint``):
``{"model": FD.state_dict(), "optimizer", "lr_scheduler", "scaler", "max_accuracy", "epoch", "config"}``, the
student under ``encoder.``, the projection ``decoder.0`` and the frozen teacher ``feature_model.`` beside it.
(``config`` is a yacs ``CfgNode`` in a real file, which a weights-only load refuses: a plain dict here, and the
refusal itself is tested below.) ``finetune.main`` loads it with ``--model timm:swinv2_* --model-kwargs``; the
backbone then computes the reference's features (TOL), the head is fresh, a file of another shape is refused
with one line.
"""
from __future__ import annotations

import io
import json
import sys
import types
from pathlib import Path

import pytest
import torch

import finetune
import swinv2_reference as ref
from fd_ref.cli import run_main
from fd_ref.models.from_file import read_model_file
from fd_ref.models.swinv2_keys import load_published_swinv2, published_swinv2_to_timm, split_published_swinv2
from fd_ref.models.timm_backbone import TimmBackbone
from test_swinv2_parity import randomise

TOL = 1e-4  # max |fd-ref features - reference features| in fp32 (tokens of order 1), as in test_swinv2_parity
NAME = "timm:swinv2_tiny_window8_256"
IMG = 64
SHAPE = dict(patch_size=4, embed_dim=8, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=4)  # maps 16..2
TEACHER_KEYS = ("feature_model.patch_embed.proj.weight", "feature_model.layers.0.blocks.0.attn.qkv.weight",
                "feature_model.norm.weight")


def reference_net(shape: dict = SHAPE, seed: int = 0) -> ref.SwinV2Reference:
    net = ref.SwinV2Reference(IMG, **shape).eval()
    randomise(net, seed)
    return net


def fd_state(net: ref.SwinV2Reference) -> dict[str, torch.Tensor]:
    """``FD.state_dict()`` of the published wrapper around ``net``: encoder, decoder (Conv1d to a 16-wide
    teacher) and a stand-in for the teacher's tensors."""
    g = torch.Generator().manual_seed(7)
    state = {"encoder." + k: v for k, v in net.state_dict().items()}
    state["decoder.0.weight"] = torch.randn(16, net.num_features, 1, generator=g)
    state["decoder.0.bias"] = torch.randn(16, generator=g)
    for key in TEACHER_KEYS:
        state[key] = torch.randn(4, 4, generator=g)
    return state


def save_published(path: Path, net: ref.SwinV2Reference) -> Path:
    """``net`` saved as the published ``main_fd.py`` saves its checkpoint (module docstring)."""
    params = list(range(len(fd_state(net))))
    torch.save({"model": fd_state(net),
                "optimizer": {"state": {}, "param_groups": [{"lr": 1e-5, "weight_decay": 0.05, "params": params}]},
                "lr_scheduler": {"t_initial": 300, "warmup_t": 10}, "scaler": {"scale": 65536.0, "_growth_tracker": 0},
                "max_accuracy": 0.0, "epoch": 299, "config": {"MODEL": {"TYPE": "swin_v2"}}}, path)
    return path


def images(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, IMG, IMG, generator=torch.Generator().manual_seed(3))


def args(pretrained: Path, out: Path, shape: dict = SHAPE, model: str = NAME) -> list[str]:
    return ["--pretrained", str(pretrained), "--model", model, "--model-kwargs", json.dumps(shape),
            "--img-size", str(IMG), "--synthetic-size", "24", "--num-classes", "10", "--batch-size", "8",
            "--epochs", "1", "--max-steps", "2", "--warmup-epochs", "0", "--num-workers", "0", "--progress", "false",
            "--output", str(out)]


# ---------------------------------------------------------------------------------------------------------
# The library mapping (fd_ref/models/swinv2_keys.py)
# ---------------------------------------------------------------------------------------------------------
def test_file_layout_keeps_the_encoder_only(tmp_path):
    """The whole published checkpoint loads (strictly) into fd-ref's SwinV2 and gives the reference network's
    features; the projection and the teacher are the dropped tensors, nothing else. A DDP-prefixed state
    (``module.``) loads to the same features."""
    net = reference_net()
    blob = torch.load(save_published(tmp_path / "ckpt_epoch_299.pth", net), weights_only=True)
    mapped, dropped = split_published_swinv2(blob)
    assert sorted(dropped) == sorted(["decoder.0.weight", "decoder.0.bias", *TEACHER_KEYS])
    module = {"module." + k: v for k, v in net.state_dict().items()}
    with torch.no_grad():
        expected = net(images())
        for state in (mapped, published_swinv2_to_timm(module)):
            student = TimmBackbone(NAME, IMG, SHAPE).eval()
            student.load_state_dict(state, strict=True)
            err = (student.forward_features(images()) - expected).abs().max().item()
            assert err <= TOL, err


def test_shared_bias_mlp_is_copied_into_every_block():
    """A file with one bias MLP per stage (``USE_SHARED_RPB``: ``layers.l.rel_pos_bias.rpe_mlp``), which the
    published fine-tuning copies into each block of the stage, gives the reference's features (every block of a
    stage holding that MLP) in fd-ref's SwinV2."""
    net = reference_net(seed=4)
    state = net.state_dict()
    shared = {}
    for l, depth in enumerate(SHAPE["depths"]):
        for p in ("0.weight", "0.bias", "2.weight"):
            first = state[f"layers.{l}.blocks.0.attn.rpe_mlp.{p}"]
            for j in range(depth):
                state[f"layers.{l}.blocks.{j}.attn.rpe_mlp.{p}"].copy_(first)  # the reference now shares it
                shared.pop(f"layers.{l}.blocks.{j}.attn.rpe_mlp.{p}", None)
            shared[f"layers.{l}.rel_pos_bias.rpe_mlp.{p}"] = first.clone()
        shared[f"layers.{l}.rel_pos_bias.relative_coords_table"] = torch.zeros(1, 3, 3, 2)  # a buffer: dropped
    layout = {k: v for k, v in state.items() if ".attn.rpe_mlp." not in k} | shared
    student = TimmBackbone(NAME, IMG, SHAPE).eval()
    student.load_state_dict(published_swinv2_to_timm({"model": {"encoder." + k: v for k, v in layout.items()}}),
                            strict=True)
    with torch.no_grad():
        err = (student.forward_features(images()) - net(images())).abs().max().item()
    assert err <= TOL, err


def test_a_fine_tuned_head_in_the_file_is_not_loaded():
    """A head in the file (a published fine-tuned model's ``head.*``) is dropped: the head stays as drawn."""
    net = reference_net()
    state = dict(net.state_dict(), **{"head.weight": torch.ones(10, net.num_features), "head.bias": torch.ones(10)})
    backbone = TimmBackbone(NAME, IMG, SHAPE)
    backbone.reset_classifier(10)
    before = {k: v.clone() for k, v in backbone.model.head.state_dict().items()}
    summary = load_published_swinv2(backbone, state, "finetuned.pth")
    assert "dropped 2 tensors that are not the backbone (head.weight, head.bias)" in summary
    assert all(torch.equal(v, backbone.model.head.state_dict()[k]) for k, v in before.items())


# ---------------------------------------------------------------------------------------------------------
# finetune.py
# ---------------------------------------------------------------------------------------------------------
def test_finetune_loads_the_published_swinv2(tmp_path, monkeypatch, capsys):
    """Before any step, the model finetune.main builds gives the reference's features within TOL (every backbone
    tensor of the file was loaded); its head is fresh, drawn as published (bias 0, std 0.02); two steps run and
    checkpoint.pt records the timm SwinV2 it is."""
    net = reference_net()
    path = save_published(tmp_path / "ckpt_epoch_299.pth", net)
    seen = {}
    build = finetune.build_finetune_model

    def recording(cfg):
        model, summary = build(cfg)
        model.eval()
        with torch.no_grad():
            seen["features"] = model.forward_features(images()).clone()
        model.train()
        seen["head"] = {k: v.clone() for k, v in model.model.get_classifier().state_dict().items()}
        return model, summary
    monkeypatch.setattr(finetune, "build_finetune_model", recording)
    results = finetune.main(args(path, tmp_path / "ft"))
    with torch.no_grad():
        expected = net(images())
    err = (seen["features"] - expected).abs().max().item()
    assert err <= TOL, f"max |fine-tuned model - published network| = {err:.2e}"
    head = seen["head"]
    assert head["weight"].shape == (10, net.num_features) and torch.all(head["bias"] == 0)
    assert head["weight"].std().item() == pytest.approx(0.02, rel=0.3)  # 80 draws
    out = capsys.readouterr().out
    assert f"loaded the published SwinV2 {NAME} " in out and "a fresh head for 10 classes" in out
    assert results["steps"] == 2 and results["mode"] == "finetune"
    mf = read_model_file(tmp_path / "ft" / "checkpoint.pt")
    assert mf.config["timm"] == NAME[len("timm:"):] and mf.config["timm_kwargs"]["window_size"] == 4


def _vit_file(path: Path) -> Path:
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=IMG,
                            patch_size=16, embed_dim=32, depth=1, num_heads=2)
    torch.save({"model": vit.state_dict()}, path)
    return path


@pytest.mark.parametrize("case,message", [
    ("vit", "does not fit timm:swinv2_tiny_window8_256"),
    ("deeper_file", "34 unexpected (model.layers.2.blocks.2."),                      # 2 blocks x 17 tensors
    ("shallower_file", "34 of the model's 185 tensors missing (model.layers.2.blocks.2."),
    ("wider_file", "of another shape (model.patch_embed.proj.weight (16, 3, 4, 4) vs (8, 3, 4, 4)"),
    ("not_swinv2", "--model timm:resnet18 (not a SwinV2)"),
    ("no_timm_model", "it is a SwinV2 of the published FD code: pass --model timm:swinv2_base_window8_256"),
])
def test_a_file_that_does_not_fit_is_one_line(case, message, tmp_path, capsys):
    """A ViT file, a SwinV2 of another depth (either way) or width, a non-SwinV2 --model: one line, exit 2,
    with the counts of missing / unexpected / misshapen tensors; the file with fd-ref's ViT (no --model timm:):
    one line saying which --model reads it."""
    deeper = dict(SHAPE, depths=(2, 2, 4, 2))
    if case == "vit":
        path, shape, model = _vit_file(tmp_path / "vit.pth"), SHAPE, NAME
    elif case == "deeper_file":
        path, shape, model = save_published(tmp_path / "f.pth", reference_net(deeper)), SHAPE, NAME
    elif case == "shallower_file":
        path, shape, model = save_published(tmp_path / "f.pth", reference_net()), deeper, NAME
    elif case == "wider_file":
        path, shape, model = save_published(tmp_path / "f.pth", reference_net(dict(SHAPE, embed_dim=16))), SHAPE, NAME
    else:
        model = "timm:resnet18" if case == "not_swinv2" else "vit_tiny"
        path, shape = save_published(tmp_path / "f.pth", reference_net()), {}
    with pytest.raises(SystemExit) as e:
        run_main(lambda: finetune.main(args(path, tmp_path / "ft", shape, model)))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "ft" / "checkpoint.pt").exists()


def test_a_training_checkpoint_with_its_yacs_config_says_how_to_keep_the_weights(tmp_path, monkeypatch, capsys):
    """A raw published training checkpoint pickles its yacs ``CfgNode`` config, which a weights-only load
    refuses; the one line names the file as the published code's and says how to keep its weights."""
    yacs, config_module = types.ModuleType("yacs"), types.ModuleType("yacs.config")

    class CfgNode(dict):  # pickled by name, as yacs.config.CfgNode
        pass
    CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
    config_module.CfgNode, yacs.config = CfgNode, config_module
    monkeypatch.setitem(sys.modules, "yacs", yacs)
    monkeypatch.setitem(sys.modules, "yacs.config", config_module)
    buffer = io.BytesIO()
    torch.save({"model": fd_state(reference_net()), "config": CfgNode(MODEL=CfgNode(TYPE="swin_v2"))}, buffer)
    path = tmp_path / "ckpt_epoch_299.pth"
    path.write_bytes(buffer.getvalue())
    with pytest.raises(SystemExit) as e:
        run_main(lambda: finetune.main(args(path, tmp_path / "ft")))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert "yacs" in err and "['model']" in err and "weights_only=False" in err, err


def test_linear_probe_of_the_published_swinv2(tmp_path, monkeypatch):
    """--linear-probe freezes the loaded backbone: its features are the reference's before and after the steps."""
    net = reference_net()
    path = save_published(tmp_path / "ckpt_epoch_299.pth", net)
    built = {}
    build = finetune.build_finetune_model

    def recording(cfg):
        built["model"], summary = build(cfg)
        return built["model"], summary
    monkeypatch.setattr(finetune, "build_finetune_model", recording)
    results = finetune.main(args(path, tmp_path / "lp") + ["--linear-probe"])
    assert results["mode"] == "linear_probe" and results["steps"] == 2
    backbone = built["model"].backbone.eval()
    with torch.no_grad():
        err = (backbone.forward_features(images()) - net(images())).abs().max().item()
    assert err <= TOL, err
