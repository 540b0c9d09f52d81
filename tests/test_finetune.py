"""finetune.py end to end at test size (issue #4): an FD student becomes a fine-tuning model that computes
exactly the same features, layer-wise lr decay and weight decay land on the right parameters, a linear
probe leaves the backbone untouched, and the quickstart / --eval-only / --from-scratch / resume paths work.

The student comes from ``train.main`` at test size (a shared relative position bias, two blocks); every
run is in-process through ``finetune.main(argv)``.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from fd_ref.engine.trainer import Trainer
import finetune
import train
from fd_ref.config import resolve_config
from fd_ref.data import IMAGENET_MEAN, IMAGENET_STD, SingleDrawResizedCrop, build_mixup
from fd_ref.errors import UserError
from fd_ref.optim.lars import Lars
from fd_ref.models.probe import LinearProbe
from fd_ref.models.vit import VisionTransformer

DEPTH = 2
STUDENT = ["--img-size", "32", "--patch-size", "8", "--depth", str(DEPTH), "--embed-dim", "32", "--num-heads", "2",
           "--teacher-patch-size", "8", "--teacher-depth", "1", "--synthetic-size", "64", "--batch-size", "16",
           "--num-workers", "0", "--progress", "false", "--epochs", "1", "--max-steps", "2", "--lr", "0.05",
           "--warmup-epochs", "0"]
# 64 synthetic training images (12 validation), batch 16: 4 steps per epoch, 2 epochs
FT = ["--img-size", "32", "--synthetic-size", "64", "--num-classes", "10", "--batch-size", "16", "--num-workers",
      "0", "--progress", "false", "--log-every", "1", "--warmup-epochs", "0", "--epochs", "2", "--drop-path",
      "0.1", "--lr", "0.05"]



@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    """student.pt of a (briefly) distilled FD student: shared relative position bias, class token, 2 blocks."""
    out = tmp_path_factory.mktemp("fd")
    train.main(STUDENT + ["--output", str(out)])
    blob = torch.load(out / "student.pt", map_location="cpu", weights_only=True)
    assert blob["model_config"]["pos_embed"] == "shared_rpb" and blob["model_config"]["depth"] == DEPTH
    return out / "student.pt"


@pytest.fixture(scope="module")
def quickstart(student, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("ft")
    results = finetune.main(FT + ["--pretrained", str(student), "--output", str(out)])
    return out, results


def read_log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines() if line.strip()]


def train_records(folder: Path) -> list[dict]:
    return [r for r in read_log(folder) if "loss" in r]


# -- the FD student as a fine-tuning model ---------------------------------------------------------------
def test_loaded_student_computes_the_same_features(student):
    """Right after loading, every block's own table equals the shared one, and the fine-tuning model's
    tokens (it pools their mean, so it has no final norm) are exactly the FD student's tokens before its
    final norm; with that norm applied they are the student's feature map."""
    blob = torch.load(student, map_location="cpu", weights_only=True)
    shared = VisionTransformer(**blob["model_config"])
    shared.load_state_dict(blob["model"])  # strict: student.pt is exactly the student
    cfg = resolve_config(finetune.DEFAULTS, FT + ["--pretrained", str(student)])
    model, summary = finetune.build_finetune_model(cfg)

    assert isinstance(model, VisionTransformer)
    assert model.pos_embed_type == "rpb" and model.rel_pos_bias is None and model.global_pool == "avg"
    assert isinstance(model.norm, nn.Identity)
    table = blob["model"]["rel_pos_bias.table"]
    tables = [block.attn.rel_pos_bias.table for block in model.blocks]
    assert len(tables) == DEPTH
    for t in tables:
        assert torch.equal(t.detach(), table)
    assert len({t.data_ptr() for t in tables}) == DEPTH  # independent copies, free to diverge from now on
    # only the new classifier (head, fc_norm) starts from scratch
    missing = summary.split("missing (left at init): ")[1].split(";")[0].split(", ")
    assert sorted(missing) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"], summary
    assert "unexpected" not in summary, summary

    model.eval()
    shared.eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tokens = model.forward_features(x)
        final_norm = shared.norm
        shared.norm = nn.Identity()
        shared_tokens = shared.forward_features(x)
        shared.norm = final_norm
        shared_features = shared.forward_features(x)
    assert tokens.shape == (4, 1 + 16, 32)
    torch.testing.assert_close(tokens, shared_tokens, rtol=0, atol=0)
    torch.testing.assert_close(final_norm(tokens), shared_features, rtol=0, atol=0)
    # and the classifier reads the mean patch token
    with torch.no_grad():
        logits = model(x)
    torch.testing.assert_close(logits, model.head(model.fc_norm(shared_tokens[:, 1:].mean(1))), rtol=0, atol=0)


