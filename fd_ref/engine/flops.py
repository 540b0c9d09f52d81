"""FLOP counting and model-FLOPs-utilisation (MFU), as nanoGPT logs it.

    MFU = (FLOPs of one training step per image * images per second) / peak FLOP/s of the device

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` over one forward and backward of the
network the step runs (teacher included), on a copy of it on the meta device: parameters, buffers and
images are meta tensors of the same shapes, so the count holds for any teacher or student and costs no real
computation (no step is run for it). The peak is a table entry for known GPUs, or measured here with a
large matmul in the training precision (a CPU has no table).
"""
from __future__ import annotations

import time
import warnings
from copy import deepcopy
from typing import Callable, Optional

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

# Dense peak FLOP/s (no sparsity) of common accelerators, by name fragment and dtype.
GPU_PEAK = {
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
    """Achieved FLOP/s of an n x n x n matmul in ``dtype`` on ``device`` (the best of a few timings), on
    random matrices drawn from a generator of its own."""
    generator = torch.Generator(device).manual_seed(0)  # its own: the run's random streams stay untouched
    a = torch.randn(n, n, device=device, generator=generator).to(dtype)
    b = torch.randn(n, n, device=device, generator=generator).to(dtype)
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
        for (fragment, dt), value in GPU_PEAK.items():
            if fragment in name and dt == dtype:
                return value
        return measure_matmul_peak(dtype, device, n=4096)
    # On a CPU without native bf16 a bf16 matmul is very slow; measure a small one so this stays quick.
    return measure_matmul_peak(dtype, device, n=512 if dtype != torch.float32 else 1024, seconds=0.3)


def step_flops_per_image(network: Optional[torch.nn.Module], images: torch.Tensor) -> float:
    """FLOPs per image of one training step's forward and backward through ``network`` (a loss, or outputs
    whose sum stands in for one) on a batch shaped like ``images``, counted on a copy of the network on the
    meta device (module docstring): the network itself is neither run nor changed. 0 where there is no
    network or the count fails (MFU is best effort)."""
    if network is None or len(images) == 0:
        return 0.0

    def on_meta(t: torch.Tensor) -> torch.Tensor:  # float32 throughout: the count does not depend on dtypes
        return torch.empty(t.shape, dtype=torch.float32 if t.is_floating_point() else t.dtype, device="meta")

    # the copy shares the structure (shared and tied modules stay shared), its tensors are all on meta
    memo = {id(p): nn.Parameter(on_meta(p), requires_grad=p.requires_grad) for p in network.parameters()}
    memo.update({id(b): on_meta(b) for b in network.buffers()})
    try:
        copy = deepcopy(network, memo)
        trained = [p for p in copy.parameters() if p.requires_grad]
        x = torch.empty(images.shape, device="meta")  # float: a loader's uint8 batch is normalised first

        def step() -> None:
            out = copy(x)
            if trained and out.requires_grad:
                torch.autograd.grad(out.float().sum(), trained, allow_unused=True)

        return count_flops(step) / len(images)
    except Exception:  # noqa: BLE001 - a network the meta device cannot run: no MFU, training goes on
        return 0.0
