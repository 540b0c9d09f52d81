"""export.py: an fd-ref model becomes a folder that plain timm loads (``local-dir:``), computing what fd-ref
computes (compared with fd-ref's own model, fp32); bad input is one line, exit 2, nothing half-written."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import distil_then_finetune
import timm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import export
import finetune
import train
from fd_ref.checkpoint.io import save_atomic
from fd_ref.errors import UserError
from fd_ref.timm_export import beit_model_args
from fd_ref.models.vit import VisionTransformer

ROOT = Path(__file__).resolve().parent.parent
STUDENT = ["--img-size", "32", "--patch-size", "8", "--depth", "2", "--embed-dim", "32", "--num-heads", "2",
           "--teacher-patch-size", "8", "--teacher-depth", "1", "--synthetic-size", "32", "--batch-size", "16",
           "--num-workers", "0", "--progress", "false", "--epochs", "1", "--max-steps", "2", "--lr", "0.05",
           "--warmup-epochs", "0"]
FT = ["--img-size", "32", "--synthetic-size", "48", "--num-classes", "10", "--batch-size", "16", "--num-workers",
      "0", "--progress", "false", "--warmup-epochs", "0", "--epochs", "1", "--lr", "0.05", "--mixup", "0",
      "--cutmix", "0"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path, dict]:
    return distil_then_finetune(tmp_path_factory, STUDENT, FT)


@pytest.fixture(scope="module")
def finetuned(runs) -> Path:
    return runs[1]


def _fd_model(path: Path) -> VisionTransformer:
    blob = torch.load(path, map_location="cpu", weights_only=True)
    state = {k.removeprefix("student."): v for k, v in blob["model"].items() if not k.startswith("projection.")}
    model = VisionTransformer(**blob["model_config"])
    model.load_state_dict(state)
    return model.eval()


def _images(n: int = 3, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def _plain_timm(folder: Path, inputs: Path, outputs: Path) -> subprocess.CompletedProcess:
    """Load the folder in a fresh interpreter that imports timm but never fd_ref; save its outputs."""
    code = (
        "import sys, timm, torch\n"
        f"model = timm.create_model('local-dir:{folder}', pretrained=True).eval()\n"
        f"x = torch.load('{inputs}')\n"
        "with torch.no_grad():\n"
        "    out = {'features': model.forward_features(x), 'output': model(x)}\n"
        "assert not any(m == 'fd_ref' or m.startswith('fd_ref.') for m in sys.modules), 'fd_ref imported'\n"
        f"torch.save({{**out, 'class': type(model).__name__, 'cfg': model.pretrained_cfg}}, '{outputs}')\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    return subprocess.run([sys.executable, "-c", code], cwd="/", env=env, capture_output=True, text=True,
                          timeout=600)


def test_student_loads_in_plain_timm_with_the_same_features(student, tmp_path):
    folder = tmp_path / "student_export"
    summary = export.main([str(student), str(folder)])
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["model_args"]["use_shared_rel_pos_bias"] and not config["model_args"]["use_rel_pos_bias"]
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32] and config["num_classes"] == 0
    assert config["pretrained_cfg"]["mean"] == [0.485, 0.456, 0.406]
    x = _images()
    torch.save(x, tmp_path / "x.pt")
    proc = _plain_timm(folder, tmp_path / "x.pt", tmp_path / "y.pt")
    assert proc.returncode == 0, proc.stderr
    got = torch.load(tmp_path / "y.pt", weights_only=False)
    assert got["class"] == "Beit" and got["cfg"]["interpolation"] == "bicubic"
    fd = _fd_model(student)
    with torch.no_grad():
        want = fd.forward_features(x)
    assert got["features"].shape == want.shape == (3, 1 + 16, 32)
    torch.testing.assert_close(got["features"], want, rtol=0, atol=1e-5)
    torch.testing.assert_close(got["output"], want[:, 0], rtol=0, atol=1e-5)  # the class token
    assert summary["max_difference"] <= 1e-5
    card = (folder / "README.md").read_text()
    assert "timm.create_model" in card and "randomly initialised" in card  # the quickstart's teacher


def test_finetuned_model_loads_with_its_head_and_gives_the_same_logits(finetuned, tmp_path):
    folder = tmp_path / "ft_export"
    export.main([str(finetuned / "best.pt"), str(folder)])
    config = json.loads((folder / "config.json").read_text())
    assert config["num_classes"] == 10 and config["global_pool"] == "avg"
    assert config["model_args"]["use_rel_pos_bias"] and not config["model_args"]["use_shared_rel_pos_bias"]
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    fd = _fd_model(finetuned / "best.pt")
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(model(x), fd(x), rtol=0, atol=1e-5)
        assert model(x).shape == (3, 10)
    # the per-block tables are the fine-tuned ones (they differ between blocks after training)
    assert not torch.equal(model.blocks[0].attn.relative_position_bias_table,
                           model.blocks[1].attn.relative_position_bias_table)
    card = (folder / "README.md").read_text()
    results = json.loads((finetuned / "results.json").read_text())
    assert f"{results['final']['top1']}" in card  # the run's numbers are quoted


@settings(max_examples=10)
@given(pos_embed=st.sampled_from(["shared_rpb", "rpb", "abs"]), global_pool=st.sampled_from(["cls", "avg"]),
       layer_scale=st.sampled_from([None, 0.1, 1e-5]), qkv_bias=st.booleans(), num_classes=st.integers(0, 5),
       depth=st.integers(1, 3), heads=st.sampled_from([1, 2, 4]), patch=st.sampled_from([4, 8]),
       seed=st.integers(0, 2**16))
def test_every_layout_round_trips(pos_embed, global_pool, layer_scale, qkv_bias, num_classes, depth, heads,
                                  patch, seed):
    """Any position embedding, pooling, layer scale, q/v bias, depth, width and grid: plain timm's model from
    the exported folder gives fd-ref's features and outputs (fp32, 1e-5)."""
    torch.manual_seed(seed)
    fd = VisionTransformer(img_size=16, patch_size=patch, embed_dim=8 * heads, depth=depth, num_heads=heads,
                           qkv_bias=qkv_bias, layer_scale_init=layer_scale, pos_embed=pos_embed,
                           global_pool=global_pool, num_classes=num_classes).eval()
    with torch.no_grad():  # no parameter left at a symmetric init (zeros, ones): every mapping is exercised
        for p in fd.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    with tempfile.TemporaryDirectory() as tmp:
        save_atomic({"model": fd.state_dict(), "model_config": fd.config}, Path(tmp) / "m.pt")
        export.main([str(Path(tmp) / "m.pt"), str(Path(tmp) / "out")])
        model = timm.create_model(f"local-dir:{Path(tmp) / 'out'}", pretrained=True).eval()
    x = _images(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), fd.forward_features(x), rtol=0, atol=1e-5)
        torch.testing.assert_close(model(x), fd(x), rtol=0, atol=1e-5)


