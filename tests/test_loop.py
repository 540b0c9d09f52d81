"""The training loop and its metrics, pinned down through the scripts' command lines and ``evaluate()``: gradient
accumulation equals the combined batch, a run stopped inside an accumulation resumes to the same weights,
clipping hands the optimiser the hand-clipped gradient (and ``--clip-grad 0`` nothing clipped), a skipped step
is neither logged nor restarts the loader, gradients are all-reduced on a step's last micro-batch only, a
parameter a step leaves without a gradient is not updated in it, a ``--max-steps`` stop inside an epoch
resumes exactly, a stop signal after the last step lets the run finish, ``evaluate()`` matches a hand count on
logits with ties, two gloo ranks evaluate an uneven validation set exactly as one process does,
``--train-subset`` trains on the subset, and fine-tuning learns a task that is easy to separate.

Each check fails on the bug it names (docs/testing.md lists the changes tried). Runs are in-process
(``train.main(argv)`` / ``finetune.main(argv)``), tiny (32 px, one or two blocks, a few steps), in fp32.
"""
from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import signal
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from torchvision.transforms import v2

import finetune
import train
from fd_ref.data.images import RobustImageFolder
from fd_ref.data.sampler import make_loader
from fd_ref.eval.evaluate import evaluate
from fd_ref.engine.faults import install_fault_hook
from fd_ref.engine.job import Job, Run
from fd_ref.engine.stop import STOP_EXIT_CODE
from fd_ref.engine.trainer import Trainer
from fault_injection import FaultInjection

TINY = ["--img-size", "32", "--patch-size", "8", "--depth", "2", "--embed-dim", "32", "--num-heads", "2",
        "--teacher-patch-size", "8", "--teacher-depth", "1", "--synthetic-size", "64", "--num-workers", "0",
        "--progress", "false", "--log-every", "1", "--warmup-epochs", "0", "--precision", "fp32",
        "--drop-path", "0", "--lr", "0.05", "--seed", "5", "--epochs", "1"]


def student(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "student.pt", map_location="cpu", weights_only=True)["model"]


def logged(folder: Path) -> list[dict]:
    import json
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines() if line.strip()]


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


# -- evaluate(): a hand count ------------------------------------------------------------------------------
def _lookup(table: torch.Tensor) -> nn.Module:
    """Logits looked up by sample index, as a linear layer over one-hot inputs: ``model(one_hot(i)) = table[i]``
    (a matrix product, so a bf16 autocast would round the logits)."""
    model = nn.Linear(table.shape[0], table.shape[1], bias=False)
    with torch.no_grad():
        model.weight.copy_(table.T)
    return model


def _hand_counts(logits: list[list[float]], labels: list[int]) -> tuple[int, int, float]:
    """(top-1 hits, top-5 hits, summed cross-entropy) by counting: a label is in the top k when fewer than
    k logits beat it; rows where ties make that ambiguous are not used (see the test)."""
    top1 = top5 = 0
    loss = 0.0
    for row, label in zip(logits, labels):
        beaten = sum(v > row[label] for v in row)
        top1 += beaten < 1
        top5 += beaten < 5
        loss += math.log(sum(math.exp(v) for v in row)) - row[label]
    return top1, top5, loss


def _unambiguous(row: list[float], label: int) -> bool:
    """No tie across the top-1 or top-5 boundary involves the label (so any tie order gives one answer)."""
    beaten = sum(v > row[label] for v in row)
    tied = sum(v == row[label] for v in row) - 1
    return all(not (beaten < k < beaten + tied + 1) for k in (1, 5))


