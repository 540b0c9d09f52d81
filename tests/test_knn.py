"""Spec tests of the weighted k-NN (fd_ref.eval.knn, DINO's: k 20, T 0.07, cosine similarity, votes exp(sim/T))
against a k-NN written out with loops, on random features and on a small separable set; and of
``finetune.py --knn`` on every kind of model file fd-ref loads (FD ViT student, timm student, fine-tuned)."""
from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import finetune
import train
from fd_ref.eval.knn import knn_accuracy, knn_scores
from fd_ref.models.finetune_model import build_finetune_model


def _hand_knn(train_f, train_y, query_f, num_classes, k=20, t=0.07):
    """One query at a time: cosine similarity to every train feature, the k largest, exp(sim / T) votes."""
    scores = []
    for q in query_f.tolist():
        sims = []
        for f, y in zip(train_f.tolist(), train_y.tolist()):
            dot = sum(a * b for a, b in zip(q, f))
            sims.append((dot / (math.sqrt(sum(a * a for a in q)) * math.sqrt(sum(b * b for b in f))), y))
        sims.sort(key=lambda s: -s[0])
        votes = [0.0] * num_classes
        for sim, y in sims[:k]:
            votes[y] += math.exp(sim / t)
        scores.append(votes)
    return torch.tensor(scores, dtype=torch.float64)


@given(n=st.integers(1, 40), q=st.integers(1, 12), c=st.integers(2, 6), classes=st.integers(2, 5),
       k=st.integers(1, 25), seed=st.integers(0, 2**31 - 1))
def test_scores_match_the_hand_written_knn(n, q, c, classes, k, seed):
    g = torch.Generator().manual_seed(seed)
    train_f, query_f = torch.randn(n, c, generator=g) * 3, torch.randn(q, c, generator=g)
    train_y = torch.randint(0, classes, (n,), generator=g)
    expected = _hand_knn(train_f.double(), train_y, query_f.double(), classes, k)
    got = knn_scores(train_f, train_y, query_f, classes, k=k, chunk=5)  # chunks of 5 queries
    assert torch.allclose(got.double(), expected, rtol=1e-4)
    assert torch.allclose(got, knn_scores(train_f, train_y, query_f, classes, k=k), rtol=1e-5)  # chunks: the same


def test_separable_set_and_the_default_k_and_temperature():
    """Three well-separated directions, 30 train points each, 10 queries each: every query's top-1 is its
    own class; the same numbers as the hand-written k-NN with k = 20, T = 0.07."""
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(3, 8) * 5
    train_y = torch.arange(3).repeat_interleave(30)
    query_y = torch.arange(3).repeat_interleave(10)
    train_f = centres[train_y] + torch.randn(90, 8, generator=g)
    query_f = centres[query_y] + torch.randn(30, 8, generator=g)
    assert knn_accuracy(train_f, train_y, query_f, query_y, 3) == {"top1": 100.0, "top5": 100.0}
    hand = _hand_knn(train_f.double(), train_y, query_f.double(), 3)
    assert torch.equal(hand.argmax(1), query_y)
    assert torch.allclose(knn_scores(train_f, train_y, query_f, 3).double(), hand, rtol=1e-4)
    # wrong labels on the train side: the k-NN follows them (it is the labels, not the geometry, that vote)
    assert knn_accuracy(train_f, (train_y + 1) % 3, query_f, query_y, 3)["top1"] == 0.0


def test_weights_favour_close_neighbours():
    """Two neighbours of class 1 at similarity ~1 outvote three of class 0 at ~0.5: exp(1/T) >> exp(0.5/T)."""
    train_f = torch.tensor([[1.0, 0.0], [1.0, 0.01], [0.5, 0.866], [0.5, 0.867], [0.5, 0.865]])
    train_y = torch.tensor([1, 1, 0, 0, 0])
    scores = knn_scores(train_f, train_y, torch.tensor([[1.0, 0.0]]), 2, k=5)
    assert scores.argmax().item() == 1
    assert knn_scores(train_f, train_y, torch.tensor([[1.0, 0.0]]), 2, k=5, temperature=1e3).argmax().item() == 0


TINY = ["--img-size", "32", "--patch-size", "8", "--depth", "1", "--embed-dim", "16", "--num-heads", "2",
        "--synthetic-size", "48", "--num-workers", "0", "--progress", "false"]
KNN = ["--knn", "--synthetic-size", "48", "--val-split", "16", "--num-workers", "0", "--batch-size", "16",
       "--img-size", "32"]


def _knn(tmp_path, pretrained, capsys, *extra):
    out = tmp_path / "knn"
    results = finetune.main(KNN + ["--pretrained", str(pretrained), "--output", str(out), *extra])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == results["knn"] == json.loads((out / "results.json").read_text())["knn"]
    assert results["knn"]["k"] == 20 and results["knn"]["temperature"] == 0.07
    assert (results["knn"]["train_images"], results["knn"]["val_images"]) == (32, 16)
    assert 0 <= results["knn"]["top1"] <= results["knn"]["top5"] <= 100
    return results


def test_knn_of_an_fd_student_matches_the_probe_features_by_hand(tmp_path, capsys):
    fd = tmp_path / "fd"
    train.main(TINY + ["--teacher-patch-size", "8", "--teacher-depth", "1", "--max-steps", "1", "--batch-size",
                       "16", "--output", str(fd)])
    results = _knn(tmp_path, fd / "student.pt", capsys)
    # the same numbers from the probe's own features, put through the hand-written k-NN
    from fd_ref.data import eval_transform
    from fd_ref.data.splits import train_val_datasets
    model, _ = build_finetune_model({**finetune.DEFAULTS, "pretrained": str(fd / "student.pt"),
                                     "linear_probe": True, "img_size": 32})
    tf = eval_transform(32, finetune.DEFAULTS["crop_pct"])
    tr, va = train_val_datasets("synthetic", tf, tf, val_split=16, synthetic_size=48, img_size=32)
    feats = [(torch.stack([model.eval().features(ds[i][0][None])[0] for i in range(len(ds))]),
              torch.tensor([ds[i][1] for i in range(len(ds))])) for ds in (tr, va)]
    hand = _hand_knn(feats[0][0].double(), feats[0][1], feats[1][0].double(), 10)
    top1 = 100 * (hand.argmax(1) == feats[1][1]).double().mean().item()
    assert results["knn"]["top1"] == pytest.approx(top1)


def test_knn_of_a_timm_student_and_of_a_finetuned_file(tmp_path, capsys):
    fd = tmp_path / "fd"
    train.main(["--model", "timm:resnet18", "--model-kwargs", "layers=[1,1,1,1],channels=[8,8,8,16]",
                "--teacher-patch-size", "8", "--teacher-depth", "1", "--max-steps", "1", "--batch-size", "16",
                "--output", str(fd), *TINY[8:]])
    _knn(tmp_path, fd / "student.pt", capsys)
    ft = tmp_path / "ft"
    finetune.main(["--pretrained", str(fd / "student.pt"), "--epochs", "1", "--batch-size", "16",
                   "--mixup", "0", "--cutmix", "0", "--output", str(ft), *KNN[1:]])
    capsys.readouterr()
    _knn(tmp_path, ft / "best.pt", capsys)
