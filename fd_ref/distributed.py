"""Thin wrappers over ``torch.distributed`` that also work in a single, non-distributed process.

Launch with ``torchrun --nproc_per_node=N script.py ...``: torchrun sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``, and :func:`init_distributed` joins the process group
(NCCL on GPUs, gloo on CPU). Without those variables everything runs as rank 0 of a world of size 1.

Collectives use a bounded timeout (``FD_DIST_TIMEOUT`` seconds, default 600) so that when one rank dies the
others fail with an error instead of hanging forever.
"""
from __future__ import annotations

import datetime
import os
import random
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fd_ref.errors import UserError

__all__ = ["DistInfo", "init_distributed", "is_main", "world_size", "rank", "barrier", "all_reduce_mean",
           "cleanup", "seed_everything", "DEFAULT_TIMEOUT_S"]

DEFAULT_TIMEOUT_S: float = 600.0
TIMEOUT_ENV: str = "FD_DIST_TIMEOUT"


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_main: bool


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def _env_int(key: str, default: int | None = None) -> int:
    text = os.environ.get(key)
    if text is None:
        if default is None:
            raise UserError(f"environment variable {key} is not set; launch with torchrun")
        return default
    try:
        return int(text)
    except ValueError:
        raise UserError(f"environment variable {key}={text!r} is not an integer; launch with torchrun") from None


def _resolve_timeout(timeout_s: float | None) -> float:
    """Explicit ``timeout_s`` > env ``FD_DIST_TIMEOUT`` > :data:`DEFAULT_TIMEOUT_S`."""
    if timeout_s is None:
        text = os.environ.get(TIMEOUT_ENV)
        if text is None:
            return DEFAULT_TIMEOUT_S
        try:
            timeout_s = float(text)
        except ValueError:
            raise UserError(f"{TIMEOUT_ENV}={text!r} is not a number; set it to a timeout in seconds") from None
    if not timeout_s > 0:
        raise UserError(f"distributed timeout must be > 0 seconds, got {timeout_s}; "
                        f"set {TIMEOUT_ENV} to a positive number")
    return float(timeout_s)


def _info_from_group() -> DistInfo:
    r, ws = dist.get_rank(), dist.get_world_size()
    local_rank = _env_int("LOCAL_RANK", r)
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    return DistInfo(rank=r, world_size=ws, local_rank=local_rank, device=device, is_main=r == 0)


def init_distributed(timeout_s: float | None = None, backend: str | None = None) -> DistInfo:
    """Join the process group if launched by torchrun (``RANK`` and ``WORLD_SIZE`` set), else run single-process.

    ``backend`` defaults to ``"nccl"`` when CUDA is available and ``"gloo"`` otherwise; with NCCL the process
    uses ``cuda:LOCAL_RANK``, with gloo the CPU. ``timeout_s`` defaults to env ``FD_DIST_TIMEOUT`` or 600 s.
    Calling it again once the group exists just returns the current :class:`DistInfo`.
    """
    if _active():
        return _info_from_group()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        if torch.cuda.is_available():
            torch.cuda.set_device(0)
            device = torch.device("cuda", 0)
        else:
            device = torch.device("cpu")
        return DistInfo(rank=0, world_size=1, local_rank=0, device=device, is_main=True)

    if not dist.is_available():
        raise UserError("RANK/WORLD_SIZE are set but this PyTorch build has no torch.distributed; "
                        "run without torchrun or install a PyTorch with distributed support")
    r, ws = _env_int("RANK"), _env_int("WORLD_SIZE")
    local_rank = _env_int("LOCAL_RANK", r)
    if not 0 <= r < ws:
        raise UserError(f"RANK={r} is not in [0, WORLD_SIZE={ws}); launch with torchrun")
    timeout = datetime.timedelta(seconds=_resolve_timeout(timeout_s))
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"

    if backend == "nccl":
        if not torch.cuda.is_available():
            raise UserError("backend 'nccl' needs CUDA but no GPU is visible; use gloo or run on GPUs")
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPU(s) are visible; "
                            "use --nproc_per_node <= the number of GPUs")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        dist.init_process_group(backend="nccl", rank=r, world_size=ws, timeout=timeout, device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group(backend=backend, rank=r, world_size=ws, timeout=timeout)
    return DistInfo(rank=r, world_size=ws, local_rank=local_rank, device=device, is_main=r == 0)


def rank() -> int:
    """Global rank of this process (0 when not distributed)."""
    return dist.get_rank() if _active() else 0


def world_size() -> int:
    """Number of processes (1 when not distributed)."""
    return dist.get_world_size() if _active() else 1


def is_main() -> bool:
    """True on rank 0 only; use it to guard logging, checkpoint writing and progress bars."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if _active():
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over ranks, ``sum_r tensor_r / world_size``, as a new detached tensor on ``tensor.device``.

    The input is not modified. Integer tensors are averaged in float64. Under NCCL a CPU tensor is moved to
    the current GPU for the reduction and back.
    """
    result = tensor.detach().clone()
    if not result.is_floating_point() and not result.is_complex():
        result = result.to(torch.float64)
    if not _active() or dist.get_world_size() == 1:
        return result
    comm = result
    if dist.get_backend() == "nccl" and not result.is_cuda:
        comm = result.to(torch.device("cuda", torch.cuda.current_device()))
    dist.all_reduce(comm, op=dist.ReduceOp.SUM)
    comm /= dist.get_world_size()
    return comm.to(tensor.device)


def cleanup() -> None:
    """Leave the process group, if any (call at the end of a run, also after errors)."""
    if _active():
        dist.destroy_process_group()


def seed_everything(seed: int, rank: int = 0) -> int:
    """Seed ``random``, NumPy (if installed) and torch (CPU and all GPUs) with ``seed + rank``; return it.

    Adding the rank gives each process its own random stream (different augmentations / masks per GPU)
    while keeping a run reproducible.
    """
    if seed < 0 or rank < 0:
        raise UserError(f"seed and rank must be >= 0, got seed={seed}, rank={rank}; pass a non-negative seed")
    value = seed + rank
    random.seed(value)
    try:
        import numpy as np
    except ImportError:  # numpy is optional for torch
        pass
    else:
        np.random.seed(value % 2**32)
    torch.manual_seed(value)
    return value
