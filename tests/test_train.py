"""train.py end to end at test size (issue #3): the quickstart learns and writes its outputs, a stopped run
resumes exactly, two gloo ranks equal one process on the combined batch, flags beat the config file, and a
corrupt image in an ImageFolder is skipped and counted. Also: every published recipe in configs/ resolves.

Everything runs in-process through ``train.main(argv)`` (the interpreter's imports cost ~15 s here, so no
fresh interpreters); the two-rank run forks two children of the test process, each joining a gloo group
through the usual RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT variables, as torchrun would set them.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from fd_ref.engine.trainer import Trainer
import finetune
import train
from fd_ref.config import resolve_config

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"

# A student and teacher small enough for a shared 2-core CPU: 32 px, 4x4 grid, one block each.
TINY = ["--img-size", "32", "--patch-size", "8", "--depth", "1", "--embed-dim", "32", "--num-heads", "2",
        "--teacher-patch-size", "8", "--teacher-depth", "1", "--synthetic-size", "64", "--num-workers", "0",
        "--progress", "false", "--log-every", "1", "--warmup-epochs", "0"]
LOG_KEYS = {"step", "epoch", "loss", "lr", "grad_norm", "img_per_s", "world_size"}



def read_log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines() if line.strip()]


def losses(folder: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_log(folder) if "loss" in r}


def student_state(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "student.pt", map_location="cpu", weights_only=True)["model"]


# -- the quickstart, uninterrupted (shared by several tests) -------------------------------------------------
# drop path > 0 so that an exact resume needs the RNG state; 2 epochs of 4 steps
# (two blocks: the drop-path rate rises linearly from 0 in the first block to --drop-path in the last)
RUN = TINY + ["--depth", "2", "--batch-size", "16", "--epochs", "2", "--drop-path", "0.2", "--lr", "0.05",
              "--seed", "3"]


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("quickstart")
    train.main(RUN + ["--output", str(out)])
    return out


def test_quickstart_outputs(quickstart):
    for name in ("checkpoint.pt", "student.pt", "config.yaml", "log.jsonl"):
        assert (quickstart / name).is_file(), name
    log = read_log(quickstart)
    assert [r["step"] for r in log] == list(range(1, 9))
    for record in log:
        assert LOG_KEYS <= set(record), record
        assert record["world_size"] == 1
        assert np.isfinite(record["loss"]) and record["grad_norm"] > 0 and record["img_per_s"] > 0
    ckpt = torch.load(quickstart / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ckpt["step"] == 8 and ckpt["epoch"] == 2
    # student.pt is what finetune.py loads: weights + the architecture that rebuilds them
    blob = torch.load(quickstart / "student.pt", map_location="cpu", weights_only=True)
    assert blob["model_config"]["pos_embed"] == "shared_rpb" and blob["model_config"]["embed_dim"] == 32
    assert "rel_pos_bias.table" in blob["model"]
    config = yaml.safe_load((quickstart / "config.yaml").read_text())
    assert config["epochs"] == 2 and config["drop_path"] == 0.2 and config["world_size"] == 1
    assert config["lr_scaled"] == pytest.approx(0.05 * 16 / 512)


def test_quickstart_loss_goes_down(quickstart):
    loss = [r["loss"] for r in read_log(quickstart)]
    first, last = np.mean(loss[:2]), np.mean(loss[-2:])
    assert last < 0.9 * first, loss


def test_exact_resume(quickstart, tmp_path):
    """Stop after 3 of 8 steps (mid-epoch), rerun the same command: the rest of the log equals the
    uninterrupted run's bit for bit, and so do the final weights."""
    out = tmp_path / "b"
    train.main(RUN + ["--output", str(out), "--max-steps", "3"])
    assert max(losses(out)) == 3
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 3
    train.main(RUN + ["--output", str(out)])
    a, b = read_log(quickstart), read_log(out)
    assert [r["step"] for r in b] == list(range(1, 9))  # nothing lost or duplicated
    for ra, rb in zip(a, b):
        assert (ra["step"], ra["loss"], ra["grad_norm"], ra["lr"]) == (rb["step"], rb["loss"], rb["grad_norm"],
                                                                        rb["lr"])
    sa, sb = student_state(quickstart), student_state(out)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


