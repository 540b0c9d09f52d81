"""The GPU paths (issue #15, item 4): run by ``bench/gpu_check.sh`` on a CUDA machine, skipped elsewhere.

- fused attention (SDPA with the relative position bias as an additive mask, and FlexAttention gathering
  the bias from its table inside the kernel) equals the explicit formula ``softmax(q k^T * scale + bias) v``
  on CUDA, forward and gradients (q, k, v and the tables), in fp32 and in bf16;
- one bf16-autocast FD step (teacher in bf16 as train.py sets it) against the same step in fp32;
- train.py in fp16 (a GradScaler), with ``--compile``, and stopped then resumed, on the GPU;
- a 1-process NCCL job under torchrun: train.py end to end, and one DDP step equal to the plain step.

Tolerances, fp32 with TF32 off (as fp32 means fp32 here): outputs to 1e-4 and gradients to 1e-4 of each
gradient's largest entry (different summation orders). bf16: each side's error against the fp32 result, the
fused or compiled one no more than twice the explicit / eager one's plus 1e-2 of the largest entry.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import train
from fd_ref.method.distill import FeatureDistillation
from fd_ref.models.teachers import build_teacher
from fd_ref.models.vit import create_vit

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU: run bench/gpu_check.sh on one")]

TINY = ["--img-size", "32", "--patch-size", "8", "--depth", "2", "--embed-dim", "64", "--num-heads", "4",
        "--teacher-patch-size", "8", "--teacher-depth", "2", "--synthetic-size", "64", "--num-workers", "0",
        "--progress", "false", "--log-every", "1", "--warmup-epochs", "0", "--batch-size", "16",
        "--epochs", "2", "--drop-path", "0.1", "--lr", "0.05", "--seed", "3"]


@pytest.fixture(autouse=True)
def _no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines() if line.strip()]


def _grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().float().clone() for n, p in module.named_parameters() if p.grad is not None}


def _assert_close_to(reference: dict, candidate: dict, baseline: dict) -> None:
    """candidate's error against reference <= 2 x baseline's + 1e-2 of the largest entry (bf16 checks)."""
    assert reference.keys() == candidate.keys() == baseline.keys()
    for name, ref in reference.items():
        scale = float(ref.abs().max())
        err_c = float((candidate[name] - ref).abs().max())
        err_b = float((baseline[name] - ref).abs().max())
        assert err_c <= 2 * err_b + 1e-2 * scale, (name, err_c, err_b, scale)


def _tiny_student(pos_embed: str = "shared_rpb"):
    torch.manual_seed(0)
    model = create_vit("vit_tiny", img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=4,
                       pos_embed=pos_embed).cuda().train()
    with torch.no_grad():  # a bias table far from zero, so the mask matters
        for name, p in model.named_parameters():
            if "rel_pos_bias" in name:
                p.normal_(std=1.0)
    return model


# -- fused attention with the position bias ---------------------------------------------------------------
@pytest.mark.parametrize("kernel", ["sdpa", "flex"])
@pytest.mark.parametrize("pos_embed", ["shared_rpb", "rpb"])
def test_fused_attention_equals_explicit_formula_on_cuda(pos_embed, kernel):
    """SDPA with the dense bias, and FlexAttention gathering the shared table (distillation) or each block's
    table (fine-tuning) inside the kernel, grid 4 x 4: forward and every gradient, the tables' included."""
    model = _tiny_student(pos_embed)
    x = torch.randn(4, 3, 32, 32, device="cuda")

    def run(fused: bool, dtype):
        model.set_attention_kernel(kernel if fused else "explicit")
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out = model.forward_features(x)
        (out.float() * torch.linspace(-1, 1, out.shape[-1], device="cuda")).sum().backward()
        return out.detach().float(), _grads(model)

    out32_e, g32_e = run(False, None)
    out32_f, g32_f = run(True, None)
    torch.testing.assert_close(out32_f, out32_e, rtol=0, atol=1e-4)
    for name, g in g32_e.items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(g32_f[name], g, rtol=0, atol=1e-4 * float(g.abs().max()))
    table = [n for n in g32_e if "rel_pos_bias" in n]
    assert table and all(g32_e[n].abs().max() > 0 for n in table)  # the bias gets its gradient on both paths
    out16_e, g16_e = run(False, torch.bfloat16)
    out16_f, g16_f = run(True, torch.bfloat16)
    assert float((out16_f - out32_e).abs().max()) <= 2 * float((out16_e - out32_e).abs().max()) + 1e-2
    _assert_close_to(g32_e, g16_f, g16_e)


