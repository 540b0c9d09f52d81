"""bench/throughput.py's measurement helpers: peak memory (CPU and CUDA), the matmul rate and the peaks
the MFU and %-of-peak columns are taken against, the CPU's flags."""
from __future__ import annotations

import ctypes
import os
import statistics
import sys
import time
from typing import Callable, Optional

import torch


# -- memory ---------------------------------------------------------------------------------------------
class CpuPeakMemory:
    """Peak resident memory of one step above the resident memory at its start (Linux only).

    Freed heap memory is handed back (malloc_trim) and the kernel's high-water mark reset
    (``5 > /proc/self/clear_refs``) before the step; VmHWM after the step is its peak.
    """

    def __init__(self) -> None:
        try:
            self.libc = ctypes.CDLL("libc.so.6")
        except OSError:
            self.libc = None
        self.ok = self._reset()

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise KeyError(key)

    def _reset(self) -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def map_large_blocks(self, threshold: int = 1 << 20) -> None:
        """Serve every allocation from ``threshold`` bytes up with its own mmap, returned on free (glibc
        mallopt M_MMAP_THRESHOLD, which also stops glibc from adapting it): resident memory then follows the
        live tensors instead of the heap's history, so two configurations compare. Slower (page faults on
        every large allocation): only for the untimed memory steps."""
        if self.libc is not None:
            self.libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD

    def start(self) -> None:
        if self.libc is not None:
            self.libc.malloc_trim(0)
        if self.ok:
            self._reset()
            self.rss0 = self._status("VmRSS")

    def peak(self) -> Optional[int]:
        if not self.ok:
            return None
        return self._status("VmHWM") - self.rss0


class CudaPeakMemory:
    def __init__(self, device: torch.device) -> None:
        self.device = device

    def start(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.base = torch.cuda.memory_allocated(self.device)

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device) - self.base


def tensor_peak_bytes(fn: Callable[[], object]) -> Optional[int]:
    """Run ``fn`` once and return the peak of CPU tensor memory it allocated above its start, exactly: the
    running sum of the allocation / free events torch.profiler records with ``profile_memory=True``."""
    from torch.profiler import ProfilerActivity, profile
    sys.stderr.flush()
    saved = os.dup(2)
    try:  # the profiler's C++ side logs start/stop lines on stderr
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                fn()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    try:
        events = [e for e in prof.profiler.kineto_results.events()
                  if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")]
    except AttributeError:  # private API of torch.profiler: give up quietly if it moves
        return None
    current = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        current += e.nbytes()
        peak = max(peak, current)
    return peak


def process_peak_rss() -> int:
    """Process-wide resident high-water mark since start (ru_maxrss, KiB on Linux)."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# -- matmul peak ----------------------------------------------------------------------------------------
def matmul_rate(dtype: torch.dtype, device: torch.device, n: int, reps: int) -> float:
    """FLOP/s of an n x n x n matmul: the better of ``a @ b`` and ``a @ b.T`` (F.linear's layout), each
    the median of ``reps`` timed calls after one untimed call. (On a CPU without native bf16 the two take
    different kernels: ``a @ b.T`` measured ~5x faster than ``a @ b`` in bf16 on the AVX2 EPYC.)"""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    best = 0.0
    for fn in (lambda: a @ b, lambda: a @ b.T):
        fn()
        sync()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        best = max(best, 2 * n ** 3 / statistics.median(times))
    return best


# -- one configuration ----------------------------------------------------------------------------------


def cpu_flags() -> list[str]:
    """The CPU's matrix-relevant flags as lscpu shows them (Linux /proc/cpuinfo): which kernels oneDNN can use."""
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "amx_int8")
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [w for w in wanted if w in have]
    except OSError:
        pass
    return []


def default_peak_n(dtype: torch.dtype, cuda: bool) -> int:
    if cuda:
        return 4096
    if dtype == torch.float32:
        return 2048
    from fd_ref.engine.precision import cpu_has_native_bf16
    return 2048 if cpu_has_native_bf16() else 256  # emulated bf16 is slow: a smaller matmul keeps it quick


def datasheet_peak(dtype: torch.dtype, device: torch.device) -> Optional[float]:
    """A known GPU's dense datasheet FLOP/s in ``dtype`` (fd_ref.engine.flops' table), else None."""
    if device.type != "cuda":
        return None
    from fd_ref.engine.flops import GPU_PEAK
    name = torch.cuda.get_device_name(device)
    return next((v for (fragment, dt), v in GPU_PEAK.items() if fragment in name and dt == dtype), None)
