"""Spec tests of several teachers at once (fd_ref.method.multi_teacher, train.py --teacher A B ...): one teacher
of weight 1 is FD's objective step by step, bit for bit; with several, the loss is the weighted sum of each
teacher's FD loss computed on its own; ViT + CNN + Swin teachers of different widths and grids train
together; the flags, YAML lists, log.jsonl, student.pt and checkpoint.pt of a two-teacher run; and the
single-teacher defaults of train.py keep today's files."""
from __future__ import annotations

import copy
import json

import pytest
import timm
import torch
import yaml

import train
from fd_ref.config import resolve_config
from fd_ref.errors import UserError
from fd_ref.method.distill import FeatureDistillation
from fd_ref.method.multi_teacher import MultiTeacherDistillation, teacher_keys
from fd_ref.models.teacher_list import TEACHER_KEYS, teacher_settings
from fd_ref.models.teachers import Teacher, build_teacher
from fd_ref.models.vit import VisionTransformer

RESNET = ("resnet18", dict(layers=(1, 1, 1, 1), channels=(8, 16, 32, 64), stem_width=8))
SWIN = ("swin_tiny_patch4_window7_224", dict(embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=4))


def _vit_teacher(seed=1, dim=24, patch=8):
    torch.manual_seed(seed)
    net = VisionTransformer(img_size=32, patch_size=patch, embed_dim=dim, depth=1, num_heads=2)
    return Teacher(net, dim, net.grid, 1, name=f"vit{dim}")


def _student(seed=0, drop_path=0.2):
    torch.manual_seed(seed)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2,
                             drop_path_rate=drop_path)