@pytest.mark.parametrize("grid", [(14, 14), (5, 7)])
def test_flex_attention_gradients_equal_explicit_formula_on_cuda(grid):
    """FlexAttention with table[index[q, k], h]: the output and the gradients of q, k, v and the table equal
    the explicit formula's, in fp32 and (within bf16 rounding) in bf16; the ViT-B/16 grid and a rectangular one."""
    from fd_ref.method.position import RelativePositionBias, bias_score_mod, gather_bias
    from fd_ref.models.attention import flex_attention

    torch.manual_seed(0)
    heads, dim = 4, 64
    rpb = RelativePositionBias(grid, heads).cuda()
    with torch.no_grad():
        rpb.table.normal_(std=1.0)
    n = grid[0] * grid[1] + 1
    inputs = [torch.randn(2, heads, n, dim, device="cuda") for _ in range(3)]
    weight = torch.randn(2, heads, n, dim, device="cuda")

    def run(flex: bool, dtype):
        q, k, v = (t.to(dtype).requires_grad_() for t in inputs)
        rpb.zero_grad(set_to_none=True)
        if flex:
            out = flex_attention(q, k, v, bias_score_mod((rpb.table, rpb.index)), scale=dim ** -0.5)
        else:
            logits = (q.float() @ k.float().transpose(-2, -1)) * dim ** -0.5 + gather_bias(rpb.table, rpb.index)
            out = (logits.softmax(-1).to(dtype) @ v)
        (out.float() * weight).sum().backward()
        grads = {"q": q.grad.float(), "k": k.grad.float(), "v": v.grad.float(), "table": rpb.table.grad.float()}
        return {"out": out.detach().float(), **grads}

    e32, f32 = run(False, torch.float32), run(True, torch.float32)
    for name, ref in e32.items():
        assert ref.abs().max() > 0, name
        torch.testing.assert_close(f32[name], ref, rtol=0, atol=1e-4 * float(ref.abs().max()))
    _assert_close_to(e32, run(True, torch.bfloat16), run(False, torch.bfloat16))


# -- bf16 autocast FD step ------------------------------------------------------------------------------------
def _fd_model(bf16_teacher: bool, drop_path: float = 0.0) -> FeatureDistillation:
    torch.manual_seed(0)
    student = create_vit("vit_tiny", img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=4,
                         drop_path_rate=drop_path)
    teacher = build_teacher("vit_tiny", img_size=32, patch_size=8, depth=2)
    model = FeatureDistillation(student, teacher).cuda().train()
    if bf16_teacher:
        teacher.set_precision(torch.bfloat16)  # as train.py does
    return model


