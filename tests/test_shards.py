"""Tar shards (fd_ref.data.shards, fd_ref.data.make_shards) keep a folder's promises: the converter is
deterministic and refuses to overwrite; sample ``i`` of the shards is image ``i`` of the folder; every sample
is seen once per epoch across ranks and loader workers whatever the number of shards, in an order fixed by
(seed, epoch); a run stopped mid-epoch resumes to the uninterrupted losses; a bad image inside a shard is
skipped and counted like a bad file of a folder; a truncated shard is one line at start, a shard lost during
the run is skipped and counted; ``--val-split`` never trains on a held-out sample; and ``--eval-only`` /
``--knn`` give the folder's numbers.

The data is made here: a few dozen small JPEGs, each of unique random pixels (an image names its sample).
"""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from PIL import Image

import finetune
import train
from fd_ref.data import build_dataset
from fd_ref.data.make_shards import make_shards
from fd_ref.data.sampler import make_loader
from fd_ref.data.splits import train_val_datasets
from fd_ref.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ("a", "b", "c")


def make_folder(root: Path, per_class: int, size: tuple[int, int] = (36, 40), seed: int = 0,
                bad: tuple[str, ...] = ()) -> Path:
    """``root/<class>/<NN>.jpg``: random pixels, quality 90; the names in ``bad`` (``"b/03.jpg"``) are
    written as a truncated JPEG instead."""
    rng = np.random.default_rng(seed)
    for c in CLASSES:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            path = root / c / f"{i:02d}.jpg"
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path, quality=90)
            if f"{c}/{i:02d}.jpg" in bad:
                path.write_bytes(path.read_bytes()[:200])  # a JPEG cut off after its headers
    return root


def fingerprint(image) -> bytes:
    return np.asarray(image).tobytes()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """ImageNet's layout: train/ (3 x 8 images) and val/ (3 x 3)."""
    root = tmp_path_factory.mktemp("folder")
    make_folder(root / "train", 8, seed=1)
    make_folder(root / "val", 3, seed=2)
    return root


@pytest.fixture(scope="module")
def shards(folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "s"
    make_shards(str(folder), out, 5)
    return out


# -- the converter ------------------------------------------------------------------------------------------
def test_make_shards_layout_same_bytes_and_no_overwrite(folder, shards, tmp_path):
    assert sorted(p.name for p in shards.iterdir()) == (
        [f"train-{i:06d}.tar" for i in range(5)] + ["train.json"] + ["val-000000.tar", "val-000001.tar", "val.json"])
    index = json.loads((shards / "train.json").read_text())
    assert index["wids_version"] == 1 and index["classes"] == list(CLASSES)
    assert [s["nsamples"] for s in index["shardlist"]] == [5, 5, 5, 5, 4]
    again = tmp_path / "again"
    make_shards(str(folder), again, 5)
    for path in shards.iterdir():  # the same input, the same bytes
        assert (again / path.name).read_bytes() == path.read_bytes(), path.name
    run = subprocess.run([sys.executable, "-m", "fd_ref.data.make_shards", str(folder), str(again),
                          "--shard-size", "5"], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "already exists" in run.stderr


def test_shard_sample_i_is_folder_image_i(folder, shards):
    for train_split in (True, False):
        a, b = build_dataset(str(folder), train_split, None), build_dataset(str(shards), train_split, None)
        assert len(a) == len(b) and a.classes == b.classes
        for i in range(len(a)):
            (x, y), (u, v) = a[i], b[i]
            assert y == v and fingerprint(x) == fingerprint(u), i
    # a brace pattern of the same files, and the wids description, name the same samples
    pattern = build_dataset(str(shards / "train-{000000..000004}.tar"), True, None)
    described = build_dataset(str(shards / "train.json"), True, None)
    assert len(pattern) == len(described) == 24
    assert fingerprint(pattern[23][0]) == fingerprint(described[23][0]) == fingerprint(a_train(folder)[23][0])


def a_train(folder):
    return build_dataset(str(folder), True, None)


def test_synthetic_shards_are_the_synthetic_set(tmp_path):
    make_shards("synthetic", tmp_path / "s", 7, synthetic_size=20, img_size=16, seed=3)
    for train_split in (True, False):
        kw = dict(synthetic_size=20, synthetic_image_size=16, seed=3)
        a, b = build_dataset("synthetic", train_split, None, **kw), build_dataset(str(tmp_path / "s"), train_split, None)
        assert len(a) == len(b) and [a[i][1] for i in range(len(a))] == [b[i][1] for i in range(len(b))]
        assert all(fingerprint(a[i][0]) == fingerprint(b[i][0]) for i in range(len(a)))  # PNG: lossless


# -- every sample once per epoch, order fixed by (seed, epoch) -----------------------------------------------
def _seen(dataset, batch: int, world: int, workers: int, seed: int, epoch: int, shuffle: bool,
          drop_last: bool) -> list[list[bytes]]:
    """The fingerprints each rank's loader yields in one epoch, in order."""
    per_rank = []
    for rank in range(world):
        loader, sampler = make_loader(dataset, batch, seed=seed, shuffle=shuffle, rank=rank, world_size=world,
                                      num_workers=workers, drop_last=drop_last)
        sampler.set_epoch(epoch)
        per_rank.append([bytes(row) for images, _ in loader for row in images.numpy()])
    return per_rank


def _as_bytes(image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image).reshape(-1).copy())


@settings(max_examples=12)
@given(shard_size=st.integers(1, 30), world=st.integers(1, 4), workers=st.integers(0, 2),
       batch=st.integers(1, 5), seed=st.integers(0, 3))
def test_every_sample_once_per_epoch_across_ranks_and_workers(tmp_path_factory, folder, shard_size, world,
                                                              workers, batch, seed):
    """Evaluation order (every sample kept): across ranks and workers each sample exactly once, also when
    the shards are fewer than ranks x workers (shard_size 30: one shard). Training order (shuffled, the last
    partial global batch dropped): no sample twice, and exactly the samples a folder gives."""
    out = tmp_path_factory.mktemp("once") / "s"
    make_shards(str(folder / "train"), out, shard_size)
    shards = build_dataset(str(out), True, _as_bytes)
    plain = a_train(folder)
    expected = sorted(fingerprint(plain[i][0]) for i in range(len(plain)))
    seen = _seen(shards, batch, world, workers, seed, 0, shuffle=False, drop_last=False)
    assert sorted(b for rank in seen for b in rank) == expected
    seen = _seen(shards, batch, world, workers, seed, 1, shuffle=True, drop_last=True)
    flat = [b for rank in seen for b in rank]
    assert len(flat) == len(set(flat)) == len(expected) // (batch * world) * (batch * world)
    folder_seen = _seen(build_dataset(str(folder / "train"), True, _as_bytes), batch, world, 0, seed, 1,
                        shuffle=True, drop_last=True)
    assert seen == folder_seen  # the folder's order, rank by rank


def test_order_is_fixed_by_seed_and_epoch(shards):
    dataset = build_dataset(str(shards), True, _as_bytes)
    first = _seen(dataset, 4, 2, 0, seed=5, epoch=2, shuffle=True, drop_last=True)
    assert _seen(dataset, 4, 2, 2, seed=5, epoch=2, shuffle=True, drop_last=True) == first  # workers: same
    assert _seen(dataset, 4, 2, 0, seed=5, epoch=3, shuffle=True, drop_last=True) != first
    assert _seen(dataset, 4, 2, 0, seed=6, epoch=2, shuffle=True, drop_last=True) != first


# -- exact resume ---------------------------------------------------------------------------------------------
TINY = ["--img-size", "32", "--patch-size", "8", "--depth", "2", "--embed-dim", "32", "--num-heads", "2",
        "--teacher-patch-size", "8", "--teacher-depth", "1", "--progress", "false", "--log-every", "1",
        "--warmup-epochs", "0", "--batch-size", "6", "--epochs", "2", "--drop-path", "0.2", "--lr", "0.05",
        "--seed", "3"]


def _log(folder: Path) -> list[tuple]:
    records = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines() if line.strip()]
    return [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in records if "loss" in r]


