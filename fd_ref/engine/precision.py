"""Which numeric precision a run uses: ``--precision auto | fp32 | bf16 | fp16``.

``auto`` picks bf16 autocast where the hardware runs bf16 matrix products natively and fp32 elsewhere:

- CUDA: bf16 (every GPU this project targets has bf16 tensor cores);
- CPU with native bf16 (AVX512-BF16 or AMX-BF16, as oneDNN reports it): bf16, several times faster than fp32
  there (measurements: bench/README.md);
- any other CPU: fp32, because there bf16 is emulated and far slower than fp32.

The question is put to torch (oneDNN's own bf16 check), not to the CPU's model name.
"""
from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_native_bf16() -> bool:
    """True when the CPU runs bf16 matrix products natively: AVX512-BF16 or AMX (cpuinfo's flags, through
    ``torch.cpu``). oneDNN's ``_is_mkldnn_bf16_supported`` answers another question (any AVX-512 CPU, where
    bf16 is emulated and slower than fp32)."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):  # a torch without these checks (or another architecture)
        return False


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` on CUDA or on a CPU with native bf16, else ``fp32``; other names pass through."""
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
    if name != "auto":
        return name
    if device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16()):
        return "bf16"
    return "fp32"


def autocast(precision: str, device: torch.device):
    """The forward's context: autocast to bf16 / fp16, nothing for fp32."""
    dtype = DTYPES[precision]
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