def test_bf16_autocast_fd_step_matches_fp32():
    x = torch.randn(8, 3, 32, 32, device="cuda")
    results = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        model = _fd_model(bf16_teacher=dtype is not None)
        with torch.autocast("cuda", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = model(x)
        assert loss.dtype == torch.float32  # smooth-L1 reduced in fp32 under autocast too
        loss.backward()
        results[name] = loss.detach(), _grads(model)
    torch.testing.assert_close(results["bf16"][0], results["fp32"][0], rtol=2e-2, atol=0)
    for name, g in results["fp32"][1].items():
        err = float((results["bf16"][1][name] - g).abs().max())
        assert err <= 5e-2 * float(g.abs().max()) + 1e-6, (name, err)


# -- train.py on the GPU -----------------------------------------------------------------------------------
def test_fp16_run_uses_a_grad_scaler(tmp_path):
    train.main(TINY + ["--precision", "fp16", "--max-steps", "4", "--output", str(tmp_path)])
    log = _log(tmp_path)
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    ckpt = torch.load(tmp_path / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ckpt["scaler"] is not None and ckpt["scaler"]["scale"] > 0
    assert ckpt["config"]["precision"] == "fp16"


def test_compiled_step_equals_eager_on_cuda():
    """The model and batch of TINY below (drop path 0.1, batch 16, in bf16 the teacher set to bf16 as train.py
    does), so that test_compiled_train_run_on_cuda can reuse the bf16 graph instead of compiling again."""
    import torch._inductor.config as inductor_config
    x = torch.randn(16, 3, 32, 32, device="cuda")
    results = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(inductor_config, "fallback_random", True)  # the same drop-path masks as eager
        for compiled in (False, True):
            for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
                model = _fd_model(bf16_teacher=dtype is not None, drop_path=0.1)
                forward = torch.compile(model) if compiled else model
                torch.manual_seed(5)
                with torch.autocast("cuda", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                    loss = forward(x)
                loss.backward()
                results[compiled, name] = loss.detach(), _grads(model)
    (l_e, g_e), (l_c, g_c) = results[False, "fp32"], results[True, "fp32"]
    torch.testing.assert_close(l_c, l_e, rtol=1e-5, atol=0)
    for name, g in g_e.items():
        torch.testing.assert_close(g_c[name], g, rtol=0, atol=1e-4 * float(g.abs().max()) + 1e-7)
    _assert_close_to(g_e, results[True, "bf16"][1], results[False, "bf16"][1])


def test_compiled_train_run_on_cuda(tmp_path):
    train.main(TINY + ["--precision", "bf16", "--compile", "--max-steps", "3", "--output", str(tmp_path)])
    log = _log(tmp_path)
    assert [r["step"] for r in log] == [1, 2, 3] and all(r["loss"] > 0 for r in log)


def test_resume_on_cuda(tmp_path):
    """Stop after 3 of 8 steps, rerun: the same log and weights as an uninterrupted run (to 1e-5: some CUDA
    backward kernels, e.g. the bias table's gather, sum with atomics in no fixed order)."""
    full, parts = tmp_path / "full", tmp_path / "parts"
    train.main(TINY + ["--precision", "bf16", "--output", str(full)])
    train.main(TINY + ["--precision", "bf16", "--output", str(parts), "--max-steps", "3"])
    assert torch.load(parts / "checkpoint.pt", weights_only=True)["step"] == 3
    train.main(TINY + ["--precision", "bf16", "--output", str(parts)])
    a, b = _log(full), _log(parts)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 9))
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5) and rb["lr"] == ra["lr"]
    sa, sb = (torch.load(f / "student.pt", map_location="cpu", weights_only=True)["model"] for f in (full, parts))
    for k, v in sa.items():
        torch.testing.assert_close(sb[k], v, rtol=1e-4, atol=1e-5)


# -- one process, NCCL, under torchrun ------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["HF_HUB_OFFLINE"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), *args]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_train_py_under_torchrun_nccl(tmp_path):
    result = _torchrun(["train.py", *TINY, "--precision", "bf16", "--max-steps", "3", "--output", str(tmp_path)])
    assert "1 process(es)" in result.stdout
    assert [r["step"] for r in _log(tmp_path)] == [1, 2, 3]
    assert (tmp_path / "student.pt").is_file()


DDP_STEP = textwrap.dedent('''
    import json, sys, torch, torch.distributed as dist
    sys.path.insert(0, sys.argv[1])
    from fd_ref.engine.distributed import init_distributed
    from fd_ref.method.distill import FeatureDistillation
    from fd_ref.models.teachers import build_teacher
    from fd_ref.models.vit import create_vit
    info = init_distributed()
    assert dist.get_backend() == "nccl", dist.get_backend()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    def model():
        torch.manual_seed(0)
        s = create_vit("vit_tiny", img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=4)
        t = build_teacher("vit_tiny", img_size=32, patch_size=8, depth=2)
        return FeatureDistillation(s, t).to(info.device).train()
    x = torch.randn(8, 3, 32, 32, device=info.device)
    plain, wrapped = model(), model()
    ddp = torch.nn.parallel.DistributedDataParallel(wrapped, device_ids=[info.device.index],
                                                    broadcast_buffers=False)
    plain(x).backward()
    loss = ddp(x)
    loss.backward()
    diffs = [float((a.grad - b.grad).abs().max()) for a, b in zip(plain.parameters(), wrapped.parameters())
             if a.grad is not None]
    scales = [float(a.grad.abs().max()) for a in plain.parameters() if a.grad is not None]
    print(json.dumps(dict(world=dist.get_world_size(), loss=float(loss), max_diff=max(diffs),
                          max_grad=max(scales), n=len(diffs))))
    dist.destroy_process_group()
''')


def test_one_process_nccl_ddp_step_equals_plain_step(tmp_path):
    script = tmp_path / "ddp_step.py"
    script.write_text(DDP_STEP)
    result = _torchrun([str(script), str(ROOT)])
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["world"] == 1 and record["n"] > 10 and record["max_grad"] > 0
    assert record["max_diff"] <= 1e-5 * record["max_grad"] + 1e-7  # all-reduce of one rank's gradient
