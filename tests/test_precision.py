"""--precision auto: bf16 on CUDA and on CPUs with native bf16, fp32 on other CPUs (fd_ref/engine/precision.py).

The capability check is stubbed both ways, so the rule is tested whatever CPU runs the suite."""
from __future__ import annotations

import pytest
import torch

from fd_ref.engine import precision
from fd_ref.engine.precision import resolve_precision


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


def test_capability_check_asks_onednn(monkeypatch):
    """The check is oneDNN's answer, and a torch without it means no native bf16 (a fresh copy of the
    module: the suite's conftest stubs the module's own check)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("unstubbed_precision", precision.__file__)
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)
    assert fresh.cpu_has_native_bf16() == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())

    class NoOneDNN:
        def __getattr__(self, name):
            raise AttributeError(name)
    monkeypatch.setattr(torch.ops, "mkldnn", NoOneDNN())
    assert fresh.cpu_has_native_bf16() is False
