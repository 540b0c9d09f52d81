"""bench/mini_repro.sh, the CIFAR-10 study: its stages' commands are valid for every preset, and the whole
pipeline runs end to end at toy size on a tiny image folder the test makes (issue #12); the stages of issue #24
(k-NN of every model, a CNN teacher, two teachers, PHI-S and cosine variants) resolve for every preset and
run end to end at toy size."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import analyze
import export
import finetune
import train
from fd_ref.config import resolve_config

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "mini_repro.sh"
DEFAULTS = {"train.py": train.DEFAULTS, "finetune.py": finetune.DEFAULTS, "analyze.py": analyze.DEFAULTS}


def _folder(root: Path, per_class: int = 16) -> Path:
    rng = np.random.default_rng(0)
    for c in range(3):
        (root / "train" / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "train" / f"c{c}" / f"{i}.jpg")
    return root


def _run(data: Path, out: Path, **env) -> subprocess.CompletedProcess:
    full = {**os.environ, "PY": sys.executable, "OUT": str(out), **env}
    return subprocess.run(["bash", str(SCRIPT), str(data)], cwd=ROOT, env=full, capture_output=True, text=True,
                          timeout=600)


def _resolve(command: str) -> dict:
    """A stage's settings, resolved as its script resolves them."""
    words = shlex.split(command)
    script = Path(words[1]).name
    if script == "train.py":
        return resolve_config(DEFAULTS[script], words[2:], multi=train.TEACHER_KEYS, aliases=train.ALIASES)
    return resolve_config(DEFAULTS[script], words[2:])


@pytest.mark.parametrize("preset", ["cpu", "gpu"])
def test_every_stage_command_resolves(tmp_path, preset):
    """DRY_RUN prints each stage; every flag of every stage is one its script accepts, with the preset's
    sizes (gpu: 6 heads, 100/100/50 epochs, images decoded into memory)."""
    done = _run(tmp_path, tmp_path / "out", PRESET=preset, DRY_RUN="1")
    assert done.returncode == 0, done.stderr
    stages = dict(line.split(": ", 1) for line in done.stdout.splitlines())
    expected = {"teacher", "fd", "analysis"} | {f"{k}_s{s}" for k in ("ft_teacher", "ft_fd", "scratch")
                                                for s in range(3)}
    for ab in ("target_cls", "abs_pos", "no_whiten", "sym_drop", "target_avg"):
        expected |= {f"fd_{ab}", f"ft_{ab}_s0", f"ft_{ab}_s1", f"knn_fd_{ab}"}
    variants = ("cnn_teacher", "two_teachers", "phi_s", "cosine")
    for v in variants:  # issue #24: three fine-tuning seeds each, a k-NN of each student
        expected |= {f"fd_{v}", f"knn_fd_{v}"} | {f"ft_{v}_s{s}" for s in range(3)}
    expected |= {"teacher_cnn", "knn_teacher_cnn", "knn_teacher", "knn_fd"} | {f"knn_scratch_s{s}" for s in range(3)}
    assert set(stages) == expected
    for name, command in stages.items():
        words = shlex.split(command)
        script = Path(words[1]).name
        cfg = _resolve(command)
        if script != "analyze.py":
            assert cfg["val_split"] == 5000 and cfg["split_seed"] == 0 and cfg["data_in_memory"] is (preset == "gpu")
            if "--model" in words and cfg["model"].startswith("vit"):  # ViTs the stage builds (not the CNN teacher)
                assert cfg["num_heads"] == (6 if preset == "gpu" else 2)
    epochs = {n: _resolve(c).get("epochs") for n, c in stages.items()}
    t, fd, ft = (100, 100, 50) if preset == "gpu" else (12, 12, 4)
    assert (epochs["teacher"], epochs["fd"], epochs["ft_fd_s0"], epochs["scratch_s0"]) == (t, fd, ft, fd + ft)
    assert "--target cls" in stages["fd_target_cls"] and "--pos-embed abs" in stages["fd_abs_pos"]
    # issue #24: the variants' own settings, the CNN teacher trained like the ViT teacher, k-NN on the hold-out
    cfg = {n: _resolve(c) for n, c in stages.items()}
    assert cfg["fd_no_whiten"]["target_norm"] == "none"  # --no-whiten, the alias
    assert cfg["fd_phi_s"]["target_norm"] == "phi_s" and cfg["fd_cosine"]["loss"] == "cosine"
    assert cfg["fd"]["target_norm"] == "whiten" and cfg["fd"]["loss"] == "smooth_l1"
    cnn = cfg["teacher_cnn"]
    assert cnn["from_scratch"] and cnn["model"] == "timm:resnet18" and "output_stride=8" in cnn["model_kwargs"]
    assert cnn["epochs"] == cfg["teacher"]["epochs"] == t and cnn["val_split"] == 5000
    two = cfg["fd_two_teachers"]
    assert two["teacher"] == ["vit_tiny", "timm:resnet18"] and two["teacher_weight"] == [1.0, 1.0]
    assert two["teacher_checkpoint"][1].endswith("teacher_cnn/best.pt") and two["teacher_kwargs"][0] is None
    assert cfg["fd_cnn_teacher"]["teacher"] == "timm:resnet18"
    assert cfg["fd_cnn_teacher"]["teacher_kwargs"] == cnn["model_kwargs"] == two["teacher_kwargs"][1]
    assert epochs["ft_two_teachers_s2"] == ft and epochs["fd_two_teachers"] == fd
    for name in (n for n in stages if n.startswith("knn_")):
        assert cfg[name]["knn"] and cfg[name]["val_split"] == 5000 and cfg[name]["crop_pct"] == 1.0
        source = name[len("knn_"):]
        assert cfg[name]["pretrained"].endswith(f"{source}/student.pt" if source.startswith("fd") else f"{source}/best.pt")


