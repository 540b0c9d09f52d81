"""``--compile`` (torch.compile, inductor; on the CPU it writes and builds C++ with the system compiler) gives
the eager step's numbers, and a compiled run resumes (issue #15, item 3).

Tolerances (fp32, measured differences in brackets): the compiled loss equals eager's to rtol 1e-5 [6e-8
absolute on a loss of 0.33]; every gradient to 1e-5 of its own largest entry [9e-7] plus atol 1e-7. Inductor
fuses and reorders float32 sums, so bit equality is not expected. In bf16 autocast both steps round, each in
its own order, so the compiled gradients are compared with fp32 ones: no further from them than the eager bf16
gradients are, to a factor 2 (the measured relative difference compiled - eager was 3e-2 of the largest
gradient entry, bf16's own resolution being 8e-3).

Drop path stays on (rate up to 0.2): ``torch._inductor.config.fallback_random`` makes the compiled graph
draw its Bernoulli masks from torch's own generator, in the same order as eager.

Compilation from a cold cache took 40-80 s on the 2-core development CPU, hence the ``slow`` marker; it is
run by default (pytest.ini) - deselect it with ``-m "not slow"`` when iterating.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import train
from fd_ref.method.distill import FeatureDistillation
from fd_ref.models.teachers import build_teacher
from fd_ref.models.vit import create_vit

pytestmark = pytest.mark.slow


def _fd_model() -> FeatureDistillation:
    torch.manual_seed(0)
    student = create_vit("vit_tiny", img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2,
                         drop_path_rate=0.2)
    teacher = build_teacher("vit_tiny", img_size=32, patch_size=8, depth=1)
    model = FeatureDistillation(student, teacher).train()
    for p in model.projection.parameters():  # a projection off its init, so every gradient is non-trivial
        torch.nn.init.normal_(p, std=0.2)
    return model


def _step(model: FeatureDistillation, forward, x: torch.Tensor, dtype) -> tuple[torch.Tensor, dict]:
    """One FD step's loss and the gradients of every trainable parameter (the same drop-path draws)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        loss = forward(x)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    return loss.detach(), grads


