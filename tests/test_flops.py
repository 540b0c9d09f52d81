"""The MFU's FLOP count: one forward and backward counted on the meta device (fd_ref.engine.flops) against the
same counter over a real forward and backward of the same network, and no real step spent on it."""
from __future__ import annotations

import pytest
import torch

from fd_ref.engine.flops import count_flops, step_flops_per_image
from fd_ref.method.distill import FeatureDistillation
from fd_ref.models.teachers import Teacher
from fd_ref.models.timm_backbone import TimmBackbone
from fd_ref.models.vit import PRESETS, create_vit


def _real_flops_per_image(network: torch.nn.Module, images: torch.Tensor) -> float:
    """The count as the loop made it before: FlopCounterMode around a real forward and backward."""
    return count_flops(lambda: network(images).float().sum().backward()) / len(images)


def _fd(student: torch.nn.Module, img_size: int, patch_size: int = 8) -> FeatureDistillation:
    net = create_vit("vit_tiny", img_size=img_size, patch_size=patch_size, depth=2, num_classes=0)
    return FeatureDistillation(student, Teacher(net, net.embed_dim, net.grid, 1, name="vit_tiny"))


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_meta_count_matches_the_real_count_for_every_vit_preset(preset):
    """Each preset as the student (its patch, width and heads; two blocks, as the count is the same sum over
    every block; a small image), a ViT teacher: the FD step's FLOPs on the meta device are within 2% of the
    real step's."""
    torch.manual_seed(0)
    patch = PRESETS[preset]["patch_size"]
    size = 2 * patch
    student = create_vit(preset, img_size=size, depth=2, drop_path_rate=0.1, num_classes=0)
    fd = _fd(student, size, patch)
    images = torch.randn(2, 3, size, size)
    meta = step_flops_per_image(fd, images)
    real = _real_flops_per_image(fd, images)
    assert real > 0 and abs(meta - real) <= 0.02 * real, (meta, real)


def test_meta_count_matches_the_real_count_for_a_timm_backbone():
    """A timm ResNet student (a CNN: convolutions and BatchNorm) distilled from a ViT teacher, and the
    same backbone fine-tuned alone."""
    torch.manual_seed(0)
    student = TimmBackbone("timm:resnet18", 32, {"output_stride": 8})
    images = torch.randn(2, 3, 32, 32)
    for network in (_fd(student, 32), student):
        meta = step_flops_per_image(network, images)
        real = _real_flops_per_image(network, images)
        assert real > 0 and abs(meta - real) <= 0.02 * real, (type(network).__name__, meta, real)


def test_the_count_runs_nothing_real_and_changes_nothing():
    """The network's parameters, buffers and gradients are untouched and its forward never sees a real
    tensor; without a network there is no count."""
    torch.manual_seed(0)
    student = TimmBackbone("timm:resnet18", 32, {"output_stride": 8})
    fd = _fd(student, 32)
    before = {k: v.clone() for k, v in fd.state_dict().items()}
    seen = []
    fd.register_forward_pre_hook(lambda m, args: seen.append(args[0].device.type))
    assert step_flops_per_image(fd, torch.randn(2, 3, 32, 32)) > 0
    assert seen == ["meta"]
    assert all(p.grad is None for p in fd.parameters())
    assert all(torch.equal(v, before[k]) for k, v in fd.state_dict().items())
    assert step_flops_per_image(None, torch.randn(2, 3, 32, 32)) == 0.0



def test_a_uint8_batch_counts_as_the_float_images_the_network_sees():
    """The loader's batch is uint8 (normalised on the device inside the step): counted as float images of its
    shape, the same FLOPs as a float batch, where the uint8 tensor itself would fail the count (0)."""
    torch.manual_seed(0)
    fd = _fd(create_vit("vit_tiny", img_size=32, patch_size=8, depth=2, num_classes=0), 32)
    floats = step_flops_per_image(fd, torch.randn(2, 3, 32, 32))
    assert floats > 0
    assert step_flops_per_image(fd, torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)) == floats

def test_train_runs_step_fn_once_per_micro_batch_before_the_first_step(tmp_path, monkeypatch):
    """No hidden extra step: until the first optimiser step the objective's forward runs once per
    micro-batch on real images (the FLOP count's pass is on the meta device)."""
    import train

    calls = []
    original = FeatureDistillation.forward

    def counting(self, images):
        calls.append(images.device.type)
        return original(self, images)

    monkeypatch.setattr(FeatureDistillation, "forward", counting)
    train.main(["--max-steps", "1", "--accum-steps", "2", "--synthetic-size", "16", "--batch-size", "4",
                "--img-size", "32", "--depth", "1", "--teacher-depth", "1", "--epochs", "1", "--num-workers", "0",
                "--progress", "false", "--log-every", "1", "--output", str(tmp_path / "run")])
    assert calls.count("cpu") == 2 and set(calls) <= {"cpu", "meta"}
    log = (tmp_path / "run" / "log.jsonl").read_text()
    assert '"mfu"' in log


def test_a_student_shared_by_several_teachers_stays_real():
    """The two-teacher objective holds its student twice (``student`` and each branch's): after the count,
    every tensor of the network is still the real one, on the CPU."""
    from fd_ref.method.multi_teacher import MultiTeacherDistillation
    torch.manual_seed(0)
    student = create_vit("vit_tiny", img_size=32, patch_size=8, depth=1, num_classes=0)
    teachers = [_fd(student, 32).teacher, _fd(student, 32).teacher]
    multi = MultiTeacherDistillation(student, teachers)
    before = {k: v.clone() for k, v in multi.state_dict().items()}
    images = torch.randn(2, 3, 32, 32)
    assert step_flops_per_image(multi, images) > 0
    assert all(t.device.type == "cpu" for t in [*multi.parameters(), *multi.buffers()])
    assert all(torch.equal(v, before[k]) for k, v in multi.state_dict().items())
    assert torch.isfinite(multi(images))