def test_evaluate_matches_a_hand_count_on_logits_with_ties():
    """Logits from 4 values over 9 classes (many ties); rows with a tie at the label's own boundary are
    dropped, the other ties (among other classes, across a boundary) stay. Batches of uneven size. Called
    inside a bf16 autocast, as a bf16 run's evaluation is: evaluate() computes in float32 regardless (0.3 and
    1.7 are not bf16 numbers, so rounded logits would move the loss)."""
    rng = np.random.default_rng(0)
    rows, labels = [], []
    while len(rows) < 60:
        row, label = rng.choice([0.0, 0.3, 1.7, 2.9], size=9).tolist(), int(rng.integers(0, 9))
        if _unambiguous(row, label):
            rows.append(row)
            labels.append(label)
    top1, top5, loss = _hand_counts(rows, labels)
    assert 0 < top1 < top5 < len(rows)  # the data tells top-1 from top-5
    assert any(sorted(r, reverse=True)[4] == sorted(r, reverse=True)[5] for r in rows)  # ties at the boundary
    model = _lookup(torch.tensor(rows, dtype=torch.float32))
    inputs, target = torch.eye(len(rows)), torch.tensor(labels)
    loader = [(inputs[a:b], target[a:b]) for a, b in [(0, 7), (7, 32), (32, 33), (33, 60)]]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        metrics = evaluate(model, loader, torch.device("cpu"))
    assert set(metrics) == {"top1", "top5", "val_loss"}
    assert metrics["top1"] == pytest.approx(100 * top1 / len(rows), abs=1e-9)
    assert metrics["top5"] == pytest.approx(100 * top5 / len(rows), abs=1e-9)
    assert metrics["val_loss"] == pytest.approx(loss / len(rows), rel=1e-6)


def test_evaluate_on_one_image_and_on_none():
    """One image: its own top-1 (100 or 0) and loss, not a share of some larger count; no image at all (an
    empty shard): zeros, no division by zero."""
    model = _lookup(torch.tensor([[2.0, 0.5, 0.1]]))
    hit = evaluate(model, [(torch.eye(1), torch.tensor([0]))], torch.device("cpu"))
    miss = evaluate(model, [(torch.eye(1), torch.tensor([2]))], torch.device("cpu"))
    assert (hit["top1"], miss["top1"], miss["top5"]) == (100.0, 0.0, 100.0)
    assert miss["val_loss"] == pytest.approx(math.log(math.exp(2.0) + math.exp(0.5) + math.exp(0.1)) - 0.1, rel=1e-6)
    assert evaluate(model, [], torch.device("cpu")) == {"top1": 0.0, "top5": 0.0, "val_loss": 0.0}


# -- evaluate() on two gloo ranks --------------------------------------------------------------------------
NUM_CLASSES, IMAGES_PER_CLASS, BAD_FILES = 7, 2, ("c1/bad_a.png", "c4/bad_b.png", "c6/bad_c.png")


def _validation_folder(root: Path) -> Path:
    """7 classes x 2 images + 3 unreadable files: 17 files, an uneven split over 2 ranks x batch 3."""
    rng = np.random.default_rng(1)
    for c in range(NUM_CLASSES):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(IMAGES_PER_CLASS):
            pixels = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"c{c}" / f"img{i}.png")
    for name in BAD_FILES:
        (root / name).write_bytes(b"not an image")
    return root


def _classifier() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, NUM_CLASSES))


def _evaluate_folder(folder: Path, rank: int, world_size: int) -> dict:
    dataset = RobustImageFolder(folder, v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]))
    loader, _ = make_loader(dataset, 3, seed=0, shuffle=False, rank=rank, world_size=world_size,
                            drop_last=False)
    return {**evaluate(_classifier(), loader, torch.device("cpu")), "seen": sum(len(b[1]) for b in loader)}


def _rank(rank: int, port: int, folder: str, out: str) -> None:
    os.environ.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.save(_evaluate_folder(Path(folder), rank, 2), out)
    finally:
        torch.distributed.destroy_process_group()


def test_two_ranks_evaluate_an_uneven_validation_set_as_one_process(tmp_path):
    folder = _validation_folder(tmp_path / "val")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_rank, args=(r, port, str(folder), str(tmp_path / f"rank{r}.pt"))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        if p.is_alive():
            p.kill()
            p.join()
    assert [p.exitcode for p in procs] == [0, 0]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    one = _evaluate_folder(folder, 0, 1)
    files = NUM_CLASSES * IMAGES_PER_CLASS + len(BAD_FILES)
    assert [r["seen"] for r in ranks] == [9, 8] and one["seen"] == files  # uneven shards, every file once
    assert one["skipped_val_images"] == len(BAD_FILES)
    for r in ranks:  # every rank returns the totals over both
        assert r["skipped_val_images"] == one["skipped_val_images"]
        assert r["top1"] == pytest.approx(one["top1"], abs=1e-9)
        assert r["top5"] == pytest.approx(one["top5"], abs=1e-9)
        assert r["val_loss"] == pytest.approx(one["val_loss"], rel=1e-6)
    assert one["top1"] < one["top5"]