def _train(model, params, batches, seed=5):
    """SGD steps from a fixed random state; the losses of every step."""
    torch.manual_seed(seed)
    opt = torch.optim.SGD(params, lr=0.1)
    out = []
    for x in batches:
        loss = model(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        out.append(loss.detach().clone())
    return out


@pytest.mark.parametrize("options", [{}, {"target_norm": "phi_s"}, {"loss": "cosine", "target": "avg"}])
def test_one_teacher_of_weight_one_is_fd_step_by_step(options):
    """The same student, teacher, projection init and batches (drop path on: the same random draws): the
    multi-teacher layer and FeatureDistillation give identical losses at every step."""
    batches = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    teacher = _vit_teacher()
    torch.manual_seed(7)
    single = FeatureDistillation(_student(), teacher, **options)
    multi = MultiTeacherDistillation(copy.deepcopy(single.student), [teacher], [1.0], **options)
    multi.branches[0].projection.load_state_dict(single.projection.state_dict())
    if options.get("target_norm") == "phi_s":
        for fd in (single, multi.branches[0]):
            fd.target_norm.fit([fd.teacher_tokens(b) for b in batches])
    a = _train(single, list(single.student.parameters()) + list(single.projection.parameters()), batches)
    b = _train(multi, list(multi.parameters()), batches)
    assert all(torch.equal(x, y) for x, y in zip(a, b)), (a, b)
    assert a[0] != a[-1]  # the student did learn something between the steps


def test_the_loss_is_the_weighted_sum_of_each_teachers_fd_loss():
    x = torch.randn(3, 3, 32, 32)
    teachers = [_vit_teacher(1, 24), _vit_teacher(2, 32, patch=16)]  # other width, other grid (2x2)
    student = _student(drop_path=0.0)
    multi = MultiTeacherDistillation(student, teachers, [0.3, 2.0])
    alone = []
    for branch, teacher in zip(multi.branches, teachers):
        fd = FeatureDistillation(student, teacher)
        fd.projection.load_state_dict(branch.projection.state_dict())
        alone.append(fd(x))
    total = multi(x)
    assert torch.allclose(total, 0.3 * alone[0] + 2.0 * alone[1], rtol=1e-6)
    assert list(multi.last_losses) == ["loss_0_vit24", "loss_1_vit32"]
    assert torch.allclose(multi.last_losses["loss_1_vit32"], alone[1])
    assert multi.branches[0].projection.teacher_dim == 24 and multi.branches[1].projection.teacher_dim == 32


def test_defaults_weights_keys_and_refusals():
    """Weights default to 1 each (the plain sum); a weight may be 0 if the sum stays positive; the student is
    one module shared by every branch; a teacher without a name is ``teacher<k>`` in the log keys, and names
    lose their outer punctuation; wrong weights are refused with their whole message."""
    x = torch.randn(2, 3, 32, 32)
    teachers = [_vit_teacher(1, 24), _vit_teacher(2, 32)]
    student = _student(drop_path=0.0)
    multi = MultiTeacherDistillation(student, teachers)
    assert multi.weights == [1.0, 1.0]
    total = multi(x)
    assert torch.allclose(total, sum(multi.last_losses.values()), rtol=1e-6)
    assert multi.student is student and all(b.student is student for b in multi.branches)
    assert MultiTeacherDistillation(student, teachers, [1.0, 0.0]).weights == [1.0, 0.0]
    nameless = copy.copy(teachers[0])
    del nameless.name
    assert MultiTeacherDistillation(student, [nameless, teachers[1]]).keys == ["loss_0_teacher0", "loss_1_vit32"]
    assert teacher_keys(["(clip)", "-dino v2-", "Xception_"]) == ["loss_0_clip", "loss_1_dino_v2", "loss_2_Xception"]
    for weights, message in (([1.0], "2 teachers but 1 weights: give one weight per teacher, in the same order"),
                             ([0.0, 0.0], "teacher weights must be >= 0 with a positive sum, got [0.0, 0.0]"),
                             ([-1.0, 2.0], "teacher weights must be >= 0 with a positive sum, got [-1.0, 2.0]")):
        with pytest.raises(ValueError) as error:
            MultiTeacherDistillation(student, teachers, weights)
        assert str(error.value) == message


def test_vit_cnn_and_swin_teachers_train_one_student(tmp_path):
    """Three families, three widths (24, 64, 32), three grids (4x4 + class token, 2x2, 2x2 without one):
    every projection gets a gradient, the student too, and one SGD step lowers each teacher's loss."""
    nets = {}
    for key, (name, kwargs), img in (("r", RESNET, 64), ("s", SWIN, 64)):
        nets[key] = timm.create_model(name, pretrained=False, num_classes=0, img_size=img, **kwargs) \
            if key == "s" else timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
        torch.save(nets[key].state_dict(), tmp_path / f"{key}.pt")
    teachers = [build_teacher("vit_tiny", img_size=64, patch_size=16, depth=1),
                build_teacher(f"timm:{RESNET[0]}", img_size=64, checkpoint=str(tmp_path / "r.pt"), timm_kwargs=RESNET[1]),
                build_teacher(f"timm:{SWIN[0]}", img_size=64, checkpoint=str(tmp_path / "s.pt"), timm_kwargs=SWIN[1])]
    assert [t.num_prefix_tokens for t in teachers] == [1, 0, 0] and teachers[1].grid == (2, 2)
    torch.manual_seed(0)
    student = VisionTransformer(img_size=64, patch_size=16, embed_dim=16, depth=1, num_heads=2)
    multi = MultiTeacherDistillation(student, teachers, target_norm="phi_s")
    x = torch.randn(4, 3, 64, 64)
    for branch in multi.branches:
        branch.target_norm.fit([branch.teacher_tokens(x)])
    loss = multi(x)
    loss.backward()
    assert all(b.projection.proj.weight.grad.abs().sum() > 0 for b in multi.branches)
    assert student.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    before = dict(multi.last_losses)
    with torch.no_grad():
        for p in multi.parameters():
            if p.grad is not None:
                p -= 0.05 * p.grad
    multi(x)
    assert all(multi.last_losses[k] < before[k] for k in before), (before, multi.last_losses)
    assert len(set(teacher_keys([t.name for t in teachers]))) == 3


def test_flags_and_yaml_take_one_value_per_teacher(tmp_path):
    defaults = train.DEFAULTS
    one = resolve_config(defaults, ["--teacher", "vit_small"], multi=TEACHER_KEYS)
    assert one["teacher"] == "vit_small" and one["teacher_weight"] == 1.0  # a single value stays a value
    two = resolve_config(defaults, ["--teacher", "a", "b", "--teacher-checkpoint", "none", "b.pt",
                                    "--teacher-weight", "1", "0.5"], multi=TEACHER_KEYS)
    assert two["teacher"] == ["a", "b"] and two["teacher_checkpoint"] == [None, "b.pt"]
    assert [t["teacher_weight"] for t in teacher_settings(two)] == [1.0, 0.5]
    assert [t["teacher_kwargs"] for t in teacher_settings(two)] == [None, None]  # one value: every teacher
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"teacher": ["clip_vit_base", "dino_vit_base"], "teacher_weight": [1, 2]}))
    cfg = resolve_config(defaults, ["--config", str(path)], multi=TEACHER_KEYS)
    assert cfg["teacher"] == ["clip_vit_base", "dino_vit_base"] and cfg["teacher_weight"] == [1.0, 2.0]
    with pytest.raises(UserError, match="2 teachers .* 3 --teacher-weight"):
        teacher_settings(resolve_config(defaults, ["--teacher", "a", "b", "--teacher-weight", "1", "2", "3"],
                                        multi=TEACHER_KEYS))


TINY = ["--img-size", "32", "--patch-size", "8", "--depth", "1", "--embed-dim", "16", "--num-heads", "2",
        "--teacher-patch-size", "8", "--teacher-depth", "1", "--synthetic-size", "32", "--num-workers", "0",
        "--progress", "false", "--log-every", "1", "--warmup-epochs", "0", "--batch-size", "8", "--epochs", "1"]


