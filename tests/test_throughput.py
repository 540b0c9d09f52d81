"""bench/throughput.py on a tiny pair, and the attention path choice it measures."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from fd_ref.vit import create_vit

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import throughput  # noqa: E402

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
