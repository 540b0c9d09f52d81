"""FLOP counting and model-FLOPs-utilisation (MFU), as nanoGPT logs it.

    MFU = (FLOPs of one training step per image * images per second) / peak FLOP/s of the device

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on the real step (forward and
backward, teacher included), so the count holds for any teacher or student. The peak is a table entry
for known GPUs, or measured here with a large matmul in the training precision (a CPU has no table).
"""
from __future__ import annotations

import random
import time
import warnings
from typing import Any, Callable, ContextManager

import numpy as np

import torch
from torch.utils.flop_counter import FlopCounterMode

# Dense peak FLOP/s (no sparsity) of common accelerators, by name fragment and dtype.
_GPU_PEAK = {
    ("H100", torch.bfloat16): 989e12, ("H100", torch.float16): 989e12, ("H100", torch.float32): 67e12,
    ("H200", torch.bfloat16): 989e12, ("H200", torch.float16): 989e12, ("H200", torch.float32): 67e12,
    ("A100", torch.bfloat16): 312e12, ("A100", torch.float16): 312e12, ("A100", torch.float32): 19.5e12,
}


def count_flops(fn: Callable[[], object]) -> int:
    """Total FLOPs of everything ``fn`` runs (a multiply-add counts 2).

    The counter tracks modules through global forward hooks, about which a ``torch.compile``-d module warns
    (they fire once more for its wrapper): harmless for a count of operations, so that warning is silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Using `torch.compile\(module\)` when there are global hooks")
        with FlopCounterMode(display=False) as counter:
            fn()
    return counter.get_total_flops()


def measure_matmul_peak(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                        n: int = 1024, seconds: float = 0.5) -> float:
    """Achieved FLOP/s of an n x n x n matmul in ``dtype`` on ``device`` (the best of a few timings)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    a @ b
    sync()
    best, spent = 0.0, 0.0
    while spent < seconds:
        t0 = time.perf_counter()
        a @ b
        sync()
        dt = time.perf_counter() - t0
        spent += dt
        best = max(best, 2 * n ** 3 / dt)
    return best


def peak_flops(dtype: torch.dtype, device: torch.device) -> float:
    """Peak FLOP/s for MFU: a known GPU's datasheet figure, otherwise a measured matmul."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for (fragment, dt), value in _GPU_PEAK.items():
            if fragment in name and dt == dtype:
                return value
        return measure_matmul_peak(dtype, device, n=4096)
    # On a CPU without native bf16 a bf16 matmul is very slow; measure a small one so this stays quick.
    return measure_matmul_peak(dtype, device, n=512 if dtype != torch.float32 else 1024, seconds=0.3)


def measure_step(step_fn: Callable[[Any], torch.Tensor], batch: Any, module: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, autocast: Callable[[], ContextManager], dtype: torch.dtype,
                 device: torch.device) -> tuple[float, float]:
    """``(FLOPs per image of one micro-batch's forward + backward, the device's peak FLOP/s)``, leaving no
    trace: gradients are zeroed and the RNG and buffers (e.g. BatchNorm statistics) restored, so a resumed
    run stays exact. The count is 0 where it fails (e.g. under torch.compile): MFU is best effort."""
    def run():
        with autocast():
            loss = step_fn(batch)
        loss.backward()
    buffers = {k: v.clone() for k, v in module.state_dict().items()
               if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    devices = [device] if device.type == "cuda" else []
    host_rng = random.getstate(), np.random.get_state()  # e.g. timm's Mixup draws from NumPy
    with torch.random.fork_rng(devices=devices):
        try:
            images = batch[0] if isinstance(batch, (list, tuple)) else batch
            flops_per_image = count_flops(run) / len(images)
        except Exception:  # noqa: BLE001 - MFU is best effort (e.g. under torch.compile)
            flops_per_image = 0.0
        peak = peak_flops(dtype, device)  # on CPU a timed randn matmul: keep it in the fork
    random.setstate(host_rng[0])
    np.random.set_state(host_rng[1])
    if buffers:
        module.load_state_dict(buffers, strict=False)
    optimizer.zero_grad(set_to_none=True)
    return flops_per_image, peak
