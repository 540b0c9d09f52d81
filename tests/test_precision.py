"""--precision auto: bf16 on CUDA and on CPUs with native bf16, fp32 on other CPUs (fd_ref/engine/precision.py).

The capability check is stubbed both ways, so the rule is tested whatever CPU runs the suite."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fd_ref.engine import precision
from fd_ref.engine.precision import resolve_precision

NATIVE_BF16 = precision.cpu_has_native_bf16  # the real check (conftest stubs it once the session starts)


@pytest.mark.parametrize("native,expected", [(True, "bf16"), (False, "fp32")])
def test_auto_on_cpu_follows_native_bf16(monkeypatch, native, expected):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    assert resolve_precision("auto", torch.device("cpu")) == expected


@pytest.mark.parametrize("native", [True, False])
def test_auto_on_cuda_is_bf16_and_explicit_names_pass_through(monkeypatch, native):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    assert resolve_precision("auto", torch.device("cuda")) == "bf16"
    for name in ("fp32", "bf16", "fp16"):
        assert resolve_precision(name, torch.device("cpu")) == name


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp8", torch.device("cpu"))


def _cpuinfo_flags() -> set[str] | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


def test_native_bf16_is_what_the_cpu_flags_say():
    """Native bf16 = the kernel's CPU flags list avx512_bf16 or amx_bf16 (an independent reading); an AVX-512
    CPU without them (avx512bw alone: bf16 emulated) is not native."""
    flags = _cpuinfo_flags()
    if flags is None or "fpu" not in flags:
        pytest.skip("no x86 /proc/cpuinfo to compare with")
    assert NATIVE_BF16() == bool({"avx512_bf16", "amx_bf16"} & flags)


def test_native_bf16_without_the_checks_is_false(monkeypatch):
    class Missing:
        def __getattr__(self, name):
            raise AttributeError(name)
    monkeypatch.setattr(torch, "cpu", Missing())
    assert NATIVE_BF16() is False