# -- two gloo ranks ----------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_worker(rank: int, port: int, argv: list[str], save_to: str) -> None:
    """One rank, in a spawned child: join the group as torchrun would, run train.main, save this rank's
    final (student + projection) state through a recording Trainer (only rank 0 writes files itself)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)

    class RecordingTrainer(Trainer):
        def fit(self):
            history = super().fit()
            torch.save({k: v.clone() for k, v in self.job.model.state_dict().items()}, save_to)
            return history

    train.Trainer = RecordingTrainer  # the Trainer train.main builds
    try:
        train.main(argv)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def test_two_ranks_equal_one_process_on_the_combined_batch(tmp_path):
    # fp32 named: spawned children do not inherit conftest's fp32 reading of --precision auto
    common = TINY + ["--epochs", "1", "--drop-path", "0", "--lr", "0.05", "--seed", "1", "--precision", "fp32"]
    # spawn, not fork: a forked child cannot run a backward once the parent's autograd engine has started its
    # threads, which depends on what other tests ran before in this process
    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    ddp_out = tmp_path / "ddp"
    procs = [ctx.Process(target=_rank_worker, args=(r, port, common + ["--batch-size", "8", "--output",
                                                                      str(ddp_out)], str(tmp_path / f"rank{r}.pt")))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert [p.exitcode for p in procs] == [0, 0]

    single = tmp_path / "single"
    train.main(common + ["--batch-size", "16", "--output", str(single)])

    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert set(r0) == set(r1)
    for k in r0:  # DDP keeps the replicas identical
        assert torch.equal(r0[k], r1[k]), k

    ddp_log, single_log = read_log(ddp_out), read_log(single)
    assert [r["world_size"] for r in ddp_log] == [2] * 4
    assert [r["step"] for r in ddp_log] == [r["step"] for r in single_log] == [1, 2, 3, 4]
    for rd, rs in zip(ddp_log, single_log):  # same images per step, same schedule (same total batch)
        assert rd["loss"] == pytest.approx(rs["loss"], abs=1e-5, rel=1e-5)
        assert rd["lr"] == pytest.approx(rs["lr"], rel=1e-12)
    ckpt = torch.load(single / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]
    assert set(ckpt) == set(r0)
    for k in ckpt:
        torch.testing.assert_close(r0[k], ckpt[k], atol=1e-5, rtol=1e-5, msg=k)
    # and rank 0 wrote the deliverable from the same weights
    exported = student_state(ddp_out)
    for k, v in exported.items():
        assert torch.equal(v, r0["student." + k]), k


# -- configuration -----------------------------------------------------------------------------------------
def test_flag_overrides_config_file(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("epochs: 3\ndrop_path: 0.0\n")
    out = tmp_path / "out"
    train.main(TINY + ["--config", str(cfg_file), "--epochs", "1", "--batch-size", "16", "--max-steps", "1",
                       "--output", str(out)])
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["epochs"] == 1          # the flag wins over the file
    assert resolved["drop_path"] == 0.0     # the file wins over the default (0.1)
    assert resolved["config"] == str(cfg_file)


# One row per published run of ../shared/docs/recipes.md.
FD_RECIPES = {  # name: (teacher, model, patch, epochs, drop path)
    "fd_clip_vit_base": ("clip_vit_base", "vit_base", 16, 300, 0.2),
    "fd_clip_vit_base_100ep": ("clip_vit_base", "vit_base", 16, 100, 0.1),
    "fd_dino_vit_base": ("dino_vit_base", "vit_base", 16, 300, 0.3),
    "fd_deit_vit_base": ("deit_vit_base", "vit_base", 16, 300, 0.3),
    "fd_clip_vit_large": ("clip_vit_large", "vit_large_patch14", 14, 300, 0.3),
}
FT_RECIPES = {  # name: (fd run, epochs, drop path, lr, layer decay, warm-up, min lr)
    "ft_clip_vit_base": ("fd_clip_vit_base", 100, 0.3, 1.25e-3, 0.6, 20, 2.5e-7),
    "ft_clip_vit_base_100ep": ("fd_clip_vit_base_100ep", 100, 0.1, 1.25e-3, 0.65, 20, 2.5e-7),
    "ft_dino_vit_base": ("fd_dino_vit_base", 100, 0.2, 1.5e-3, 0.6, 20, 2.5e-7),
    "ft_deit_vit_base": ("fd_deit_vit_base", 100, 0.3, 1.25e-3, 0.65, 20, 2.5e-7),
    "ft_clip_vit_large": ("fd_clip_vit_large", 50, 0.4, 2.5e-4, 0.75, 5, 5e-7),
}


def test_configs_cover_the_published_runs():
    assert {p.stem for p in CONFIGS.glob("*.yaml")} >= set(FD_RECIPES) | set(FT_RECIPES)


def _load_all_keys(path: Path, defaults: dict) -> dict:
    raw = yaml.safe_load(path.read_text())
    assert set(raw) <= set(defaults), set(raw) - set(defaults)   # resolve_config would refuse them anyway
    assert path.read_text().startswith("#") and "recipes.md" in path.read_text()  # cites its recipe row
    return raw


@pytest.mark.parametrize("name", sorted(FD_RECIPES))
def test_distillation_config(name):
    path = CONFIGS / f"{name}.yaml"
    _load_all_keys(path, train.DEFAULTS)
    cfg = resolve_config(train.DEFAULTS, ["--config", str(path)])
    teacher, model, patch, epochs, drop_path = FD_RECIPES[name]
    assert (cfg["teacher"], cfg["model"], cfg["patch_size"], cfg["epochs"], cfg["drop_path"]) == (
        teacher, model, patch, epochs, drop_path)
    assert cfg["img_size"] == 224 and cfg["depth"] is None and cfg["pos_embed"] == "shared_rpb"
    assert cfg["teacher_patch_size"] is None and cfg["teacher_depth"] is None
    assert (cfg["lr"], cfg["min_lr"], cfg["warmup_lr"], cfg["warmup_epochs"]) == (3e-4, 5e-6, 5e-7, 10)
    assert (cfg["weight_decay"], cfg["clip_grad"], cfg["batch_size"], cfg["beta"]) == (0.05, 3.0, 128, 2.0)
    assert cfg["target_norm"] == "whiten" and cfg["layer_scale"] == 0.1
    # published data/data_fd.py: torchvision's default (bilinear) crop; AUG.MIN_SCALE 0.08 in the 300-epoch
    # configs, the config.py default 0.67 where the config does not set it (CLIP ViT-B 100 epochs)
    assert cfg["crop_min_scale"] == (0.67 if name == "fd_clip_vit_base_100ep" else 0.08)
    assert cfg["crop_interpolation"] == "bilinear"
    assert {"crop_min_scale", "crop_interpolation"} <= set(yaml.safe_load(path.read_text()))  # set explicitly
    assert cfg["output"] == f"out/{name}" and cfg["num_workers"] == 10
    assert all(type(cfg[k]) is type(v) for k, v in train.DEFAULTS.items() if v is not None and cfg[k] is not None)
    # a flag still wins over the file
    assert resolve_config(train.DEFAULTS, ["--config", str(path), "--epochs", "7"])["epochs"] == 7


@pytest.mark.parametrize("name", sorted(FT_RECIPES))
def test_finetune_config(name):
    path = CONFIGS / f"{name}.yaml"
    _load_all_keys(path, finetune.DEFAULTS)
    cfg = resolve_config(finetune.DEFAULTS, ["--config", str(path)])
    fd_run, epochs, drop_path, lr, layer_decay, warmup, min_lr = FT_RECIPES[name]
    assert cfg["pretrained"] == f"out/{fd_run}/student.pt"
    assert (CONFIGS / f"{fd_run}.yaml").is_file()
    assert yaml.safe_load((CONFIGS / f"{fd_run}.yaml").read_text())["output"] == f"out/{fd_run}"
    assert (cfg["epochs"], cfg["drop_path"], cfg["lr"], cfg["layer_decay"], cfg["warmup_epochs"],
            cfg["min_lr"]) == (epochs, drop_path, lr, layer_decay, warmup, min_lr)
    assert cfg["warmup_lr"] == min_lr  # published configs/finetune/*.yaml: WARMUP_LR equals MIN_LR
    assert (cfg["img_size"], cfg["num_classes"], cfg["batch_size"]) == (224, 1000, 128)
    assert (cfg["mixup"], cfg["cutmix"], cfg["mix_switch_prob"], cfg["label_smoothing"]) == (0.8, 1.0, 0.5, 0.1)
    assert (cfg["auto_augment"], cfg["color_jitter"], cfg["random_erasing"]) == ("rand-m9-mstd0.5-inc1", 0.4, 0.25)
    assert (cfg["weight_decay"], cfg["crop_pct"], cfg["clip_grad"]) == (0.05, 0.875, 5.0)
    assert cfg["eval_norm"] == "imagenet"  # ours; the published evaluation (CLIP mean/std) is eval_norm: published
    assert cfg["from_scratch"] is False and cfg["linear_probe"] is False
    assert cfg["output"] == f"out/{name}"
    assert all(type(cfg[k]) is type(v) for k, v in finetune.DEFAULTS.items() if v is not None and cfg[k] is not None)
    assert resolve_config(finetune.DEFAULTS, ["--config", str(path), "--layer-decay", "0.9"])["layer_decay"] == 0.9


LP_RECIPES = {  # name: (fd run, model, patch, epochs, lr, warm-up, warm-up lr = min lr); published fine-tuning configs
    "lp_clip_vit_base": ("fd_clip_vit_base", "vit_base", 16, 100, 1.25e-3, 20, 2.5e-7),
    "lp_clip_vit_base_100ep": ("fd_clip_vit_base_100ep", "vit_base", 16, 100, 1.25e-3, 20, 2.5e-7),
    "lp_dino_vit_base": ("fd_dino_vit_base", "vit_base", 16, 100, 1.5e-3, 20, 2.5e-7),
    "lp_deit_vit_base": ("fd_deit_vit_base", "vit_base", 16, 100, 1.25e-3, 20, 2.5e-7),
    "lp_clip_vit_large": ("fd_clip_vit_large", "vit_large_patch14", 14, 50, 2.5e-4, 5, 5e-7),
}


@pytest.mark.parametrize("name", sorted(LP_RECIPES))
def test_linear_probe_config(name):
    """Published main_linear.py run with the model's published fine-tuning config (no linear-probe config
    was published): its schedule, config.py's clipping 5.0, mean pooling; plain CE, crop + flip only."""
    path = CONFIGS / f"{name}.yaml"
    _load_all_keys(path, finetune.DEFAULTS)
    text = path.read_text()
    assert "main_linear.py" in text and "configs/finetune/fd_finetune__" in text  # cites its sources
    cfg = resolve_config(finetune.DEFAULTS, ["--config", str(path)])
    fd_run, model, patch, epochs, lr, warmup, low_lr = LP_RECIPES[name]
    assert cfg["linear_probe"] is True and cfg["from_scratch"] is False and cfg["probe_pool"] == "avg"
    assert cfg["pretrained"] == f"out/{fd_run}/student.pt" and (CONFIGS / f"{fd_run}.yaml").is_file()
    assert (cfg["model"], cfg["patch_size"], cfg["img_size"], cfg["num_classes"], cfg["batch_size"]) == (
        model, patch, 224, 1000, 128)
    assert (cfg["epochs"], cfg["lr"], cfg["warmup_epochs"], cfg["warmup_lr"], cfg["min_lr"]) == (
        epochs, lr, warmup, low_lr, low_lr)
    assert (cfg["weight_decay"], cfg["clip_grad"], cfg["crop_pct"], cfg["eval_norm"]) == (0.05, 5.0, 0.875, "imagenet")
    assert (cfg["label_smoothing"], cfg["mixup"], cfg["cutmix"], cfg["auto_augment"], cfg["random_erasing"]) == (
        0.0, 0.0, 0.0, "none", 0.0)
    assert cfg["output"] == f"out/{name}"
    assert all(type(cfg[k]) is type(v) for k, v in finetune.DEFAULTS.items() if v is not None and cfg[k] is not None)