def _expected_layer(name: str) -> int:
    if name.startswith("patch_embed.") or name == "cls_token":
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return DEPTH + 1  # fc_norm, head


def test_layer_decay_and_weight_decay_groups(student, tmp_path, monkeypatch):
    trainers = _recording_trainer(monkeypatch)
    decay, wd = 0.6, 0.05
    finetune.main(FT + ["--pretrained", str(student), "--layer-decay", str(decay), "--weight-decay", str(wd),
                        "--max-steps", "1", "--warmup-epochs", "1", "--output", str(tmp_path)])
    (trainer,) = trainers
    model = trainer.job.model
    params = dict(model.named_parameters())
    seen = []
    for group in trainer.job.optimizer.param_groups:
        for name, p in zip(group["param_names"], group["params"]):
            assert p is params[name]
            seen.append(name)
            layer = _expected_layer(name)
            assert group["lr_scale"] == pytest.approx(decay ** (DEPTH + 1 - layer), rel=1e-12), name
            # decay on the matrices (published optimizer.py: position tables too), not on biases, norms,
            # layer scales, the class token
            matrix = (name.endswith(".weight") or name.endswith(".table")) and p.ndim >= 2
            assert group["weight_decay"] == (wd if matrix else 0.0), name
        # after one step (still warming up): each group's lr on the line from the shared, scaled warm-up
        # start to its own peak lr * lr_scale (published schedule)
        sched = trainer.scheduler
        frac = sched.step_count / sched.warmup_steps
        expected = sched.warmup_lr + frac * (sched.base_lr * group["lr_scale"] - sched.warmup_lr)
        assert group["lr"] == pytest.approx(expected, rel=1e-12)
    assert sorted(seen) == sorted(params)  # every parameter exactly once
    # spot checks of the recipe: patch embedding = layer 0, head = layer L+1, per-block tables without decay
    scale = {n: g["lr_scale"] for g in trainer.job.optimizer.param_groups for n in g["param_names"]}
    wdec = {n: g["weight_decay"] for g in trainer.job.optimizer.param_groups for n in g["param_names"]}
    assert scale["patch_embed.proj.weight"] == pytest.approx(decay ** (DEPTH + 1))
    assert scale["blocks.0.attn.rel_pos_bias.table"] == pytest.approx(decay ** DEPTH)
    assert scale[f"blocks.{DEPTH - 1}.mlp.fc1.weight"] == pytest.approx(decay)
    assert scale["head.weight"] == 1.0 and scale["fc_norm.weight"] == 1.0
    assert wdec["blocks.1.attn.rel_pos_bias.table"] == wd and wdec["cls_token"] == 0.0
    assert wdec["blocks.1.attn.q_bias"] == 0.0 and wdec["blocks.1.norm1.weight"] == 0.0
    assert wdec["blocks.1.attn.qkv.weight"] == wd and wdec["head.weight"] == wd


def test_linear_probe_leaves_the_backbone_bit_identical(student, tmp_path):
    out = tmp_path / "probe"
    results = finetune.main(FT + ["--pretrained", str(student), "--linear-probe", "--epochs", "1",
                                  "--output", str(out)])
    assert results["mode"] == "linear_probe" and results["steps"] == 4
    pretrained = torch.load(student, map_location="cpu", weights_only=True)["model"]
    ckpt = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    state = ckpt["model"]
    backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    # mean pooling (the default probe_pool, as the published fine-tuning model) does not use the final norm
    assert set(pretrained) - {"norm.weight", "norm.bias"} == set(backbone)
    for k, v in backbone.items():
        assert torch.equal(v, pretrained[k]), k
    # the probe itself did train: BatchNorm statistics moved, the head is the only optimised part
    assert state["bn.running_mean"].abs().sum() > 0 and state["bn.num_batches_tracked"] == 4
    assert all(r["grad_norm"] > 0 for r in train_records(out))
    assert len(ckpt["optimizer"]["state"]) == 2  # head.weight, head.bias


