"""bench/throughput.py on a tiny pair, the attention path choice it measures, and its timm side (the same FD
step built from timm's Beit and ViT)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from fd_ref.checkpoint.keys import to_timm_beit
from fd_ref.method.loss import smooth_l1
from fd_ref.models.vit import create_vit
from fd_ref.method.whitening import whiten

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import throughput  # noqa: E402
import throughput_configs  # noqa: E402

TINY = ["--student", "vit_tiny", "--teacher", "vit_tiny", "--img-size", "32", "--batch", "2",
        "--threads", "1"]


def _tiny_vit(**kw):
    return create_vit("vit_tiny", img_size=32, patch_size=8, depth=2, embed_dim=24, num_heads=3, **kw)


@pytest.mark.parametrize("pos_embed", ["shared_rpb", "rpb"])
def test_training_attention_paths_agree_with_gradients(pos_embed):
    """fused=True in CPU training (explicit formula), forced SDPA, and fused=False: same loss and gradients."""
    torch.manual_seed(0)
    model = _tiny_vit(pos_embed=pos_embed).train()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 3, 32, 32)
    results = []
    for fused, explicit_on_cpu in ((True, True), (True, False), (False, True)):
        model.set_fused_attn(fused)
        for block in model.blocks:
            block.attn.explicit_on_cpu_training = explicit_on_cpu
        model.zero_grad(set_to_none=True)
        out = model.forward_features(x)
        out.square().mean().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    for out, grads in results[1:]:
        assert torch.allclose(out, results[0][0], atol=1e-5)
        for g, g0 in zip(grads, results[0][1]):
            assert torch.allclose(g, g0, atol=1e-5, rtol=1e-4)


def test_cpu_training_with_trainable_bias_avoids_sdpa(monkeypatch):
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    model = _tiny_vit().train()
    x = torch.randn(1, 3, 32, 32)
    model.forward_features(x)
    assert not calls  # training, trainable shared bias, CPU: explicit formula
    with torch.no_grad():
        model.forward_features(x)
    assert len(calls) == 2  # no gradient needed: SDPA in both blocks
    model.eval().requires_grad_(False)
    model.forward_features(x)
    assert len(calls) == 4


def test_throughput_tiny_run_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.jsonl"
    records = throughput.main(TINY + ["--steps", "1", "--warmup", "1", "--levers", "--only", "baseline",
                                      "optimised", "adamw fused", "--json", str(out)])
    assert [r["config"] for r in records] == ["baseline", "optimised", "adamw fused"]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 3
    for r in lines:
        assert r["flops_per_step"] > 0 and r["img_per_s"] > 0 and r["matmul_peak_flops_per_s"] > 0
        assert 0 < r["fraction_of_peak"]
        assert r["speedup_vs_baseline"] > 0
    assert lines[0]["knobs"]["optimizer"] == "plain" and not lines[0]["knobs"]["student_fused_attn"]
    assert lines[1]["knobs"]["optimizer"] == "library" and lines[1]["knobs"]["student_fused_attn"]
    assert "baseline" in capsys.readouterr().out


def test_throughput_micro_runs():
    results = throughput.main(TINY + ["--micro", "1"])
    groups = {r["group"] for r in results}
    assert any("AdamW" in g for g in groups) and any("attention" in g for g in groups)
    assert all(r["time_s"] > 0 for r in results)


def test_throughput_sides_in_one_run(tmp_path, monkeypatch):
    """fp32 and bf16, eager and compiled, fd_ref and timm: all measured in one run, each against the matmul
    peak of its own precision, with ratios to the baseline and to timm of the same precision. (torch.compile
    is replaced by the identity here: compiling is tested in tests/test_compile.py; this checks the wiring.)"""
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(fn) or fn)
    out = tmp_path / "bench.jsonl"
    records = throughput.main(TINY + ["--steps", "1", "--warmup", "1", "--precision", "fp32", "bf16", "--compile",
                                      "--timm", "--json", str(out)])
    names = [r["config"] for r in records]
    assert names == [f"{c} {p}" for p in ("fp32", "bf16") for c in ("baseline", "optimised", "compiled", "timm")]
    assert len(compiled) == 2 and len(out.read_text().splitlines()) == 8
    by = {r["config"]: r for r in records}
    for p in ("fp32", "bf16"):
        assert {by[f"{c} {p}"]["precision"] for c in ("baseline", "optimised", "compiled", "timm")} == {p}
        assert by[f"timm {p}"]["impl"] == "timm" and by[f"timm {p}"]["speedup_vs_timm"] == pytest.approx(1.0)
        assert by[f"optimised {p}"]["speedup_vs_timm"] > 0 and by[f"compiled {p}"]["knobs"]["compile"]
        assert not by[f"optimised {p}"]["knobs"]["compile"]
        for r in (by[f"{c} {p}"] for c in ("baseline", "optimised", "compiled", "timm")):
            assert r["fraction_of_peak"] == pytest.approx(r["flops_per_s"] / r["matmul_peak_flops_per_s"])
    # each precision has its own measured peak; the teacher is cast to bf16 in bf16, like train.py
    assert by["optimised fp32"]["matmul_peak_flops_per_s"] != by["optimised bf16"]["matmul_peak_flops_per_s"]
    assert by["optimised bf16"]["knobs"]["teacher_cast"] and not by["optimised fp32"]["knobs"]["teacher_cast"]
    # both implementations' FLOPs counted, nearly equal (the timm teacher has an absolute position embedding
    # instead of a relative bias)
    assert by["timm fp32"]["flops_per_step"] == pytest.approx(by["optimised fp32"]["flops_per_step"], rel=0.02)


def test_timm_side_is_the_same_fd_step():
    """The timm side computes fd_ref's FD loss: with fd_ref's student weights loaded into timm's Beit (strictly:
    same parameters, same shapes), the same projection and the same teacher, its loss equals fd_ref's
    smooth_l1(projection(student(x)), whiten(teacher(x))) with beta 2."""
    import argparse
    args = argparse.Namespace(student="vit_tiny", teacher="vit_tiny", img_size=32)
    timm_side = throughput_configs.build_timm_base(args, torch.device("cpu")).train()
    torch.manual_seed(3)
    ours = create_vit("vit_tiny", img_size=32, patch_size=16).train()
    for p in ours.parameters():
        torch.nn.init.normal_(p, std=0.2)
    result = timm_side.student.load_state_dict(to_timm_beit(ours.state_dict()), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        loss = timm_side(x)
        target = whiten(timm_side.teacher.forward_features(x))
        expected = smooth_l1(timm_side.projection(ours.forward_features(x)), target, beta=2.0)
        assert (ours.forward_features(x) - timm_side.student.forward_features(x)).abs().max() < 1e-5
    assert loss.item() > 0.05
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert timm_side.teacher.training is False and not any(p.requires_grad for p in timm_side.teacher.parameters())


def test_gpu_check_script_parses():
    """bench/gpu_check.sh (run on a GPU machine) is valid bash; its CUDA tests are in tests/test_cuda.py."""
    import subprocess
    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.sh"
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "tests/test_cuda.py" in script.read_text()


def test_residual_update_ab_compares_the_same_function(capsys, monkeypatch):
    """bench/residual_update_ab.py's three-op block forward computes what the library's fused one does (same
    drop-path masks from the same seed, values to float rounding), and the script runs on a tiny pair."""
    import copy
    import types

    import residual_update_ab as ab
    torch.manual_seed(0)
    fused = create_vit("vit_tiny", img_size=32, patch_size=8, depth=3, embed_dim=24, num_heads=3,
                       drop_path_rate=0.5).train()
    plain = copy.deepcopy(fused)
    for block in plain.blocks:
        block.forward = types.MethodType(ab.three_op_forward, block)
    x = torch.randn(8, 3, 32, 32)
    torch.manual_seed(1)
    a = fused.forward_features(x)
    torch.manual_seed(1)
    b = plain.forward_features(x)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.manual_seed(2)  # another mask: the outputs differ, so the comparison above is not vacuous
    assert not torch.allclose(plain.forward_features(x), a)

    monkeypatch.setattr(sys, "argv", ["residual_update_ab.py", *TINY[:-2], "--rounds", "1", "--precision", "fp32"])
    ab.main()
    assert "paired 3 ops / add_branch:" in capsys.readouterr().out


@pytest.mark.parametrize("pipeline, dtype", [("uint8", "uint8"), ("float", "float32")])
def test_loader_bench_reads_every_image_from_folder_and_shards_in_the_pipeline_named(tmp_path, pipeline, dtype):
    """bench/loader_throughput.py on 24 small JPEGs in shards of 8: each source gives every image after the
    warm-up batch, as the batches train.py's loader makes (uint8) or normalised in the workers (float)."""
    import loader_throughput
    summary = loader_throughput.main(["--images", "24", "--shard-size", "8", "--workers", "0", "--batch", "4",
                                      "--img-size", "32", "--warmup", "1", "--work", str(tmp_path),
                                      "--pipeline", pipeline])
    assert [(r["source"], r["images"], r["dtype"]) for r in summary["rows"]] == [
        ("folder", 24 - 4, dtype), ("shards", 24 - 4, dtype)]
    assert summary["pipeline"] == pipeline