def test_a_run_on_shards_stopped_mid_epoch_resumes_exactly(shards, tmp_path):
    """Stop after 3 of 8 steps (epoch 0 has 4), rerun the same command: the losses, gradient norms and
    learning rates of every step equal the uninterrupted run's bit for bit; the resumed half reads the
    shards with two loader workers, the uninterrupted run with none."""
    data = ["--data", str(shards), "--num-workers", "0"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train.main(TINY + data + ["--output", str(whole)])
    train.main(TINY + data + ["--output", str(parts), "--max-steps", "3"])
    assert [s for s, *_ in _log(parts)] == [1, 2, 3]
    train.main(TINY + data[:2] + ["--num-workers", "2", "--output", str(parts)])
    assert [s for s, *_ in _log(whole)] == list(range(1, 9))
    assert _log(parts) == _log(whole)


# -- bad images, bad shards ------------------------------------------------------------------------------------
def test_a_bad_image_in_a_shard_is_skipped_and_counted_like_in_a_folder(tmp_path, caplog):
    """The cut JPEG is replaced by the next readable sample (as in the folder), counted once, named in a
    warning; in a loader with workers, the count reaches the main process."""
    src = make_folder(tmp_path / "f", 4, bad=("b/01.jpg",))
    make_shards(str(src), tmp_path / "s", 3)
    a, b = build_dataset(str(src), True, None), build_dataset(str(tmp_path / "s"), True, None)
    with caplog.at_level(logging.WARNING, logger="fd_ref.data"):
        pairs = [(a[i], b[i]) for i in range(len(a))]
    assert all(x[1] == u[1] and fingerprint(x[0]) == fingerprint(u[0]) for (x, u) in pairs)
    assert a.num_skipped == b.num_skipped == 1
    assert sum("unreadable image 5 of shard" in r.getMessage() for r in caplog.records) == 1
    fresh = build_dataset(str(tmp_path / "s"), True, _as_bytes)
    loader, _ = make_loader(fresh, 4, seed=0, shuffle=False, num_workers=2, drop_last=False)
    assert sum(len(x) for x, _ in loader) == 12 and fresh.num_skipped == 1


def test_a_truncated_shard_is_one_line_at_start(folder, tmp_path):
    make_shards(str(folder / "train"), tmp_path / "s", 5)
    tar = tmp_path / "s" / "train-000002.tar"
    tar.write_bytes(tar.read_bytes()[:1500])  # cut inside its first image
    with pytest.raises(UserError, match=r"train-000002\.tar has 1500 bytes but its index records"):
        build_dataset(str(tmp_path / "s"), True, None)
    (tmp_path / "s" / "train.json").unlink()  # no index: the tar itself shows the cut
    with pytest.raises(UserError, match=r"cannot read shard .*train-000002\.tar \(truncated"):
        build_dataset(str(tmp_path / "s"), True, None)
    run = subprocess.run([sys.executable, "train.py", "--data", str(tmp_path / "s"), "--output",
                          str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "truncated" in run.stderr


def test_a_shard_lost_during_the_run_is_skipped_and_counted(folder, tmp_path, caplog):
    make_shards(str(folder / "train"), tmp_path / "s", 5)
    dataset = build_dataset(str(tmp_path / "s"), True, None)
    (tmp_path / "s" / "train-000001.tar").write_bytes(b"\0" * 100)  # damaged after the start
    with caplog.at_level(logging.WARNING, logger="fd_ref.data"):
        labels = [dataset[i][1] for i in range(len(dataset))]
    assert dataset.num_skipped == 5 and len(labels) == 24
    lines = [r.getMessage() for r in caplog.records if "unreadable shard" in r.getMessage()]
    assert len(lines) == 1 and "train-000001.tar" in lines[0] and "its 5 images" in lines[0]


# -- --val-split ---------------------------------------------------------------------------------------------
def test_val_split_on_shards_never_trains_on_a_held_out_sample(tmp_path):
    """The split holds out the folder's images; a bad training sample is replaced from the training side."""
    src = make_folder(tmp_path / "f", 6, bad=("a/02.jpg", "b/05.jpg", "c/00.jpg"))
    make_shards(str(src), tmp_path / "s", 4)
    for split_seed in range(4):
        on_shards = train_val_datasets(str(tmp_path / "s"), None, None, val_split=6, split_seed=split_seed)
        on_folder = train_val_datasets(str(src), None, None, val_split=6, split_seed=split_seed)
        sides = [{fingerprint(ds[i][0]) for i in range(len(ds))} for ds in on_shards]
        assert not sides[0] & sides[1], split_seed
        for s, f in zip(on_shards, on_folder):
            assert s.indices == f.indices
            assert [fingerprint(s[i][0]) for i in range(len(s))] == [fingerprint(f[i][0]) for i in range(len(f))]
        assert on_shards[0].dataset.num_skipped + on_shards[1].dataset.num_skipped == 3


# -- evaluation: the same numbers from a folder and its shards ---------------------------------------------------
FT = ["--img-size", "32", "--patch-size", "8", "--depth", "1", "--embed-dim", "32", "--num-heads", "2",
      "--num-classes", "3", "--batch-size", "8", "--num-workers", "0", "--progress", "false", "--epochs", "1",
      "--warmup-epochs", "0", "--mixup", "0", "--cutmix", "0", "--from-scratch", "--lr", "0.05"]


def test_eval_only_and_knn_give_the_folder_numbers(folder, shards, tmp_path, capsys):
    finetune.main(FT + ["--data", str(folder), "--output", str(tmp_path / "ft")])
    best = str(tmp_path / "ft" / "best.pt")
    evals = [finetune.main(["--eval-only", "--pretrained", best, "--data", str(d), "--num-workers", "0"])
             for d in (folder, shards)]
    assert evals[0] == evals[1] and set(evals[0]) >= {"top1", "top5", "val_loss"}
    knn = [finetune.main(["--knn", "--pretrained", best, "--data", str(d), "--num-workers", "0", "--img-size",
                          "32", "--batch-size", "8", "--output", str(tmp_path / f"knn{i}")])["knn"]
           for i, d in enumerate((folder, shards))]
    assert knn[0] == knn[1] and knn[0]["train_images"] == 24 and knn[0]["val_images"] == 9


def test_shards_named_by_url_are_downloaded_once_into_the_cache(folder, shards, tmp_path, monkeypatch):
    """wids fetches a URL into FD_REF_SHARD_CACHE; a ``pipe:`` URL (a command writing ``{local}``) stands in
    for a remote store here. A download that fails is one line naming the shard."""
    monkeypatch.setenv("FD_REF_SHARD_CACHE", str(tmp_path / "cache"))
    remote = build_dataset(f"pipe:cp {shards}/train-00000{{0..4}}.tar {{local}}", True, None)
    local = build_dataset(str(shards), True, None)
    assert len(remote) == len(local) == 24 and len(list((tmp_path / "cache").iterdir())) == 5
    assert all(fingerprint(remote[i][0]) == fingerprint(local[i][0]) for i in range(24))
    with pytest.raises(UserError, match=r"cannot read shard pipe:false .*could not download it"):
        build_dataset("pipe:false {local} train-000000.tar", True, None)