def test_two_teacher_run_writes_each_teachers_loss_and_records_both(tmp_path):
    pytest.importorskip("tensorboard")
    net = timm.create_model(RESNET[0], pretrained=False, num_classes=0, **RESNET[1])
    torch.save(net.state_dict(), tmp_path / "r.pt")
    out = tmp_path / "two"
    train.main(TINY + ["--teacher", "vit_tiny", f"timm:{RESNET[0]}", "--teacher-checkpoint", "none",
                       str(tmp_path / "r.pt"), "--teacher-kwargs", "none", json.dumps(RESNET[1]),
                       "--teacher-weight", "1", "0.5", "--output", str(out), "--tensorboard"])
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 4
    for rec in log:
        assert rec["loss"] == pytest.approx(rec["loss_0_vit_tiny"] + 0.5 * rec["loss_1_timm_resnet18"], rel=1e-5)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    for key in ("loss_0_vit_tiny", "loss_1_timm_resnet18"):  # beside the total in TensorBoard too
        assert [e.value for e in events.Scalars(f"train/{key}")] == pytest.approx([r[key] for r in log], rel=1e-6)
    blob = torch.load(out / "student.pt", map_location="cpu", weights_only=True)
    assert blob["teacher"] == ["vit_tiny", f"timm:{RESNET[0]}"]
    state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]
    assert state["projections.0.proj.weight"].shape == (192, 16, 1)  # the vit_tiny teacher preset: width 192
    assert state["projections.1.proj.weight"].shape == (64, 16, 1)  # ResNet's last stage: 64 channels
    assert not any(k.startswith("projection.") for k in state)


def test_single_teacher_defaults_keep_todays_files(tmp_path):
    """One teacher, the defaults: the objective is FeatureDistillation itself, checkpoint.pt holds the
    student and the projection under today's keys (nothing for whitening), student.pt names the teacher."""
    out = tmp_path / "one"
    train.main(TINY + ["--output", str(out), "--max-steps", "2"])
    state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]
    assert {k.split(".")[0] for k in state} == {"student", "projection"}
    assert set(k for k in state if k.startswith("projection.")) == {"projection.proj.weight", "projection.proj.bias"}
    blob = torch.load(out / "student.pt", map_location="cpu", weights_only=True)
    assert blob["teacher"] == "vit_tiny" and set(blob) == {"model", "model_config", "teacher"}


def test_a_timm_model_trained_by_finetune_is_a_teacher(tmp_path):
    """finetune.py --from-scratch --model timm:<cnn> writes best.pt (keys under ``model.``, a classifier
    ``fc``); build_teacher reads it: the teacher's tokens are that network's last map, flattened."""
    import finetune
    kwargs = "layers=[1,1,1,1],channels=[8,8,16,16],output_stride=8"
    out = tmp_path / "cnn"
    finetune.main(["--from-scratch", "--model", "timm:resnet18", "--model-kwargs", kwargs, "--img-size", "32",
                   "--synthetic-size", "32", "--epochs", "1", "--batch-size", "16", "--mixup", "0", "--cutmix", "0",
                   "--num-workers", "0", "--progress", "false", "--output", str(out)])
    teacher = build_teacher("timm:resnet18", img_size=32, checkpoint=str(out / "best.pt"),
                            timm_kwargs=dict(layers=[1, 1, 1, 1], channels=[8, 8, 16, 16], output_stride=8))
    assert (teacher.grid, teacher.embed_dim, teacher.num_prefix_tokens) == ((4, 4), 16, 0)
    saved = torch.load(out / "best.pt", map_location="cpu", weights_only=True)["model"]
    net = timm.create_model("resnet18", pretrained=False, num_classes=10, layers=[1, 1, 1, 1],
                            channels=[8, 8, 16, 16], output_stride=8).eval()
    net.load_state_dict({k[len("model."):]: v for k, v in saved.items()})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = net.forward_features(x).flatten(2).transpose(1, 2)
    assert torch.allclose(teacher(x), expected, atol=1e-5)


def test_the_same_teacher_and_file_twice_is_refused_but_one_name_with_two_files_is_not():
    base = dict(teacher_kwargs=None, teacher_weight=1.0)
    with pytest.raises(UserError, match="listed twice"):
        teacher_settings(dict(base, teacher=["vit_tiny", "vit_tiny"], teacher_checkpoint=None))
    with pytest.raises(UserError, match="listed twice"):
        teacher_settings(dict(base, teacher=["vit_tiny", "vit_tiny"], teacher_checkpoint=["a.pt", "a.pt"]))
    two = teacher_settings(dict(base, teacher=["vit_tiny", "vit_tiny"], teacher_checkpoint=["a.pt", "b.pt"]))
    assert [t["teacher_checkpoint"] for t in two] == ["a.pt", "b.pt"]


def test_one_timm_name_with_two_sets_of_arguments_is_two_teachers():
    """The same ``timm:<name>`` twice with different ``--teacher-kwargs`` is two teachers; with the same
    arguments (even written differently) it is refused like any teacher listed twice."""
    base = dict(teacher=["timm:resnet18", "timm:resnet18"], teacher_checkpoint=None, teacher_weight=1.0)
    two = teacher_settings(dict(base, teacher_kwargs=["output_stride=8", "output_stride=16"]))
    assert [t["teacher_kwargs"] for t in two] == ["output_stride=8", "output_stride=16"]
    for same in (["output_stride=8", "output_stride=8"], ["output_stride=8", "{output_stride: 8}"], "output_stride=8"):
        with pytest.raises(UserError, match="listed twice"):
            teacher_settings(dict(base, teacher_kwargs=same))
