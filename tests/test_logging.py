"""What the runs log (issue 14): TensorBoard scalars equal to log.jsonl (and a resumed run appends to the
same run without duplicates), img/s counts training time only, the logged lr is the base lr, and the
start-up line says when the teacher is random."""
from __future__ import annotations

import json
import math
import re
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from hypothesis import example, given
from hypothesis import strategies as st
from torch.utils.data import TensorDataset

import finetune
import train
from fd_ref.engine import trainer as engine
from fd_ref.engine.job import Job, Run
from fd_ref.engine.trainer import Trainer
from fd_ref.errors import UserError
from fd_ref.optim.schedule import WarmupCosine

TINY = ["--img-size", "32", "--patch-size", "8", "--depth", "1", "--embed-dim", "16", "--num-heads", "2",
        "--teacher-patch-size", "8", "--teacher-depth", "1", "--synthetic-size", "32", "--batch-size", "8",
        "--num-workers", "0", "--progress", "false", "--epochs", "2", "--log-every", "1", "--warmup-epochs", "0"]


def read_log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines() if line.strip()]


def read_events(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(folder / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


# -- TensorBoard ---------------------------------------------------------------------------------------------
def test_tensorboard_events_equal_the_log_and_a_resume_appends(tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    train.main(TINY + ["--output", str(out), "--tensorboard", "--max-steps", "3"])
    train.main(TINY + ["--output", str(out), "--tensorboard"])  # resumes at step 3, ends at step 8
    events, log = read_events(out), read_log(out)
    assert [r["step"] for r in log] == list(range(1, 9))
    for key in ("loss", "lr", "grad_norm", "img_per_s"):
        steps, values = zip(*events[f"train/{key}"])
        assert list(steps) == list(range(1, 9)), key  # every step once: one run, nothing duplicated
        assert values == pytest.approx([r[key] for r in log], rel=1e-6), key  # float32 in the event file
    assert len(list((out / "tensorboard").iterdir())) == 2  # the resumed process appended its own file


def test_tensorboard_in_finetune_has_the_evaluations(tmp_path):
    pytest.importorskip("tensorboard")
    student = tmp_path / "fd"
    train.main(TINY + ["--output", str(student), "--max-steps", "2"])
    out = tmp_path / "ft"
    finetune.main(["--img-size", "32", "--synthetic-size", "32", "--batch-size", "8", "--num-workers", "0",
                   "--progress", "false", "--epochs", "2", "--warmup-epochs", "0", "--log-every", "2",
                   "--pretrained", str(student / "student.pt"), "--output", str(out), "--tensorboard"])
    events = read_events(out)
    evals = [r for r in read_log(out) if "top1" in r]
    assert [s for s, _ in events["eval/top1"]] == [r["step"] for r in evals] == [4, 8]
    assert [v for _, v in events["eval/top1"]] == pytest.approx([r["top1"] for r in evals], rel=1e-6)
    assert "train/loss" in events and "eval/val_loss" in events


def test_missing_tensorboard_is_one_error_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # the import now fails
    out = tmp_path / "run"
    with pytest.raises(UserError, match="pip install tensorboard"):
        train.main(TINY + ["--output", str(out), "--tensorboard"])
    with pytest.raises(UserError, match="pip install tensorboard"):
        finetune.main(["--output", str(tmp_path / "ft"), "--tensorboard", "--pretrained", str(tmp_path / "x.pt")])
    assert not list(tmp_path.iterdir())


# -- img/s and lr ----------------------------------------------------------------------------------------------
class FakeClock:
    """A stand-in for the engine's ``time`` module, advanced by the test: training micro-steps, evaluations
    and loader starts take the times the test chooses, so the measured speed shows what leaked into it."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def _tiny_trainer(tmp_path: Path, clock: FakeClock, *, layer_groups: bool, step_s: float = 1.0,
                  eval_s: float = 1000.0, network: bool = False, save_every: int = 0,
                  progress: bool = False) -> tuple[Trainer, WarmupCosine]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    data = TensorDataset(torch.randn(16, 4), torch.randint(0, 2, (16,)))
    if layer_groups:  # as with layer decay (a lower layer at lr_scale 0.5), plus one group above the base lr
        groups = [{"params": list(model[0].parameters()), "lr_scale": 0.5},
                  {"params": list(model[2].parameters()), "lr_scale": 1.0},
                  {"params": list(model[1].parameters()), "lr_scale": 2.0}]
    else:
        groups = [{"params": list(model.parameters())}]
    optimizer = torch.optim.SGD(groups, lr=0.1)

    def step_fn(batch):
        clock.now += step_s
        return nn.functional.cross_entropy(model(batch[0]), batch[1])

    def on_epoch_end(epoch: int) -> dict:
        clock.now += eval_s  # a slow evaluation
        return {"top1": 50.0}

    # 4 steps an epoch: linear warm-up over 2 steps (half an epoch) from 0, then cosine from 0.1 to 0.01
    run = Run(output=str(tmp_path), epochs=2, batch_size=4, log_every=2, progress=progress, warmup_epochs=0.5,
              save_every=save_every,
              lrs={"base_lr": 0.1, "warmup_lr": 0.0, "min_lr": 0.01})
    job = Job(step_fn=step_fn, model=model, optimizer=optimizer, dataset=data, deliverable=tmp_path / "results.json",
              on_epoch_end=on_epoch_end, network=model if network else None)  # no network: no FLOP count, no MFU
    trainer = Trainer(run, job)
    return trainer, trainer.scheduler


@given(step_s=st.floats(0.01, 10.0), eval_s=st.floats(0.0, 1e4), loader_s=st.floats(0.0, 1e3),
       save_s=st.floats(0.0, 1e3))
@example(step_s=1.0, eval_s=100.0, loader_s=10.0, save_s=5.0)  # every pause at once
def test_img_per_s_counts_training_steps_only(step_s, eval_s, loader_s, save_s):
    """img/s = images per step x steps / (elapsed - saving - evaluation - loader start), so with every
    micro-step taking step_s seconds each logged value is batch / step_s, whatever the pauses took (a save
    after every step, logging every second one: the pauses of several kinds add up between two logs)."""
    clock = FakeClock()
    with tempfile.TemporaryDirectory() as folder, pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine, "time", clock)
        trainer, _ = _tiny_trainer(Path(folder), clock, layer_groups=False, step_s=step_s, eval_s=eval_s,
                                   save_every=1)
        set_epoch, save = trainer.sampler.set_epoch, trainer.save

        def slow_save() -> None:
            clock.now += save_s
            save()

        trainer.save = slow_save

        def slow_loader_start(*args, **kwargs):  # a loader whose workers take loader_s to start each epoch
            clock.now += loader_s
            return set_epoch(*args, **kwargs)

        trainer.sampler.set_epoch = slow_loader_start
        trainer.fit()
        records = [r for r in read_log(Path(folder)) if "loss" in r]
    assert [r["step"] for r in records] == [2, 4, 6, 8]  # step 6 comes right after the first evaluation
    assert [r["img_per_s"] for r in records] == pytest.approx([4 / step_s] * 4, rel=1e-6)


def test_mfu_is_the_hand_counted_step_flops_times_img_per_s_over_the_peak(tmp_path, monkeypatch):
    """MFU = FLOPs per image x img/s / peak FLOP/s. For Linear(4,4) -> Linear(4,4) -> Linear(4,2) a training
    step costs, per image, 2 x in x out for each forward matmul (2 x (16 + 16 + 8) = 80), as much again for
    each weight gradient (80), and for the input gradients of the two upper layers (the data needs none):
    2 x (16 + 8) = 48; 208 in all, counted once on the first batch (the images, not the labels)."""
    clock, peaks = FakeClock(), []

    def fake_peak(dtype, device):
        peaks.append((dtype, device.type))
        return 1000.0

    monkeypatch.setattr(engine, "time", clock)
    monkeypatch.setattr(engine, "peak_flops", fake_peak)
    trainer, _ = _tiny_trainer(tmp_path, clock, layer_groups=False, step_s=0.5, network=True)
    trainer.fit()
    records = [r for r in read_log(tmp_path) if "loss" in r]
    assert peaks == [(torch.float32, "cpu")]  # asked once, for the run's precision and device
    assert trainer.flops_per_image == 208.0
    assert [r["img_per_s"] for r in records] == pytest.approx([8.0] * 4, rel=1e-9)  # 4 images / 0.5 s
    assert [r["mfu"] for r in records] == pytest.approx([208.0 * 8.0 / 1000.0] * 4, rel=1e-9)


def test_save_every_saves_after_each_multiple_and_the_bar_counts_steps(tmp_path, capsys):
    """--save-every 3 over 2 epochs of 4 steps: a checkpoint after steps 3 and 6, one at each epoch end (4, 8)
    and the final one (8); the progress bar ends at 8 of 8 steps."""
    trainer, _ = _tiny_trainer(tmp_path, FakeClock(), layer_groups=False, save_every=3, progress=True)
    save, saved_at = trainer.save, []

    def recorded_save() -> None:
        saved_at.append(trainer.step)
        save()

    trainer.save = recorded_save
    trainer.fit()
    assert saved_at == [3, 4, 6, 8, 8]
    renders = [r for r in re.split(r"[\r\n]", capsys.readouterr().err) if "step" in r]
    assert renders and " 8/8 [" in renders[-1]  # (past its total, tqdm would print "10step [...")


def test_logged_lr_is_the_base_lr_of_the_schedule(tmp_path):
    """The log shows the base (lr_scale 1) group's lr, neither a decayed layer's nor the largest group's;
    it is the schedule's own value:
    linear warm-up over 2 steps from 0, then cosine from 0.1 to 0.01 over the remaining 6 (hand formula)."""
    trainer, _ = _tiny_trainer(tmp_path, FakeClock(), layer_groups=True)
    trainer.fit()

    def expected(step: int) -> float:  # the lr in force after `step` optimiser steps
        if step < 2:
            return 0.1 * step / 2
        t = (step - 2) / 6
        return 0.01 + (0.1 - 0.01) * 0.5 * (1 + math.cos(math.pi * t))

    records = [r for r in read_log(tmp_path) if "loss" in r]
    assert [r["lr"] for r in records] == pytest.approx([expected(r["step"]) for r in records], rel=1e-9)
    # the other groups follow the published per-group schedule: their own peak 0.1 * lr_scale, the floor
    # and warm-up start shared (fd_ref.optim.schedule); checked in the middle of the cosine
    sched, groups = trainer.scheduler, trainer.job.optimizer.param_groups
    sched.load_state_dict({**sched.state_dict(), "step_count": 4})
    t = (4 - 2) / 6
    for group, scale in zip(groups, (0.5, 1.0, 2.0)):
        assert group["lr_scale"] == scale
        assert group["lr"] == pytest.approx(0.01 + (0.1 * scale - 0.01) * 0.5 * (1 + math.cos(math.pi * t)))


# -- start-up lines ----------------------------------------------------------------------------------------
def test_start_up_says_the_teacher_is_random(tmp_path, capsys):
    train.main(TINY + ["--output", str(tmp_path / "a"), "--max-steps", "1"])
    out = capsys.readouterr().out
    assert "randomly initialised" in out and "batch 8, lr" in out and "warning" not in out


def test_a_real_dataset_with_the_quickstart_teacher_warns(tmp_path, capsys):
    from PIL import Image
    data = tmp_path / "images"
    for c in ("a", "b"):
        (data / c).mkdir(parents=True)
        for i in range(8):
            Image.new("RGB", (32, 32), (i * 20, 0, 0)).save(data / c / f"{i}.png")
    train.main(TINY + ["--data", str(data), "--output", str(tmp_path / "b"), "--max-steps", "1"])
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "random teacher" in warnings[0] and str(data) in warnings[0]