# -- the linear probe (published main_linear.py) ------------------------------------------------------------
TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, pos_embed="shared_rpb")


def test_linear_probe_modules():
    """BatchNorm1d(affine=False, eps=1e-6); head weight ~ N(0, 0.01^2), bias 0; only the head trains."""
    torch.manual_seed(0)
    probe = LinearProbe(VisionTransformer(**{**TINY_VIT, "embed_dim": 64}), num_classes=4000)
    assert isinstance(probe.bn, nn.BatchNorm1d) and probe.bn.affine is False and probe.bn.eps == 1e-6
    assert probe.bn.weight is None and probe.bn.bias is None and probe.bn.track_running_stats
    w = probe.head.weight.detach().double()
    assert w.shape == (4000, 64)  # 256k draws: the sample std is within ~0.3% of the true one
    assert abs(w.std().item() - 0.01) < 0.0003 and abs(w.mean().item()) < 1e-4
    kurtosis = ((w - w.mean()) ** 4).mean() / w.var() ** 2
    assert abs(kurtosis.item() - 3.0) < 0.1  # a normal, not a uniform (1.8) nor a truncated one
    assert torch.equal(probe.head.bias.detach(), torch.zeros(4000))
    assert sorted(n for n, p in probe.named_parameters() if p.requires_grad) == ["head.bias", "head.weight"]
    with pytest.raises(ValueError):
        LinearProbe(VisionTransformer(**TINY_VIT), 3, pool="max")


@pytest.mark.parametrize("pool", ["avg", "cls"])
def test_linear_probe_features_are_the_published_models(pool):
    """avg: the published mean-pooling model's features, fc_norm(mean of the last block's patch tokens) with
    a fresh (1/0) LayerNorm and no final norm; cls: the class token after the final norm. The reference is
    timm's ``Beit`` (the published fine-tuning model's family) built with that pooling and given the same
    weights."""
    from timm.models.beit import Beit

    from fd_ref.checkpoint.keys import to_timm_beit
    torch.manual_seed(1)
    source = VisionTransformer(**TINY_VIT, global_pool="cls")
    for p in source.parameters():  # non-trivial norms, so a forgotten or extra norm shows
        p.data.add_(0.3 * torch.randn_like(p))
    state = {k: v.clone() for k, v in source.state_dict().items()}
    probe = LinearProbe(source, 5, pool=pool).train()
    reference = Beit(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, qkv_bias=True,
                     init_values=0.1, use_abs_pos_emb=False, use_rel_pos_bias=False, use_shared_rel_pos_bias=True,
                     global_pool="token" if pool == "cls" else pool, num_classes=0).eval()
    missing, unexpected = reference.load_state_dict(to_timm_beit(state), strict=False)
    if pool == "avg":
        assert sorted(missing) == ["fc_norm.bias", "fc_norm.weight"] and sorted(unexpected) == ["norm.bias", "norm.weight"]
        assert torch.equal(reference.fc_norm.weight, torch.ones(32)) and not reference.fc_norm.bias.any()
    else:
        assert not missing and not unexpected
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        expected = reference.forward_head(reference.forward_features(x), pre_logits=True)
    torch.testing.assert_close(probe.features(x), expected, rtol=1e-5, atol=1e-5)


def _recording_trainer(monkeypatch):
    trainers = []

    class Recording(Trainer):
        def __init__(self, run, job):
            super().__init__(run, job)
            trainers.append(self)

    monkeypatch.setattr(finetune, "Trainer", Recording)  # the Trainer finetune.main builds
    return trainers


def _fixed_batch(n=8):
    """(uint8 images as the loader yields them, the same images normalised by hand, labels)."""
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    return images, (images.double() / 255 - mean) / std, torch.randint(0, 10, (n,), generator=g)


