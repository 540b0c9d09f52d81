"""Inputs a user can get wrong, given to train.py and finetune.py as real processes (issue #8): missing or
empty data folders, unreadable images, a batch larger than the data, unknown teacher or model names, shapes
that do not match, truncated, malicious, foreign or older checkpoints. Each ends in one clear line and exit
code 2 (or completes, where it should), and nothing half-written stays on disk. The runs are forked from
tests/robustness_helpers.py's launcher; the last test checks one case through a fresh interpreter.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from robustness_helpers import (
    FINETUNE,
    TRAIN,
    Result,
    close_launcher_per_module,  # noqa: F401 - the autouse fixture: one launcher per module, closed at its end
    _image_folder,
    assert_nothing_written,
    assert_user_error,
    load_checkpoint,
    run,
    student_file,
    temporaries,
)


# --------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------

def test_missing_data_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = run(tmp_path, "train.py", *TRAIN, "--data", tmp_path / "nowhere", "--output", out)
    assert_user_error(r, "nowhere", "existing folder")
    assert_nothing_written(tmp_path, out)
    r = run(tmp_path, "finetune.py", *FINETUNE, "--from-scratch", "--data", tmp_path / "nowhere", "--output", out)
    assert_user_error(r, "nowhere", "existing folder")
    assert_nothing_written(tmp_path, out)


def test_empty_data_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (tmp_path / "empty").mkdir()
    r = run(tmp_path, "train.py", *TRAIN, "--data", tmp_path / "empty", "--output", out)
    assert_user_error(r, "empty", "no class sub-folders")
    (tmp_path / "no_images" / "cat").mkdir(parents=True)
    (tmp_path / "no_images" / "cat" / "notes.txt").write_text("not an image")
    r = run(tmp_path, "finetune.py", *FINETUNE, "--from-scratch", "--data", tmp_path / "no_images",
            "--val-split", "1", "--output", out)
    assert_user_error(r, "no_images", "contains no images")
    assert_nothing_written(tmp_path, out)


BAD_FILES = ("corrupt", "truncated", "zero")


def _check_skips(r: Result, files: dict[str, Path], output: Path) -> None:
    assert r.rc == 0, r.err[-3000:]
    assert "Traceback" not in r.err
    assert f"note: {len(BAD_FILES)} unreadable image(s) skipped" in r.out, r.out
    warnings = [line for line in r.err_lines if line.startswith("skipping unreadable image")]
    assert len(warnings) == len(BAD_FILES), r.err
    for key, path in files.items():  # every bad file named once, no good one
        assert sum(str(path) in line for line in warnings) == (1 if key in BAD_FILES else 0), (key, r.err)
    records = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    assert [rec for rec in records if "loss" in rec][-1].get("skipped_images") == len(BAD_FILES)
    assert not temporaries(output)


def test_bad_image_files_are_skipped_and_counted(tmp_path: Path) -> None:
    """24 files = 3 batches of 8, so one epoch reads every file: 3 bad ones skipped, the rest (grayscale,
    CMYK, 16-bit, 6000x6000) converted. train.py reads in the main process, finetune.py in a loader
    worker (the count still reaches the main process)."""
    files = _image_folder(tmp_path / "mixed", n_good=24 - 7)
    out = tmp_path / "out"
    r = run(tmp_path, "train.py", *TRAIN, "--data", tmp_path / "mixed", "--output", out, timeout=120)
    _check_skips(r, files, out)
    assert "on 24 images" in r.out

    ft = tmp_path / "ft"
    files = _image_folder(ft / "train", n_good=24 - 7)
    _image_folder(ft / "val", n_good=4)
    for key in files:  # a val/ of good images only
        if key in BAD_FILES or key == "huge":
            (ft / "val" / files[key].relative_to(ft / "train")).unlink()
    r = run(tmp_path, "finetune.py", *FINETUNE, "--from-scratch", "--num-classes", "2", "--num-workers", "1",
            "--patch-size", "16", "--depth", "1", "--data", ft, "--output", tmp_path / "ft_out", timeout=120)
    _check_skips(r, files, tmp_path / "ft_out")


def test_batch_larger_than_dataset(tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = run(tmp_path, "train.py", *TRAIN, "--batch-size", "64", "--output", out)
    assert_user_error(r, "32 images", "batch 64", "lower --batch-size")
    assert_nothing_written(tmp_path, out)


# --------------------------------------------------------------------------------------------------------
# Names and shapes
# --------------------------------------------------------------------------------------------------------

def test_unknown_teacher_and_model(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert_user_error(run(tmp_path, "train.py", *TRAIN, "--teacher", "vit_gigantic", "--output", out),
                      "unknown teacher 'vit_gigantic'", "timm:")
    assert_user_error(run(tmp_path, "train.py", *TRAIN, "--model", "resnet50", "--output", out),
                      "unknown model 'resnet50'", "vit_tiny")
    assert_user_error(run(tmp_path, "finetune.py", *FINETUNE, "--from-scratch", "--model", "resnet50",
                          "--output", out), "unknown model 'resnet50'")
    assert_nothing_written(tmp_path, out)


def test_checkpoint_of_another_architecture(tmp_path: Path) -> None:
    import torch

    out = tmp_path / "out"
    # a bare 64-wide state dict, fine-tuned as the default 192-wide vit_tiny
    bare = student_file(tmp_path / "bare.pt", embed_dim=64, record_config=False)
    line = assert_user_error(run(tmp_path, "finetune.py", *FINETUNE, "--pretrained", bare, "--patch-size", "16",
                                 "--depth", "1", "--output", out), "another architecture", "--model")
    assert "(1, 1, 64) vs (1, 1, 192)" in line
    # a training checkpoint of another model found in --output
    out.mkdir()
    torch.save({"model": {"cls_token": torch.zeros(1, 1, 32)}, "optimizer": {}, "scheduler": {}, "step": 3,
                "epoch": 0}, out / "checkpoint.pt")
    assert_user_error(run(tmp_path, "train.py", *TRAIN, "--output", out), "does not match this model",
                      "another --output")
    assert not temporaries(tmp_path)


def test_fewer_classes_than_the_data_has(tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = run(tmp_path, "finetune.py", *FINETUNE, "--from-scratch", "--num-classes", "4", "--output", out)
    assert_user_error(r, "the data has 10 classes", "--num-classes is 4", "pass --num-classes 10")
    assert_nothing_written(tmp_path, out)


def test_img_size_that_does_not_match_the_teacher_checkpoint(tmp_path: Path) -> None:
    import torch

    from fd_ref.models.vit import create_vit
    teacher = create_vit("vit_tiny", img_size=32, patch_size=16, depth=1)
    torch.save({"model": teacher.state_dict(), "model_config": teacher.config}, tmp_path / "teacher.pt")
    out = tmp_path / "out"
    r = run(tmp_path, "train.py", *TRAIN, "--teacher-checkpoint", tmp_path / "teacher.pt", "--img-size", "48",
            "--output", out)
    assert_user_error(r, "trained at 32 px", "--img-size is 48", "pass --img-size 32")
    assert_nothing_written(tmp_path, out)


# --------------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------------

def test_truncated_checkpoint(tmp_path: Path) -> None:
    good = student_file(tmp_path / "student.pt").read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good[: len(good) // 2])
    out = tmp_path / "out"
    for script, flags in (("finetune.py", [*FINETUNE, "--pretrained", cut]),
                          ("train.py", [*TRAIN, "--resume", cut]),
                          ("train.py", [*TRAIN, "--teacher-checkpoint", cut])):
        r = run(tmp_path, script, *flags, "--output", out)
        assert_user_error(r, str(cut), "truncated or corrupt", "earlier checkpoint")
        assert_nothing_written(tmp_path, out)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    assert_user_error(run(tmp_path, "train.py", *TRAIN, "--resume", empty, "--output", out), "ends too early")


class _RunsCode:
    """Unpickling this calls os.system: what a malicious checkpoint does."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_checkpoint_that_would_run_code_is_refused(tmp_path: Path) -> None:
    import torch

    def evil(path: Path, marker: Path) -> Path:
        torch.save({"model": {"w": torch.zeros(2)}, "model_config": {}, "step": 1, "payload": _RunsCode(
            f"touch {marker}")}, path)
        return path

    # the payload is real: loading it the unsafe way runs the command
    control = tmp_path / "control_marker"
    torch.load(evil(tmp_path / "control.pt", control), weights_only=False)
    assert control.exists()

    marker = tmp_path / "pwned"
    bad = evil(tmp_path / "evil.pt", marker)
    out = tmp_path / "out"
    for script, flags in (("finetune.py", [*FINETUNE, "--pretrained", bad]),
                          ("train.py", [*TRAIN, "--resume", bad]),
                          ("train.py", [*TRAIN, "--teacher-checkpoint", bad])):
        r = run(tmp_path, script, *flags, "--output", out)
        assert_user_error(r, "refused to load", str(bad), "could run code", "posix.system")
        assert not marker.exists(), "the checkpoint's code ran"
        assert_nothing_written(tmp_path, out)