# -- clipping ----------------------------------------------------------------------------------------------
def _record_gradients(monkeypatch) -> list[tuple[float, list[torch.Tensor], list[torch.Tensor]]]:
    """Per optimiser step: (the raw gradient's global norm, the raw gradients, the gradients the optimiser
    was handed). Raw: right after backward accumulated them (a post-accumulate hook, before the loop clips)."""
    steps: list[tuple[float, list[torch.Tensor], list[torch.Tensor]]] = []
    build = train.build_optimizer

    def recording_build(*args, **kwargs):
        optimizer = build(*args, **kwargs)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        raw: dict[int, torch.Tensor] = {}
        for i, p in enumerate(params):
            p.register_post_accumulate_grad_hook(lambda p, i=i: raw.__setitem__(i, p.grad.detach().clone()))

        def before_step(opt, args, kwargs):  # noqa: ARG001
            grads = [raw[i] for i in range(len(params))]
            norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))
            steps.append((norm, grads, [p.grad.detach().clone() for p in params]))
        optimizer.register_step_pre_hook(before_step)
        return optimizer

    monkeypatch.setattr(train, "build_optimizer", recording_build)
    return steps


def test_clipping_hands_the_optimiser_the_hand_clipped_gradient(tmp_path, monkeypatch):
    """With a limit below every step's gradient norm, the optimiser sees g * c / ||g|| (||.||: the global
    L2 norm over every trained parameter)."""
    steps = _record_gradients(monkeypatch)
    limit = 1e-3
    train.main(TINY + ["--batch-size", "16", "--max-steps", "2", "--clip-grad", str(limit),
                       "--output", str(tmp_path / "clipped")])
    assert len(steps) == 2
    for norm, raw, seen in steps:
        assert norm > 10 * limit
        for g, s in zip(raw, seen):
            torch.testing.assert_close(s, g * (limit / norm), rtol=1e-5, atol=1e-12)
        assert math.sqrt(sum(float(s.double().pow(2).sum()) for s in seen)) == pytest.approx(limit, rel=1e-5)


class _ScaleLoss:
    """A fault hook that multiplies every micro-batch loss (and so the gradient) by ``factor``."""

    def __init__(self, factor: float) -> None:
        self.factor = factor

    def corrupt_loss(self, attempt: int, loss: torch.Tensor) -> torch.Tensor:  # noqa: ARG002
        return loss * self.factor

    def after_step(self, step: int, rank: int) -> None:
        pass


def test_clip_grad_0_clips_nothing(tmp_path, monkeypatch):
    """--clip-grad 0 with the loss scaled by 1e6 (a gradient norm far above any limit one would set): the
    optimiser sees the raw gradient, bit for bit."""
    steps = _record_gradients(monkeypatch)
    install_fault_hook(_ScaleLoss(1e6))
    try:
        train.main(TINY + ["--batch-size", "16", "--max-steps", "2", "--clip-grad", "0",
                           "--output", str(tmp_path / "unclipped")])
    finally:
        install_fault_hook(None)
    assert len(steps) == 2
    for norm, raw, seen in steps:
        assert norm > 1e3
        assert all(torch.equal(g, s) for g, s in zip(raw, seen))


# -- gradient accumulation ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def batch16(tmp_path_factory) -> Path:
    """4 steps of batch 16 (the reference for the accumulated runs)."""
    out = tmp_path_factory.mktemp("batch16")
    train.main(TINY + ["--batch-size", "16", "--output", str(out)])
    return out


@pytest.mark.parametrize("batch,accum", [(8, 2), (4, 4)])
def test_accumulation_equals_the_combined_batch(batch16, tmp_path, batch, accum):
    """k micro-batches of 16/k per step = batch 16: the same images, the mean of the micro-batches' losses, one
    optimiser step; after 4 steps the weights agree to 1e-6 (fp32) and so does every logged loss."""
    out = tmp_path / "accum"
    train.main(TINY + ["--batch-size", str(batch), "--accum-steps", str(accum), "--output", str(out)])
    a, b = logged(batch16), logged(out)
    assert [r["step"] for r in b] == [r["step"] for r in a] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert ra["loss"] > 0  # smooth-L1 of an untrained student: the sum of the micro-batch terms, not a difference
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-6, rel=1e-6)
        assert rb["lr"] == ra["lr"]
    assert max_difference(student(batch16), student(out)) < 1e-6