def test_further_distillation_seeds_add_their_own_stages(tmp_path):
    """FD_SEEDS="0 3": the first seed is the plain stages (fd, fd_<ablation>, now with --seed 0), the second
    distils again with --seed 3 into fd_d3 / fd_<ablation>_d3, each fine-tuned with the usual seeds."""
    done = _run(tmp_path, tmp_path / "out", DRY_RUN="1", FD_SEEDS="0 3", ABLATIONS="abs_pos", SEEDS="0 1",
                ABL_SEEDS="0")
    assert done.returncode == 0, done.stderr
    stages = dict(line.split(": ", 1) for line in done.stdout.splitlines())
    extra = {"fd_d3", "ft_fd_d3_s0", "ft_fd_d3_s1", "fd_abs_pos_d3", "ft_abs_pos_d3_s0"}
    assert extra <= set(stages) and not any("_d0" in name for name in stages)
    seed = {n: resolve_config(DEFAULTS["train.py"], shlex.split(stages[n])[2:])["seed"]
            for n in ("fd", "fd_d3", "fd_abs_pos", "fd_abs_pos_d3")}
    assert seed == {"fd": 0, "fd_d3": 3, "fd_abs_pos": 0, "fd_abs_pos_d3": 3}
    assert "--pos-embed abs" in stages["fd_abs_pos_d3"] and "fd_d3/student.pt" in stages["ft_fd_d3_s1"]
    empty = _run(tmp_path, tmp_path / "out2", DRY_RUN="1", FD_SEEDS=" ")
    assert empty.returncode != 0 and "FD_SEEDS is empty" in empty.stderr


