"""finetune.py --eval-only evaluates a model file as it is: its own head, fc_norm and architecture, read from
the file, with no training flag repeated (issue 14). A file without a head, or one for another number of
classes than the data, is one line and exit 2, never a freshly initialised head."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import distil_then_finetune
import torch

import finetune
import train
from fd_ref.checkpoint.io import save_atomic
from fd_ref.errors import UserError
from fd_ref.models.vit import VisionTransformer

ROOT = Path(__file__).resolve().parent.parent
STUDENT = ["--img-size", "32", "--patch-size", "8", "--depth", "2", "--embed-dim", "32", "--num-heads", "2",
           "--teacher-patch-size", "8", "--teacher-depth", "1", "--synthetic-size", "32", "--batch-size", "16",
           "--num-workers", "0", "--progress", "false", "--epochs", "1", "--max-steps", "2", "--warmup-epochs", "0"]
# the training flags; --eval-only gets none of them (only --data, which is the default synthetic set)
FT = ["--img-size", "32", "--synthetic-size", "48", "--num-classes", "10", "--batch-size", "16", "--num-workers",
      "0", "--progress", "false", "--warmup-epochs", "0", "--epochs", "1", "--lr", "0.05", "--drop-path", "0.2",
      "--layer-decay", "0.8", "--mixup", "0", "--cutmix", "0"]
EVAL = ["--synthetic-size", "48", "--num-workers", "0", "--eval-only"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path, dict]:
    return distil_then_finetune(tmp_path_factory, STUDENT, FT)


@pytest.fixture(scope="module")
def finetuned(runs) -> tuple[Path, dict]:
    return runs[1], runs[2]


def test_best_pt_is_evaluated_with_its_own_head(finetuned, tmp_path, monkeypatch, capsys):
    out, results = finetuned
    monkeypatch.chdir(tmp_path)  # no out/ folder of an earlier run to fall back on
    metrics = finetune.main(EVAL + ["--pretrained", str(out / "best.pt")])
    best = torch.load(out / "best.pt", map_location="cpu", weights_only=True)["metrics"]
    for key in ("top1", "top5", "val_loss"):  # what the run measured for that model, to the last digit
        assert metrics[key] == pytest.approx(best[key], rel=1e-9, abs=1e-9)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == pytest.approx(metrics)
    assert not list(tmp_path.iterdir())  # nothing written


def test_the_head_is_really_used(finetuned, tmp_path):
    """The same file with its head's weights zeroed scores differently: the head comes from the file."""
    out, _ = finetuned
    blob = torch.load(out / "best.pt", map_location="cpu", weights_only=True)
    blob["model"] = {k: (torch.zeros_like(v) if k.startswith("head.") else v) for k, v in blob["model"].items()}
    save_atomic(blob, tmp_path / "zero_head.pt")
    zero = finetune.main(EVAL + ["--pretrained", str(tmp_path / "zero_head.pt")])
    real = finetune.main(EVAL + ["--pretrained", str(out / "best.pt")])
    assert zero["val_loss"] == pytest.approx(float(torch.log(torch.tensor(10.0))), rel=1e-6)  # uniform logits
    assert real["val_loss"] != pytest.approx(zero["val_loss"], rel=1e-6)


def test_linear_probe_file_is_evaluated(student, tmp_path):
    out = tmp_path / "probe"
    results = finetune.main(FT + ["--pretrained", str(student), "--linear-probe", "--output", str(out)])
    metrics = finetune.main(EVAL + ["--pretrained", str(out / "checkpoint.pt")])
    for key in ("top1", "top5", "val_loss"):
        assert metrics[key] == pytest.approx(results["final"][key], rel=1e-9, abs=1e-9)
    # analyze.py reads the same file: the probe's frozen backbone, every tensor loaded
    from fd_ref.models.from_file import build_model, read_model_file
    mf = read_model_file(out / "checkpoint.pt")
    backbone, summary = build_model(mf).backbone, mf.summary
    assert backbone.num_classes == 0 and "missing" not in summary
    probe = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]
    assert torch.equal(backbone.blocks[0].mlp.fc1.weight, probe["backbone.blocks.0.mlp.fc1.weight"])


def _eval_script(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "finetune.py", *EVAL, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1",
                                                       "HF_HUB_OFFLINE": "1"})


def test_a_student_without_head_is_one_line_exit_2(student):
    proc = _eval_script(["--pretrained", str(student)])
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "has no classification head" in proc.stderr and "best.pt" in proc.stderr


def test_another_number_of_classes_is_refused(tmp_path):
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=5,
                              global_pool="avg", pos_embed="rpb")
    save_atomic({"model": model.state_dict(), "model_config": model.config}, tmp_path / "five.pt")
    with pytest.raises(UserError, match="classifies 5 classes but synthetic has 10"):
        finetune.main(EVAL + ["--pretrained", str(tmp_path / "five.pt")])
    torch.save({"weight": torch.zeros(1)}, tmp_path / "plain.pt")
    with pytest.raises(UserError, match="not an fd-ref model file"):
        finetune.main(EVAL + ["--pretrained", str(tmp_path / "plain.pt")])
