"""bench/mini_repro.sh, the CIFAR-10 study: its stages' commands are valid for every preset, and the whole
pipeline runs end to end at toy size on a tiny image folder the test makes (issue #12)."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import analyze
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
        expected |= {f"fd_{ab}", f"ft_{ab}_s0", f"ft_{ab}_s1"}
    assert set(stages) == expected
    for name, command in stages.items():
        words = shlex.split(command)
        script = Path(words[1]).name
        cfg = resolve_config(DEFAULTS[script], words[2:])
        if script != "analyze.py":
            assert cfg["val_split"] == 5000 and cfg["split_seed"] == 0 and cfg["data_in_memory"] is (preset == "gpu")
            if "--model" in words:  # stages that build a network (fine-tunes take it from the checkpoint)
                assert cfg["num_heads"] == (6 if preset == "gpu" else 2)
    epochs = {n: resolve_config(DEFAULTS[Path(shlex.split(c)[1]).name], shlex.split(c)[2:]).get("epochs")
              for n, c in stages.items()}
    t, fd, ft = (100, 100, 50) if preset == "gpu" else (12, 12, 4)
    assert (epochs["teacher"], epochs["fd"], epochs["ft_fd_s0"], epochs["scratch_s0"]) == (t, fd, ft, fd + ft)
    assert "--target cls" in stages["fd_target_cls"] and "--pos-embed abs" in stages["fd_abs_pos"]


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
    env = dict(PRESET="toy", SEEDS="0", ABLATIONS="", VAL="12", ANALYSIS_IMAGES="6", FD_SEEDS="0 1")
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