def test_options_beit_cannot_express_are_refused():
    base = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    assert beit_model_args(base)["use_shared_rel_pos_bias"]
    for extra, words in [({"pre_norm": True}, "pre-norm"), ({"act_layer": "quick_gelu"}, "quick_gelu"),
                         ({"linear_probe": True}, "linear probe")]:
        with pytest.raises(UserError, match=words):
            beit_model_args({**base, **extra})


def _script(args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "export.py", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env}, timeout=600)


def test_bad_input_is_one_line_exit_2_and_writes_nothing(student, tmp_path):
    plain = tmp_path / "plain.pt"
    torch.save({"weight": torch.zeros(2)}, plain)  # a state dict, not an fd-ref model file
    proc = _script([str(plain), str(tmp_path / "a")])
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "not an fd-ref model file" in proc.stderr and not (tmp_path / "a").exists()

    text = tmp_path / "config.yaml"
    text.write_text("a: 1\n")
    with pytest.raises(UserError, match="not a PyTorch checkpoint|truncated or corrupt"):
        export.main([str(text), str(tmp_path / "b")])
    assert not (tmp_path / "b").exists()

    probe = tmp_path / "probe.pt"
    save_atomic({"model": {}, "model_config": {"img_size": 32, "linear_probe": True}}, probe)
    with pytest.raises(UserError, match="linear probe"):
        export.main([str(probe), str(tmp_path / "c")])
    assert not (tmp_path / "c").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_an_existing_folder_is_replaced_only_with_overwrite(student, tmp_path):
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "mine.txt").write_text("keep me")
    with pytest.raises(UserError, match="--overwrite"):
        export.main([str(student), str(folder)])
    assert [p.name for p in folder.iterdir()] == ["mine.txt"]
    export.main([str(student), str(folder), "--overwrite"])
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_push_to_hub_offline_is_one_line_and_keeps_the_folder(student, tmp_path):
    folder = tmp_path / "pushed"
    proc = _script([str(student), str(folder), "--push-to-hub", "someone/fd-test"], HF_HUB_OFFLINE="1",
                   HF_HOME=str(tmp_path / "hf"))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "offline mode" in proc.stderr and "someone/fd-test" in proc.stderr
    assert (folder / "model.safetensors").is_file() and "hf-hub:someone/fd-test" in (folder / "README.md").read_text()