def test_linear_probe_training(student, tmp_path, monkeypatch):
    """LARS over the head with the published settings, clipping 5.0, plain cross-entropy (even with label
    smoothing and mixup set), crop + flip only, and a backbone in eval mode while the probe trains."""
    trainers = _recording_trainer(monkeypatch)
    modes = []
    finetune.main(FT + ["--pretrained", str(student), "--linear-probe", "--max-steps", "2", "--weight-decay",
                        "0.03", "--label-smoothing", "0.1", "--mixup", "0.8", "--output", str(tmp_path)])
    (trainer,) = trainers
    model = trainer.job.model
    assert isinstance(model, LinearProbe)
    (group,) = trainer.job.optimizer.param_groups
    assert isinstance(trainer.job.optimizer, Lars)
    assert [p is q for p, q in zip(group["params"], [model.head.weight, model.head.bias])] == [True, True]
    assert (group["momentum"], group["trust_coefficient"], group["weight_decay"]) == (0.9, 0.001, 0.03)
    assert trainer.run.clip_grad == 5.0
    base = trainer.loader.dataset.dataset
    transform = getattr(base, "dataset", base).transform
    assert isinstance(transform.transforms[0], SingleDrawResizedCrop)

    # one more step by hand: the backbone runs in eval mode, the BatchNorm in training mode
    model.train()
    hook = model.backbone.patch_embed.register_forward_pre_hook(
        lambda *_: modes.append((model.backbone.training, any(m.training for m in model.backbone.modules()))))
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    images, normalised, labels = _fixed_batch()
    loss = trainer.job.step_fn((images, labels))
    hook.remove()
    assert modes == [(False, False)] and model.bn.training
    logits = model.head(torch.nn.functional.batch_norm(model.features(normalised.float()), None, None, training=True,
                                                       eps=1e-6))
    log_p = logits.double().log_softmax(1)
    assert loss.item() == pytest.approx(-log_p[torch.arange(8), labels].mean().item(), rel=1e-5)
    loss.backward()
    trainer.job.optimizer.step()
    after = model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit-identical backbone


def test_finetune_loss_and_augmentation_wiring(student, tmp_path, monkeypatch):
    """Fine-tuning: timm's transform and Mixup feed SoftTargetCrossEntropy; without mixing, label-smoothed
    cross-entropy; the evaluation normalisation follows --eval-norm."""
    from timm.data.auto_augment import RandAugment

    trainers = _recording_trainer(monkeypatch)
    norms = []
    real_eval = finetune.eval_transform
    monkeypatch.setattr(finetune, "eval_transform", lambda *a, **k: norms.append(k["norm"]) or real_eval(*a, **k))
    common = FT + ["--pretrained", str(student), "--max-steps", "1", "--drop-path", "0", "--random-erasing", "0"]
    finetune.main(common + ["--eval-norm", "published", "--output", str(tmp_path / "mix")])
    finetune.main(common + ["--mixup", "0", "--cutmix", "0", "--label-smoothing", "0.2",
                            "--output", str(tmp_path / "smooth")])
    assert norms == ["published", "imagenet"]
    mixed, smooth = trainers
    base = mixed.loader.dataset.dataset
    steps = getattr(base, "dataset", base).transform.transforms
    assert any(isinstance(s, RandAugment) for s in steps)
    assert mixed.run.clip_grad == 5.0

    images, normalised, labels = _fixed_batch()
    for trainer in trainers:
        trainer.job.model.eval()
    np.random.seed(7)
    loss = mixed.job.step_fn((images, labels))
    np.random.seed(7)
    mixed_images, targets = build_mixup(10, 0.8, 1.0, 0.5, 0.1)(normalised.float(), labels)
    with torch.no_grad():
        log_p = mixed.job.model(mixed_images).double().log_softmax(1)
    assert loss.item() == pytest.approx(-(targets.double() * log_p).sum(1).mean().item(), rel=1e-5)
    assert not torch.equal(mixed_images, normalised.float())

    loss = smooth.job.step_fn((images, labels))
    with torch.no_grad():
        log_p = smooth.job.model(normalised.float()).double().log_softmax(1)
    hand = 0.8 * -log_p[torch.arange(8), labels] + 0.2 * -log_p.mean(1)
    assert loss.item() == pytest.approx(hand.mean().item(), rel=1e-5)


def test_odd_batch_with_mixup_is_a_user_error(student, tmp_path):
    with pytest.raises(UserError, match="even"):
        finetune.main(FT + ["--pretrained", str(student), "--batch-size", "15", "--output", str(tmp_path)])