def test_train_builds_its_crop_from_the_settings(tmp_path, monkeypatch):
    seen = []
    real = train.pretrain_transform

    def recording(size, **kwargs):
        seen.append((size, kwargs))
        return real(size, **kwargs)

    monkeypatch.setattr(train, "pretrain_transform", recording)
    train.main(TINY + ["--max-steps", "1", "--batch-size", "8", "--crop-min-scale", "0.67",
                       "--crop-interpolation", "bicubic", "--output", str(tmp_path)])
    assert seen == [(32, {"min_scale": 0.67, "interpolation": "bicubic", "uint8": True})]  # normalised on the device
    assert (train.DEFAULTS["crop_min_scale"], train.DEFAULTS["crop_interpolation"]) == (0.08, "bilinear")


# -- bad data ----------------------------------------------------------------------------------------------
def test_corrupt_image_is_skipped_and_counted(tmp_path, capsys, caplog):
    folder = tmp_path / "images"
    rng = np.random.default_rng(0)
    for cls, n in (("a", 3), ("b", 4)):
        (folder / cls).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(folder / cls / f"{i}.png")
    (folder / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    out = tmp_path / "out"
    # 8 files, batch 4, one epoch: every index is loaded, so the broken file is met whatever the order
    train.main(TINY + ["--data", str(folder), "--batch-size", "4", "--epochs", "1", "--output", str(out)])
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert sum("broken.png" in w for w in warnings) == 1   # one warning, naming the file
    assert "1 unreadable image" in capsys.readouterr().out  # and the run reports the count
    assert (out / "student.pt").is_file()
    assert [r["step"] for r in read_log(out)] == [1, 2]


def test_uint8_batches_normalised_on_the_device_train_exactly_like_float_batches(tmp_path, monkeypatch):
    """The loader's uint8 images normalised at the start of the step give the fp32 run of the per-image float
    pipeline (torchvision's ToDtype + Normalize in the workers) to the last bit: same losses, grad norms and
    weights."""
    args = RUN + ["--precision", "fp32", "--epochs", "1", "--num-workers", "1"]
    train.main(args + ["--output", str(tmp_path / "uint8")])
    float_pipeline = train.pretrain_transform
    monkeypatch.setattr(train, "pretrain_transform", lambda *a, uint8, **k: float_pipeline(*a, uint8=False, **k))
    train.main(args + ["--output", str(tmp_path / "float")])
    new, old = read_log(tmp_path / "uint8"), read_log(tmp_path / "float")
    assert [(r["loss"], r["grad_norm"]) for r in new] == [(r["loss"], r["grad_norm"]) for r in old]
    a, b = student_state(tmp_path / "uint8"), student_state(tmp_path / "float")
    assert all(torch.equal(a[k], b[k]) for k in a)
