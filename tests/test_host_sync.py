"""No host-device synchronisation on a training step that does not log: between two optimiser steps that do
not log, nothing turns a tensor into a Python value (``item``, ``float``, ``int``, ``bool``, ``cpu``, ``tolist``,
``numpy``, formatting), so a GPU's kernel queue never drains mid-run; logging steps read back, and the logged
values are what each step's own read-back would give. Runs train.py and finetune.py through ``main``; the
images are prepared in a loader worker (a separate process), as in any real run."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

import finetune
import train

SYNCING = ("item", "__float__", "__int__", "__bool__", "__format__", "cpu", "tolist", "numpy")
TINY = ["--img-size", "32", "--patch-size", "16", "--depth", "1", "--embed-dim", "64", "--num-heads", "2",
        "--num-workers", "1", "--batch-size", "4", "--synthetic-size", "64", "--progress", "false", "--seed", "1"]


def syncs_after_each_step(monkeypatch, run) -> list[int]:
    """Run ``run()`` with every syncing Tensor method counted; the count after each optimiser step."""
    count = [0]
    for name in SYNCING:
        def counted(self, *args, _original=getattr(torch.Tensor, name), **kwargs):
            count[0] += 1
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    marks: list[int] = []
    hook = register_optimizer_step_post_hook(lambda *_: marks.append(count[0]))
    try:
        run()
    finally:
        hook.remove()
        monkeypatch.undo()
    return marks


def between_steps(marks: list[int]) -> dict[int, int]:
    """{k: syncs after optimiser step k's update up to step k + 1's}: step k's logging (if it logs), then
    step k + 1's loading, forward, backward, clipping and update."""
    return {k: b - a for k, (a, b) in enumerate(zip(marks, marks[1:]), start=1)}


@pytest.mark.parametrize("nan_policy", ["stop", "skip"])
def test_no_sync_between_steps_that_do_not_log(tmp_path: Path, monkeypatch, nan_policy: str) -> None:
    out = tmp_path / "fd"
    marks = syncs_after_each_step(monkeypatch, lambda: train.main(
        TINY + ["--teacher", "vit_tiny", "--teacher-patch-size", "16", "--teacher-depth", "1", "--precision", "fp32",
                "--epochs", "1", "--max-steps", "9", "--log-every", "4", "--nan-policy", nan_policy,
                "--output", str(out)]))
    assert len(marks) == 9
    gaps = between_steps(marks)
    assert {k: n for k, n in gaps.items() if k % 4} == {k: 0 for k in gaps if k % 4}, gaps
    assert gaps[4] > 0 and gaps[8] > 0  # logging steps do read back (the counting sees them)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [4, 8, 9]
    assert all(isinstance(r["loss"], float) and isinstance(r["grad_norm"], float) for r in log)


def test_no_sync_between_fine_tuning_steps_that_do_not_log(tmp_path: Path, monkeypatch) -> None:
    """Fine-tuning (fused AdamW, random erasing and mixing on the device) from scratch."""
    marks = syncs_after_each_step(monkeypatch, lambda: finetune.main(
        TINY + ["--from-scratch", "--num-classes", "10", "--precision", "fp32", "--epochs", "1", "--max-steps", "7",
                "--log-every", "3", "--eval-every", "100", "--output", str(tmp_path / "ft")]))
    gaps = between_steps(marks)
    assert len(marks) == 7 and {k: n for k, n in gaps.items() if k % 3} == {k: 0 for k in gaps if k % 3}, gaps