# -- the script's paths ------------------------------------------------------------------------------------
def test_quickstart_finetune(quickstart):
    out, results = quickstart
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert 0.0 <= saved["final"]["top1"] <= saved["final"]["top5"] <= 100.0
    assert saved["steps"] == 8 and saved["mode"] == "finetune" and saved["pretrained"].endswith("student.pt")
    assert 0.0 <= saved["best_top1"] <= 100.0
    for name in ("checkpoint.pt", "best.pt", "config.yaml", "log.jsonl"):
        assert (out / name).is_file(), name
    log = read_log(out)
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 9))
    assert [r["epoch"] for r in log if "top1" in r] == [0, 1]  # validated after every epoch
    best = torch.load(out / "best.pt", map_location="cpu", weights_only=True)
    assert best["metrics"]["top1"] == saved["best_top1"]


def test_eval_only_prints_the_metrics(quickstart, student, capsys):
    out, results = quickstart
    before = (out / "log.jsonl").read_text(), (out / "results.json").read_text()
    capsys.readouterr()
    metrics = finetune.main(FT + ["--pretrained", str(out / "checkpoint.pt"), "--eval-only"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(printed) == {"top1", "top5", "val_loss"} and printed == pytest.approx(metrics)
    # the checkpoint's model, evaluated again: the run's final numbers
    for key in ("top1", "top5", "val_loss"):
        assert printed[key] == pytest.approx(results["final"][key], rel=1e-9, abs=1e-9)
    assert ((out / "log.jsonl").read_text(), (out / "results.json").read_text()) == before


def test_from_scratch(tmp_path, capsys):
    out = tmp_path / "scratch"
    results = finetune.main(FT + ["--from-scratch", "--pretrained", str(tmp_path / "missing.pt"),
                                  "--model", "vit_tiny", "--patch-size", "8", "--depth", "1", "--embed-dim", "32",
                                  "--num-heads", "2", "--epochs", "1", "--output", str(out)])
    assert "random initialisation" in capsys.readouterr().out
    assert results["pretrained"] is None and results["steps"] == 4
    assert json.loads((out / "results.json").read_text())["pretrained"] is None
    config = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)["model_config"]
    assert (config["embed_dim"], config["depth"], config["pos_embed"], config["global_pool"]) == (32, 1, "rpb", "avg")


def test_resume_continues_from_the_checkpoint(quickstart, student, tmp_path, capsys):
    """Stop after 5 of 8 steps (past the first epoch's validation), rerun the same command: it resumes at
    step 5, ends at step 8, and retraces the uninterrupted run exactly (drop path and mixup included)."""
    ref_out, ref_results = quickstart
    out = tmp_path / "resumed"
    argv = FT + ["--pretrained", str(student), "--output", str(out)]
    first = finetune.main(argv + ["--max-steps", "5"])
    assert first["steps"] == 5
    assert torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)["step"] == 5
    capsys.readouterr()
    results = finetune.main(argv)
    assert "resumed from" in capsys.readouterr().out
    assert results["steps"] == 8
    log, ref_log = read_log(out), read_log(ref_out)
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 9))
    strip = ("img_per_s", "mfu")
    assert [{k: v for k, v in r.items() if k not in strip} for r in log] == \
        [{k: v for k, v in r.items() if k not in strip} for r in ref_log]
    assert results["final"] == ref_results["final"] and results["best_top1"] == ref_results["best_top1"]


def test_a_run_stopped_before_its_results_were_written_writes_the_same_results(quickstart, student, tmp_path):
    """A stop after the last checkpoint but before results.json (the soak's kill in the final save): the rerun
    resumes at the last step, evaluates again and writes results.json byte for byte as the uninterrupted run
    (the final record with its step and epoch)."""
    ref_out, _ = quickstart
    out = tmp_path / "run"
    argv = FT + ["--pretrained", str(student), "--output", str(out)]
    finetune.main(argv)
    (out / "results.json").unlink()
    results = finetune.main(argv)
    assert results["final"]["step"] == 8 and results["final"]["epoch"] == 1
    assert (out / "results.json").read_text() == (ref_out / "results.json").read_text()


