"""Tests for fd_ref.engine.distributed: single-process mode, and two real gloo processes on localhost."""
from __future__ import annotations

import json
import os
import random
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from fd_ref.engine import distributed as fdd
from fd_ref.errors import UserError

_DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _set_env(rank: int, world: int, port: int) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})


def _worker(rank: int, world: int, ports: tuple[int, int], out_dir: str) -> None:
    """One rank: join via env (as torchrun would), exercise the helpers, write what it saw.

    Afterwards rank 0 alone tries to join a second world of 2 whose peer never comes: with a 2 s timeout it
    must fail quickly instead of hanging.
    """
    _set_env(rank, world, ports[0])
    info = fdd.init_distributed(timeout_s=30, backend="gloo")
    try:
        total = fdd.all_reduce_sum(torch.tensor([float(rank), 10.0 * (rank + 1)]))
        ints = fdd.all_reduce_ints([rank + 1, 2 * rank], op="min")
        fdd.barrier()
        result = {"info": [info.rank, info.world_size, info.local_rank, str(info.device), info.is_main],
                  "rank": torch.distributed.get_rank(), "world_size": torch.distributed.get_world_size(),
                  "is_main": info.is_main, "sum": total.tolist(), "ints": ints,
                  "again": fdd.init_distributed(backend="gloo").rank}
    finally:
        fdd.cleanup()
    result["after_cleanup"] = torch.distributed.is_initialized()
    if rank == 0:
        _set_env(0, 2, ports[1])
        start = time.monotonic()
        try:
            fdd.init_distributed(timeout_s=2, backend="gloo")
            result["lonely"] = "joined"
        except Exception as exc:  # noqa: BLE001 - any error is the expected outcome
            result["lonely"] = type(exc).__name__
        result["lonely_s"] = time.monotonic() - start
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


def _spawn(fn: Callable[..., None], nprocs: int, args: tuple, deadline_s: float) -> None:
    ctx = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    end = time.monotonic() + deadline_s
    while not ctx.join(timeout=1.0):
        if time.monotonic() > end:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail("distributed workers did not finish in time")


def test_two_gloo_processes_and_timeout(tmp_path: Path) -> None:
    _spawn(_worker, 2, (2, (_free_port(), _free_port()), str(tmp_path)), deadline_s=60)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r, res in enumerate(results):
        assert res["info"] == [r, 2, r, "cpu", r == 0]
        assert (res["rank"], res["world_size"], res["is_main"]) == (r, 2, r == 0)
        assert res["sum"] == [1.0, 30.0]
        assert res["ints"] == [1, 0]
        assert res["again"] == r
        assert res["after_cleanup"] is False
    assert results[0]["lonely"] != "joined" and results[0]["lonely_s"] < 20, results[0]
    assert sum(res["is_main"] for res in results) == 1


@pytest.fixture
def no_dist_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in (*_DIST_ENV, fdd.TIMEOUT_ENV):
        monkeypatch.delenv(key, raising=False)


def test_single_process_mode(no_dist_env: None) -> None:
    info = fdd.init_distributed()
    assert (info.rank, info.world_size, info.local_rank, info.is_main) == (0, 1, 0, True)
    assert info.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert not torch.distributed.is_initialized()
    fdd.barrier()  # no-ops without a process group
    fdd.cleanup()


def test_timeout_resolution(no_dist_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    assert fdd._resolve_timeout(None) == fdd.DEFAULT_TIMEOUT_S
    monkeypatch.setenv(fdd.TIMEOUT_ENV, "42")
    assert fdd._resolve_timeout(None) == 42.0
    assert fdd._resolve_timeout(7) == 7.0  # explicit argument wins
    monkeypatch.setenv(fdd.TIMEOUT_ENV, "soon")
    with pytest.raises(UserError):
        fdd._resolve_timeout(None)
    with pytest.raises(UserError):
        fdd._resolve_timeout(0)


def test_bad_env_is_user_error(no_dist_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "x")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError):
        fdd.init_distributed(backend="gloo")
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(UserError):
        fdd.init_distributed(backend="gloo")


def test_seed_everything() -> None:
    assert fdd.seed_everything(5, rank=2) == 7
    a = (random.random(), torch.rand(3))
    fdd.seed_everything(7)
    b = (random.random(), torch.rand(3))
    assert a[0] == b[0] and torch.equal(a[1], b[1])
    fdd.seed_everything(5, rank=3)
    assert not torch.equal(torch.rand(3), a[1])
    with pytest.raises(UserError):
        fdd.seed_everything(-1)