def test_older_checkpoints_with_missing_keys(tmp_path: Path) -> None:
    import torch

    # a student.pt from an older version: no layer scale in its state, a model_config without newer keys
    old = student_file(tmp_path / "old.pt", state=("ls1.", "ls2."), config=("qkv_bias", "layer_scale_init"))
    out = tmp_path / "ft"
    r = run(tmp_path, "finetune.py", *FINETUNE, "--pretrained", old, "--max-steps", "2", "--output", out)
    assert r.rc == 0, r.err[-3000:]
    summary = [line for line in r.out.splitlines() if "missing" in line]
    assert len(summary) == 1, r.out
    assert "blocks.0.ls1.gamma" in summary[0] and "blocks.0.ls2.gamma" in summary[0]
    assert json.loads((out / "results.json").read_text())["steps"] == 2

    # a training checkpoint from an older version: no random state, position or counters
    out = tmp_path / "train"
    r = run(tmp_path, "train.py", *TRAIN, "--max-steps", "2", "--output", out)
    assert r.rc == 0, r.err[-3000:]
    blob = torch.load(out / "checkpoint.pt", weights_only=True)
    for key in ("rng", "micro", "best", "skipped", "config", "model_config"):
        blob.pop(key)
    torch.save(blob, out / "checkpoint.pt")
    r = run(tmp_path, "train.py", *TRAIN, "--max-steps", "4", "--output", out)
    assert r.rc == 0, r.err[-3000:]
    assert f"resumed from {out / 'checkpoint.pt'} at step 2" in r.out
    assert "records no random state" in r.out
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 4


# --------------------------------------------------------------------------------------------------------
# The launcher changes nothing: the same case through a fresh interpreter
# --------------------------------------------------------------------------------------------------------

def test_real_interpreter(tmp_path: Path) -> None:
    import torch

    marker = tmp_path / "pwned"
    torch.save({"model": _RunsCode(f"touch {marker}")}, tmp_path / "evil.pt")
    out = tmp_path / "out"
    r = run(tmp_path, "finetune.py", *FINETUNE, "--pretrained", tmp_path / "evil.pt", "--output", out,
            real=True, timeout=120)
    assert_user_error(r, "refused to load", "could run code")
    assert not marker.exists()
    assert_nothing_written(tmp_path, out)