def test_best_top1_survives_a_resume(student, tmp_path, monkeypatch):
    """The best validation of the epochs before a resume still counts in results.json (and best.pt)."""
    scores = iter([80.0, 70.0, 60.0])  # end of epoch 0 | final of the stopped run | end of epoch 1

    def scripted_evaluate(*args, **kwargs):
        return {"top1": next(scores), "top5": 100.0, "val_loss": 1.0}

    monkeypatch.setattr(finetune, "evaluate", scripted_evaluate)
    argv = FT + ["--pretrained", str(student), "--output", str(tmp_path)]
    assert finetune.main(argv + ["--max-steps", "5"])["best_top1"] == 80.0
    results = finetune.main(argv)
    assert results["final"]["top1"] == 60.0 and results["steps"] == 8
    assert results["best_top1"] == 80.0
    assert torch.load(tmp_path / "best.pt", map_location="cpu", weights_only=True)["metrics"]["top1"] == 80.0


# -- evaluation precision (issue #23) ---------------------------------------------------------------------------
def test_evaluate_is_float32_even_inside_autocast():
    """``finetune.evaluate`` computes in float32 whatever context it is called from (published ``validate``
    runs without autocast): its loss and top-1 equal a hand-written float64 pass (logsumexp - logit of the
    label; argmax) to float32 precision, where the same model under bf16 autocast is off by far more."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
    with torch.no_grad():
        model[1].weight.mul_(20)  # logits of order 10: bf16 rounds them by ~0.04
    images, labels = torch.randn(48, 3, 8, 8), torch.randint(0, 10, (48,))
    loader = [(images[i:i + 16], labels[i:i + 16]) for i in range(0, 48, 16)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        metrics = finetune.evaluate(model, loader, torch.device("cpu"))
        bf16_logits = model(images)
    w, b = model[1].weight.double(), model[1].bias.double()
    logits = images.flatten(1).double() @ w.T + b
    loss = (torch.logsumexp(logits, dim=1) - logits[torch.arange(48), labels]).mean().item()
    top1 = 100.0 * (logits.argmax(1) == labels).double().mean().item()
    assert metrics["val_loss"] == pytest.approx(loss, rel=1e-5)
    assert metrics["top1"] == pytest.approx(top1)
    bf16_loss = nn.functional.cross_entropy(bf16_logits.float(), labels).item()
    assert abs(bf16_loss - loss) > 10 * 1e-5 * abs(loss)  # the check above tells bf16 from fp32


def test_bf16_fine_tuning_evaluates_in_float32(student, tmp_path, monkeypatch):
    """A ``--precision bf16`` run trains under autocast but every evaluation forward runs without it."""
    seen = {"eval": [], "train": []}
    real = finetune.evaluate

    def spy(model, loader, device, *normalize):
        hook = model.register_forward_pre_hook(lambda m, a: seen["eval"].append(torch.is_autocast_enabled("cpu")))
        try:
            return real(model, loader, device, *normalize)
        finally:
            hook.remove()

    monkeypatch.setattr(finetune, "evaluate", spy)
    def trainer(run, job):
        def step(batch):
            seen["train"].append(torch.is_autocast_enabled("cpu"))
            return job.step_fn(batch)
        return Trainer(run, dataclasses.replace(job, step_fn=step))

    monkeypatch.setattr(finetune, "Trainer", trainer)
    finetune.main(FT + ["--pretrained", str(student), "--precision", "bf16", "--epochs", "1",
                        "--output", str(tmp_path)])
    assert seen["train"] and all(seen["train"])
    assert seen["eval"] and not any(seen["eval"])


def test_fine_tuning_at_another_resolution_resamples_the_tables_as_published(student):
    """A 32 px student (4 x 4 patches) fine-tuned at 48 px (6 x 6): every block's table is the distilled shared
    table resampled by the published rule (geometric positions + interp2d's cubic spline, written by hand in
    tests/test_position.py), the class-token rows kept."""
    from test_position import published_resize

    shared = torch.load(student, map_location="cpu", weights_only=True)["model"]["rel_pos_bias.table"]
    cfg = resolve_config(finetune.DEFAULTS, FT + ["--pretrained", str(student), "--img-size", "48"])
    model, _ = finetune.build_finetune_model(cfg)
    assert model.grid == (6, 6)
    expected = published_resize(shared, (4, 4), (6, 6))
    for block in model.blocks:
        torch.testing.assert_close(block.attn.rel_pos_bias.table.detach(), expected, rtol=0, atol=2e-5)
