"""Thin wrappers over ``torch.distributed`` that also work in a single, non-distributed process.

Launch with ``torchrun --nproc_per_node=N script.py ...``: torchrun sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``, and :func:`init_distributed` joins the process group
(NCCL on GPUs, gloo on CPU). Without those variables everything runs as rank 0 of a world of size 1.

Collectives use a bounded timeout (``FD_DIST_TIMEOUT`` seconds, default 600) so that when one rank dies the
others fail with an error instead of hanging forever. When a collective fails because a peer died or hung,
:func:`is_peer_failure` recognises the error and :func:`roll_call` names the ranks that no longer answer.
"""
from __future__ import annotations

import datetime
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from fd_ref.errors import UserError

__all__ = ["DistInfo", "init_distributed", "is_main", "world_size", "rank", "barrier", "all_reduce_mean",
           "cleanup", "seed_everything", "DEFAULT_TIMEOUT_S", "all_reduce_ints", "all_reduce_ints_start",
           "gather_to_main",
           "broadcast_from_main", "is_peer_failure", "roll_call", "ROLL_CALL_S"]

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


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if _active():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks of a float tensor, in place (moved to the communication device under NCCL and back)."""
    comm = tensor
    if dist.get_backend() == "nccl" and not tensor.is_cuda:
        comm = tensor.to(torch.device("cuda", torch.cuda.current_device()))
    dist.all_reduce(comm, op=dist.ReduceOp.SUM)
    return comm.to(tensor.device)


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_ints(values: list[int], op: str = "sum") -> list[int]:
    """``values`` reduced element-wise over ranks (``op``: "sum", "min" or "max"), the same list on every
    rank; one small collective. Unchanged when not distributed."""
    if not _active() or dist.get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.int64, device=_comm_device())
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
    return t.tolist()


def all_reduce_ints_start(values: list[int]) -> Callable[[], list[int]]:
    """Start summing ``values`` over ranks without waiting for it; the returned function waits (usually not
    at all, if called a step later) and gives the same list on every rank. For a check that may lag one
    step behind, at no cost: the collective runs while the next step computes."""
    if not _active() or dist.get_world_size() == 1:
        return lambda: list(values)
    t = torch.tensor(values, dtype=torch.int64, device=_comm_device())
    work = dist.all_reduce(t, op=dist.ReduceOp.SUM, async_op=True)

    def finish() -> list[int]:
        work.wait()
        return t.tolist()
    return finish


def gather_to_main(obj: Any) -> Optional[list[Any]]:
    """Every rank's (picklable) ``obj``, in rank order, on rank 0; ``None`` on the other ranks."""
    if not _active() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_from_main(obj: Any) -> Any:
    """Rank 0's (picklable) ``obj`` on every rank."""
    if not _active() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# -- peer failures ---------------------------------------------------------------------------------------
ROLL_CALL_S: float = 5.0  # how long survivors wait for each other's answer after a failed collective
_PEER_SIGNS = ("gloo", "nccl", "connection closed", "connection reset", "read error", "timed out", "timeout",
               "pair closure", "broken pipe", "processgroup", "socket")


def is_peer_failure(error: BaseException) -> bool:
    """Whether ``error`` (raised by a collective, directly or inside DDP's backward) means that another
    rank died, hung or lost its connection, rather than a failure of this rank's own computation."""
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(sign in text for sign in _PEER_SIGNS)


def roll_call(wait_s: float = ROLL_CALL_S) -> Optional[list[int]]:
    """After a failed collective: the ranks that do not answer within ``wait_s`` seconds (the failed ones),
    or ``None`` if that cannot be known. Leaves the process group (so ranks blocked on this one fail
    at once rather than at their timeout), then each survivor checks in through the rendezvous store.

    The store lives in rank 0 (plain ``env://``) or in torchrun's agent; if it cannot be reached and rank 0
    hosts it, rank 0 is the one that failed.
    """
    if not _active():
        return None
    me, ws = dist.get_rank(), dist.get_world_size()
    try:
        store = dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - a private helper: best effort
        store = None
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - the group is broken anyway
        pass
    if store is None:
        return None
    prefix = f"fd_ref/alive/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
    try:
        store.set_timeout(datetime.timedelta(seconds=max(wait_s, 1.0)))
        store.set(f"{prefix}{me}", "1")
        deadline = time.monotonic() + wait_s
        alive = {me}
        while len(alive) < ws and time.monotonic() < deadline:
            alive |= {r for r in range(ws) if r not in alive and store.check([f"{prefix}{r}"])}
            time.sleep(0.05)
    except Exception:  # noqa: BLE001 - the store itself is gone
        agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
        return None if agent_store or me == 0 else [0]
    return [r for r in range(ws) if r not in alive]


def cleanup() -> None:
    """Leave the process group, if any (call at the end of a run, also after errors: best effort, as a peer
    may already be gone)."""
    try:
        if _active():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - on the way out; nothing left to report to
        pass


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