def test_accumulation_leaves_an_odd_micro_batch_out(tmp_path):
    """72 images, batch 8: 9 micro-batches an epoch, 4 steps of 2; the 9th is not used (nothing of it leaks into
    the next epoch's first step), exactly as batch 16 leaves the last 8 images of the epoch's order out."""
    more = ["--synthetic-size", "72", "--epochs", "2"]
    train.main(TINY + more + ["--batch-size", "16", "--output", str(tmp_path / "b16")])
    train.main(TINY + more + ["--batch-size", "8", "--accum-steps", "2", "--output", str(tmp_path / "acc")])
    assert [r["step"] for r in logged(tmp_path / "acc") if "loss" in r] == list(range(1, 9))
    assert max_difference(student(tmp_path / "b16"), student(tmp_path / "acc")) < 1e-6


class _SignalInsideAccumulation:
    """A fault hook: SIGTERM to this process during the first micro-batch of optimiser step ``at``."""

    def __init__(self, at: int) -> None:
        self.at, self.calls = at, 0

    def corrupt_loss(self, attempt: int, loss: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if attempt == self.at and self.calls == 2 * (self.at - 1) + 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    def after_step(self, step: int, rank: int) -> None:
        pass


def test_stop_inside_an_accumulation_resumes_to_the_same_weights(batch16, tmp_path):
    """SIGTERM arrives between the two micro-batches of step 3: the loop finishes that step, saves, exits;
    the same command then continues to the weights of the uninterrupted run (which equal batch 16's)."""
    argv = TINY + ["--batch-size", "8", "--accum-steps", "2", "--output", str(tmp_path / "stopped")]
    hook = _SignalInsideAccumulation(at=3)
    install_fault_hook(hook)
    try:
        with pytest.raises(SystemExit) as stop:
            train.main(argv)
    finally:
        install_fault_hook(None)
    assert stop.value.code == STOP_EXIT_CODE
    saved = torch.load(tmp_path / "stopped" / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert (saved["step"], saved["micro"]) == (3, 6)
    train.main(argv)
    assert [r["step"] for r in logged(tmp_path / "stopped")] == [1, 2, 3, 4]
    assert max_difference(student(batch16), student(tmp_path / "stopped")) < 1e-6


# -- skipped steps, the loader and gradient sync under accumulation ------------------------------------------
class _NanAttempts:
    """A fault hook: NaN losses at the given step attempts (``step + skipped + 1``, 1-based: skipped attempts
    count); it records the attempt number the loop gives each micro-batch and, after each optimiser step, a
    copy of ``watch`` (if given)."""

    def __init__(self, bad: set[int], watch: torch.Tensor | None = None) -> None:
        self.bad, self.watch, self.seen, self.after = bad, watch, [], []

    def corrupt_loss(self, attempt: int, loss: torch.Tensor) -> torch.Tensor:
        self.seen.append(attempt)
        return loss * float("nan") if attempt in self.bad else loss

    def after_step(self, step: int, rank: int) -> None:  # noqa: ARG002
        if self.watch is not None:
            self.after.append(self.watch.detach().clone())


def test_skipped_steps_are_not_logged_and_do_not_restart_the_loader(tmp_path, monkeypatch, capsys):
    """--nan-policy skip with 2 micro-batches a step and attempts 2 and 3 made NaN: 2 epochs of 4 attempts
    give 6 steps. Each micro-batch is given its attempt's number (both micro-batches of attempt a get a), each
    step is logged once and no skipped one is, the two skips are reported as step 2's, and the loader is
    started once an epoch: neither a skipped step nor a micro-batch restarts it (the same batches would follow,
    but each restart starts the workers again)."""
    starts = []
    original_iter = torch.utils.data.DataLoader.__iter__

    def counted_iter(loader):
        starts.append(loader)
        return original_iter(loader)

    monkeypatch.setattr(torch.utils.data.DataLoader, "__iter__", counted_iter)
    hook = _NanAttempts({2, 3})
    install_fault_hook(hook)
    out = tmp_path / "skip"
    try:
        train.main(TINY + ["--batch-size", "8", "--accum-steps", "2", "--epochs", "2", "--nan-policy", "skip",
                           "--output", str(out)])
    finally:
        install_fault_hook(None)
    assert hook.seen == [a for a in range(1, 9) for _ in range(2)]
    records = [r for r in logged(out) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r.get("skipped_steps", 0) for r in records] == [0, 2, 2, 2, 2, 2]
    assert all(math.isfinite(r["loss"]) for r in records)
    printed = capsys.readouterr().out
    assert "step 2: loss nan" in printed and "step skipped (1 so far)" in printed
    assert "step skipped (2 so far)" in printed and "(3 so far)" not in printed
    assert len(starts) == 2


@pytest.mark.parametrize("at, stops", [(7, True), (8, False)])
def test_a_stop_signal_after_the_last_step_lets_the_run_finish(tmp_path, at, stops):
    """SIGTERM after step 7 of 8 stops the run there (exit code, checkpoint at step 7); after step 8 the work
    is done: the run ends as an uninterrupted one does (the student written, the checkpoint finished)."""
    out = tmp_path / "run"
    install_fault_hook(FaultInjection(signal_at_step=at, signal_name="SIGTERM"))
    try:
        if stops:
            with pytest.raises(SystemExit) as stop:
                train.main(TINY + ["--batch-size", "8", "--output", str(out)])
            assert stop.value.code == STOP_EXIT_CODE
        else:
            train.main(TINY + ["--batch-size", "8", "--output", str(out)])
    finally:
        install_fault_hook(None)
    saved = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert saved["step"] == at and saved["finished"] is (not stops)
    assert (out / "student.pt").exists() is (not stops)


def test_a_parameter_without_a_gradient_in_a_step_is_not_updated(tmp_path):
    """Gradients are dropped (set to None) after every step, taken or skipped, so a parameter that a step does
    not use gets no update in it: no weight decay, no momentum (zeroed gradients would give it both). The
    extra layer is used at attempts 1 and 3 only; attempt 3 is NaN and skipped (SGD: read back at once)."""
    torch.manual_seed(0)
    model, extra = nn.Linear(4, 2), nn.Linear(2, 2)
    attempts = []

    def step_fn(batch):
        attempts.append(len(attempts) + 1)
        out = model(batch[0])
        if attempts[-1] in (1, 3):
            out = extra(out)
        return nn.functional.cross_entropy(out, batch[1])

    data = torch.utils.data.TensorDataset(torch.randn(16, 4), torch.randint(0, 2, (16,)))
    params = list(model.parameters()) + list(extra.parameters())
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.1)
    run = Run(output=str(tmp_path), epochs=1, batch_size=4, log_every=1, progress=False, nan_policy="skip")
    job = Job(step_fn=step_fn, model=nn.ModuleList([model, extra]), optimizer=optimizer, dataset=data,
              deliverable=tmp_path / "done.json")
    before = extra.weight.detach().clone()
    hook = _NanAttempts({3}, watch=extra.weight)
    install_fault_hook(hook)
    try:
        Trainer(run, job).fit()
    finally:
        install_fault_hook(None)
    assert attempts == [1, 2, 3, 4] and len(hook.after) == 3  # steps 1, 2 and (after the skip) 3
    assert not torch.equal(hook.after[0], before)
    assert torch.equal(hook.after[1], hook.after[0]) and torch.equal(hook.after[2], hook.after[0])


class _CountingDDP:
    """Stands in for DistributedDataParallel where only ``no_sync`` matters: says whether it is active."""

    def __init__(self) -> None:
        self.active = False

    @contextlib.contextmanager
    def no_sync(self):
        self.active = True
        try:
            yield
        finally:
            self.active = False


def test_gradients_are_synchronised_on_the_last_micro_batch_of_a_step_only(tmp_path):
    """Under accumulation the ranks' gradients are all-reduced once a step: every micro-batch but the last runs
    inside DDP's ``no_sync`` (the sum is the same either way; the traffic is k times smaller)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    ddp, inside = _CountingDDP(), []

    def step_fn(batch):
        inside.append(ddp.active)
        return nn.functional.cross_entropy(model(batch[0]), batch[1])

    data = torch.utils.data.TensorDataset(torch.randn(24, 4), torch.randint(0, 2, (24,)))
    run = Run(output=str(tmp_path), epochs=1, batch_size=4, accum_steps=3, log_every=1, progress=False)
    job = Job(step_fn=step_fn, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), dataset=data,
              deliverable=tmp_path / "done.json", ddp=ddp)
    Trainer(run, job).fit()
    assert inside == [True, True, False, True, True, False]


def test_max_steps_inside_an_epoch_under_accumulation_resumes_to_the_same_weights(batch16, tmp_path):
    """--max-steps 2 of 4 (2 micro-batches of 8 a step): the run stops half-way through its epoch, the checkpoint
    says so (epoch 0, micro-batch 4), and the same command without --max-steps continues that epoch to the
    weights of batch 16."""
    out = tmp_path / "short"
    argv = TINY + ["--batch-size", "8", "--accum-steps", "2", "--output", str(out)]
    train.main(argv + ["--max-steps", "2"])
    saved = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert (saved["step"], saved["epoch"], saved["micro"]) == (2, 0, 4)
    train.main(argv)
    assert [r["step"] for r in logged(out) if "loss" in r] == [1, 2, 3, 4]
    assert max_difference(student(batch16), student(out)) < 1e-6


def test_max_steps_at_an_epoch_boundary_does_not_start_the_next_epoch(tmp_path):
    """--max-steps 8 with 8 steps an epoch and 2 epochs: the run ends after step 8, its first epoch complete
    (the checkpoint says epoch 1, micro-batch 0), without a step of the second."""
    out = tmp_path / "boundary"
    train.main(TINY + ["--batch-size", "8", "--epochs", "2", "--max-steps", "8", "--output", str(out)])
    assert [r["step"] for r in logged(out) if "loss" in r] == list(range(1, 9))
    saved = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert (saved["step"], saved["epoch"], saved["micro"], saved["finished"]) == (8, 1, 0, True)


# -- --train-subset ----------------------------------------------------------------------------------------
def test_train_subset_trains_on_the_subset_only(tmp_path):
    """--train-subset 24 of 64 images, batch 8: 3 steps an epoch, not 8; a subset of 16 (2 steps) gives other
    weights than the same run on all 64 images stopped after 2 steps."""
    out = tmp_path / "subset"
    train.main(TINY + ["--batch-size", "8", "--train-subset", "24", "--output", str(out)])
    assert [r["step"] for r in logged(out) if "loss" in r] == [1, 2, 3]
    full, small = tmp_path / "full", tmp_path / "small"
    train.main(TINY + ["--batch-size", "8", "--max-steps", "2", "--output", str(full)])
    train.main(TINY + ["--batch-size", "8", "--train-subset", "16", "--output", str(small)])
    assert [r["step"] for r in logged(small) if "loss" in r] == [1, 2]
    assert max_difference(student(full), student(small)) > 1e-4


# -- fine-tuning learns ------------------------------------------------------------------------------------
def _two_colour_folder(root: Path, per_class: dict[str, int]) -> Path:
    """root/<split>/{red,blue}/*.png: noisy 32 px images whose mean colour alone tells the class."""
    rng = np.random.default_rng(2)
    for split, n in per_class.items():
        for c, name in enumerate(("red", "blue")):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 150, size=(32, 32, 3))
                pixels[..., 0 if c == 0 else 2] += 100
                Image.fromarray(pixels.astype(np.uint8)).save(root / split / name / f"{i}.png")
    return root


def test_fine_tuning_learns_a_separable_task(tmp_path):
    """Two classes told apart by the mean colour (red or blue channel +100 on uniform noise), 64 training
    and 32 validation images, a one-block ViT from scratch: after 4 epochs top-1 on the validation images
    is at least 90% (chance: 50%)."""
    data = _two_colour_folder(tmp_path / "data", {"train": 32, "val": 16})
    results = finetune.main([
        "--data", str(data), "--img-size", "32", "--num-classes", "2",
        "--batch-size", "16", "--num-workers", "0", "--progress", "false", "--precision", "fp32",
        "--from-scratch", "--model", "vit_tiny", "--patch-size", "8", "--depth", "1", "--embed-dim", "32",
        "--num-heads", "2", "--epochs", "4", "--warmup-epochs", "1", "--lr", "0.02", "--mixup", "0",
        "--cutmix", "0", "--auto-augment", "none", "--color-jitter", "0", "--random-erasing", "0",
        "--label-smoothing", "0", "--drop-path", "0", "--seed", "0", "--output", str(tmp_path / "ft")])
    assert results["final"]["top1"] >= 90.0, results["final"]