def test_toy_pipeline_end_to_end_and_resume(tmp_path):
    data, out = _folder(tmp_path / "data"), tmp_path / "out"
    env = dict(PRESET="toy", SEEDS="0", ABLATIONS="", VAL="12", ANALYSIS_IMAGES="6", FD_SEEDS="0 1", VARIANTS="",
               KNN="no")
    done = _run(data, out, **env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    stages = ("teacher", "scratch_s0", "fd", "ft_teacher_s0", "ft_fd_s0", "fd_d1", "ft_fd_d1_s0", "analysis")
    for stage in stages:
        assert (out / stage / "DONE").is_file(), stage
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) >= {"teacher", "fd", "scratch", "seconds", "diagnostics"}
    assert [p.name for p in out.glob("fd_*/")] == ["fd_d1"], "ABLATIONS='' runs no ablation"
    # the second distillation seed's fine-tune is its own row, and pooled with the first
    by_seed = summary["fd"]["by_distillation_seed"]
    assert set(by_seed) == {"first", "d1"} and by_seed["first"]["top1"] == summary["fd"]["top1"]
    assert sorted(summary["fd"]["all_distillation_seeds"]["top1"]) == sorted(by_seed["first"]["top1"]
                                                                              + by_seed["d1"]["top1"])
    # rerunning the same command finds every stage done and runs nothing again
    again = _run(data, out, **env)
    assert again.returncode == 0 and again.stdout.count("done already") == len(stages), again.stdout
    # a snapshot restored into an empty folder (another machine) continues the study the same way
    snapshot, moved = tmp_path / "snapshot", tmp_path / "moved"
    script = str(ROOT / "bench" / "study_snapshot.sh")
    subprocess.run(["bash", script, "save", str(out), str(snapshot)], check=True, capture_output=True)
    assert (snapshot / "teacher" / "best.pt").is_file() and (snapshot / "fd" / "student.pt").is_file()
    assert not list(snapshot.glob("*/checkpoint.pt"))  # finished stages keep no optimiser state
    subprocess.run(["bash", script, "restore", str(moved), str(snapshot)], check=True, capture_output=True)
    resumed = _run(data, moved, **env)
    assert resumed.returncode == 0 and resumed.stdout.count("done already") == len(stages), resumed.stdout


def test_issue_24_stages_end_to_end_two_teachers_of_two_families(tmp_path):
    """At toy size: the CNN teacher trained from scratch, the two-teacher student (ViT + CNN) distilled,
    k-NN of every model, the fine-tune; then the two-teacher student exported and analysed; the table
    carries the k-NN column, the CNN teacher and the variant's row."""
    data, out = _folder(tmp_path / "data"), tmp_path / "out"
    env = dict(PRESET="toy", SEEDS="0", ABLATIONS="", VAL="12", ANALYSIS_IMAGES="6", VARIANTS="two_teachers")
    done = _run(data, out, **env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    stages = ("teacher", "teacher_cnn", "fd", "fd_two_teachers", "ft_two_teachers_s0", "knn_teacher",
              "knn_teacher_cnn", "knn_fd", "knn_fd_two_teachers", "knn_scratch_s0")
    for stage in stages:
        assert (out / stage / "DONE").is_file(), stage
    student = torch.load(out / "fd_two_teachers" / "student.pt", map_location="cpu", weights_only=True)
    assert student["teacher"] == ["vit_tiny", "timm:resnet18"]
    log = [json.loads(line) for line in (out / "fd_two_teachers" / "log.jsonl").read_text().splitlines()]
    assert all({"loss_0_vit_tiny", "loss_1_timm_resnet18"} <= set(r) for r in log if "loss" in r)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["knn"]) >= {"teacher", "teacher_cnn", "fd", "fd_two_teachers", "scratch_s0"}
    assert "two_teachers" in summary and "teacher_cnn" in summary
    assert "| FD from the ViT and the CNN teacher at once, fine-tuned |" in done.stdout
    # the two-teacher student leaves the study like any student: export, then the diagnostics
    exported = export.main([str(out / "fd_two_teachers" / "student.pt"), str(tmp_path / "export")])
    assert (tmp_path / "export" / "model.safetensors").is_file() and exported
    analyze.main(["--models", f"two={out / 'fd_two_teachers' / 'student.pt'}", "--data", str(data), "--val-split", "12",
                  "--num-images", "4", "--landscape-steps", "3", "--progress", "false",
                  "--output", str(tmp_path / "analysis")])
    assert (tmp_path / "analysis" / "analysis.json").is_file()