@pytest.fixture(scope="module")
def steps(monkeypatch_module):
    """Eager and compiled steps (fp32 and bf16 autocast) of one tiny FD model on one batch."""
    import torch._inductor.config as inductor_config
    monkeypatch_module.setattr(inductor_config, "fallback_random", True)
    # batch 16, the shapes of the train.py test below: it then reuses this fp32 graph instead of compiling
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    eager_model, compiled_model = _fd_model(), _fd_model()
    compiled = torch.compile(compiled_model)
    out = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        out["eager", name] = _step(eager_model, eager_model, x, dtype)
        out["compiled", name] = _step(compiled_model, compiled, x, dtype)
    return out


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_compiled_fp32_step_equals_eager(steps):
    (loss_e, grads_e), (loss_c, grads_c) = steps["eager", "fp32"], steps["compiled", "fp32"]
    assert torch.isfinite(loss_e) and loss_e > 0
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=0)
    assert grads_c.keys() == grads_e.keys()
    for name, g in grads_e.items():
        assert g.abs().max() > 0, name  # the comparison below is not vacuous
        torch.testing.assert_close(grads_c[name], g, rtol=0, atol=1e-5 * float(g.abs().max()) + 1e-7,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_compiled_bf16_step_is_as_close_to_fp32_as_eager(steps):
    loss32, grads32 = steps["eager", "fp32"]
    (loss_e, grads_e), (loss_c, grads_c) = steps["eager", "bf16"], steps["compiled", "bf16"]
    torch.testing.assert_close(loss_c, loss32, rtol=1e-2, atol=0)  # the loss itself is reduced in fp32
    for name, g in grads32.items():
        scale = float(g.abs().max())
        err_eager = float((grads_e[name] - g).abs().max())
        err_compiled = float((grads_c[name] - g).abs().max())
        assert err_compiled <= 2 * err_eager + 1e-2 * scale, (name, err_compiled, err_eager, scale)


# -- one graph: nothing in the step makes torch.compile fall back to eager --------------------------------
@pytest.mark.parametrize("pos_embed", ["shared_rpb", "rpb", "abs"])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_distillation_and_finetuning_forward_trace_as_one_graph(pos_embed, dtype):
    """The FD forward (student with drop path, teacher, projection, loss) and the fine-tuning forward (the
    student with its head) trace into one graph each (``fullgraph=True``: a graph break raises). A break does
    not change the numbers, so the tests above cannot see it, but it costs the speed ``--compile`` is for: a
    break inside ``Block`` (``torch.result_type`` in ``add_branch``, found in issue #15) sent every block back
    to eager and recompiled ``Block.forward`` per block until Dynamo's cache limit. Dynamo only (the "eager"
    backend): no inductor compilation, a few seconds."""
    import torch._dynamo

    torch.manual_seed(0)
    student = create_vit("vit_tiny", img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2,
                         drop_path_rate=0.2, pos_embed=pos_embed)
    fd = FeatureDistillation(student, build_teacher("vit_tiny", img_size=32, patch_size=8, depth=1)).train()
    classifier = create_vit("vit_tiny", img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2,
                            drop_path_rate=0.2, pos_embed="rpb" if pos_embed == "shared_rpb" else pos_embed,
                            global_pool="avg", num_classes=10).train()
    x = torch.randn(4, 3, 32, 32)
    for model in (fd, classifier):
        torch._dynamo.reset()
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out = torch.compile(model, backend="eager", fullgraph=True)(x)
        out.float().sum().backward()


@pytest.mark.parametrize("options,dtype", [({}, None), ({"target_norm": "phi_s", "loss": "cosine"}, torch.bfloat16)],
                         ids=["whiten-smooth_l1-fp32", "phi_s-cosine-bf16"])
def test_two_teachers_of_two_families_trace_as_one_graph(tmp_path, options, dtype):
    """``train.py --teacher A B --compile`` (issue #24): the several-teacher objective - a ViT teacher with a
    class token and a CNN teacher on another grid (its map resized to the student's), one student, each
    teacher's loss kept for the log - traces into one graph too, with the settings issue #24 added."""
    import timm
    import torch._dynamo
    from fd_ref.method.multi_teacher import MultiTeacherDistillation

    cnn_kwargs = dict(layers=(1, 1, 1, 1), channels=(8, 16, 32, 64), stem_width=8)
    torch.save(timm.create_model("resnet18", pretrained=False, num_classes=0, **cnn_kwargs).state_dict(),
               tmp_path / "cnn.pt")
    teachers = [build_teacher("vit_tiny", img_size=32, patch_size=8, depth=1),
                build_teacher("timm:resnet18", img_size=32, checkpoint=str(tmp_path / "cnn.pt"), timm_kwargs=cnn_kwargs)]
    assert teachers[1].grid != teachers[0].grid  # the grids differ, so the resize is in the graph
    torch.manual_seed(0)
    student = create_vit("vit_tiny", img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2,
                         drop_path_rate=0.2)
    model = MultiTeacherDistillation(student, teachers, **options).train()
    torch._dynamo.reset()
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        loss = torch.compile(model, backend="eager", fullgraph=True)(torch.randn(4, 3, 32, 32))
    loss.backward()
    assert sorted(model.last_losses) == ["loss_0_vit_tiny", "loss_1_timm_resnet18"]
    torch.testing.assert_close(loss.detach(), sum(model.last_losses.values()))


# -- train.py --compile, stopped and resumed ---------------------------------------------------------------
TINY = ["--img-size", "32", "--patch-size", "8", "--depth", "2", "--embed-dim", "32", "--num-heads", "2",
        "--teacher-patch-size", "8", "--teacher-depth", "1", "--synthetic-size", "32", "--num-workers", "0",
        "--progress", "false", "--log-every", "1", "--warmup-epochs", "0", "--batch-size", "16",
        "--epochs", "2", "--drop-path", "0.2", "--lr", "0.05", "--seed", "3", "--precision", "fp32"]


def _log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines() if line.strip()]


def test_compiled_run_resumes_like_an_uninterrupted_one(tmp_path):
    """train.py --compile, as users run it (inductor draws its own drop-path masks from seeds it takes from
    torch's generator): 4 steps straight, and 1 step then a rerun of the same command (resuming mid-epoch,
    RNG state restored) give the same log and the same final weights, to fp32 rounding (rtol 1e-6)."""
    full, parts = tmp_path / "full", tmp_path / "parts"
    train.main(TINY + ["--compile", "--output", str(full)])
    train.main(TINY + ["--compile", "--output", str(parts), "--max-steps", "1"])
    assert [r["step"] for r in _log(parts)] == [1]
    train.main(TINY + ["--compile", "--output", str(parts)])
    a, b = _log(full), _log(parts)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-6)
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-6)
        assert rb["lr"] == ra["lr"]
    assert a[-1]["loss"] != a[0]["loss"]
    sa, sb = (torch.load(f / "student.pt", map_location="cpu", weights_only=True)["model"] for f in (full, parts))
    assert not any(k.startswith("_orig_mod") for k in sa)  # clean keys, loadable by finetune.py
    assert sa.keys() == sb.keys()
    for k, v in sa.items():
        torch.testing.assert_close(sb[k], v, rtol=1e-6, atol=1e-7)
