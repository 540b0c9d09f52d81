"""Starting, watching and faulting one attempt of a train.py run for ``bench/soak.py``.

An attempt is ``python tests/run_with_faults.py train.py ARGS`` (one process) or the same under
``torchrun --nproc_per_node 2`` (gloo): the project's test entry, which installs the FD_TEST_* fault hooks
(tests/fault_injection.py) before running the script. Faults from outside (SIGKILL, SIGTERM, SIGUSR1 at a
moment) are sent by :func:`run_attempt` while it watches the run folder and the process tree; a full disk
is a file-size limit (RLIMIT_FSIZE: writes past it fail with EFBIG, as a full disk fails with ENOSPC).
"""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
FAULT_ENTRY = str(ROOT / "tests" / "run_with_faults.py")
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1",
       "PYTHONHASHSEED": "0", "FD_DIST_TIMEOUT": "5"}
STALL_S = 20.0     # no new step for this long while alive: the attempt is stuck (a hang); killed like a scheduler would
STARTUP_S = 120.0  # ... and before its first step (start-up on a busy machine takes a while)
ATTEMPT_S = 240.0  # hard limit of one attempt


@dataclass
class Plan:
    """One fault. ``kill``: "save" (SIGKILL while a checkpoint temporary exists, after step ``after``),
    "loader" (SIGKILL ``delay`` s after a DataLoader worker of the target appeared), "time" (``sig`` at
    ``delay`` s after the start), "worker" (SIGKILL of the target's DataLoader worker alone, after step
    ``after``); ``env``: FD_TEST_* hook variables; ``fsize``: a file-size limit; ``shard``: a shard file
    cut to ``cut`` bytes for the attempt (and restored after it)."""
    kind: str
    kill: str = ""
    sig: int = signal.SIGKILL
    delay: float = 0.0
    after: int = 0
    rank: int = 0
    env: dict = field(default_factory=dict)
    fsize: int = 0
    shard: str = ""
    cut: int = 0


@dataclass
class Attempt:
    kind: str
    rc: Optional[int]
    reached: int          # the last step logged when it ended
    saved: int            # the step of checkpoint.pt it left (0: none)
    moment: str = ""      # where an outside fault landed: save, loader, startup, step, after-exit
    seconds: float = 0.0
    checkpoint_ok: bool = True
    note: str = ""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def log_steps(out: Path) -> list[int]:
    steps = []
    try:
        text = (out / "log.jsonl").read_text()
    except FileNotFoundError:
        return steps
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line being written
        if "loss" in record:
            steps.append(record["step"])
    return steps


def saved_step(out: Path) -> tuple[int, bool]:
    """(step of out/checkpoint.pt or 0, whether it loads)."""
    path = out / "checkpoint.pt"
    if not path.exists():
        return 0, True
    from fd_ref.checkpoint.io import load_file
    from fd_ref.errors import UserError
    try:
        return int(load_file(path)["step"]), True
    except (UserError, KeyError):
        return 0, False


def _children(pid: int) -> list[int]:
    kids = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            kids += [int(k) for k in (task / "children").read_text().split()]
    except (FileNotFoundError, ProcessLookupError):
        pass
    return kids


def _rank_of(pid: int) -> Optional[int]:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    for item in env:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


def _target(proc: subprocess.Popen, ranks: int, rank: int) -> Optional[int]:
    """The pid the fault goes to: the process itself, or rank ``rank`` under torchrun."""
    if ranks == 1:
        return proc.pid
    for kid in _children(proc.pid):
        if _rank_of(kid) == rank:
            return kid
    return None


def _in_save(out: Path) -> bool:
    return any(name.endswith(".tmp") and name.startswith((".checkpoint.pt.", ".student.pt.", ".best.pt."))
               for name in os.listdir(out)) if out.is_dir() else False


def command(args: list[str], ranks: int, script: str = "train.py") -> list[str]:
    if ranks == 1:
        return [sys.executable, FAULT_ENTRY, script, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master-addr",
            "127.0.0.1", "--master-port", str(free_port()), FAULT_ENTRY, script, *args]


def run_attempt(args: list[str], out: Path, ranks: int, plan: Optional[Plan], logs: Path,
                script: str = "train.py") -> Attempt:
    """Run one attempt of ``script`` to its end, applying ``plan`` (``None``: no fault)."""
    env = {**os.environ, **ENV, **(plan.env if plan else {})}
    fsize = plan.fsize if plan else 0

    def limit() -> None:
        if fsize:
            import resource
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    logs.mkdir(parents=True, exist_ok=True)
    n = len(list(logs.glob("*.out")))
    whole = Path(plan.shard).read_bytes() if plan is not None and plan.shard else b""
    before = max(log_steps(out), default=0)
    if whole:
        Path(plan.shard).write_bytes(whole[:plan.cut])
    try:
        attempt = _watch(command(args, ranks, script), out, ranks, plan, logs / str(n), env, limit)
    finally:
        if whole:
            Path(plan.shard).write_bytes(whole)
    if whole:  # the truncated shard must stop the attempt at start (one line from a single process)
        err = (logs / f"{n}.err").read_text()
        refused = attempt.reached == before and attempt.rc not in (0, None) and "truncated" in err and (
            ranks > 1 or (attempt.rc == 2 and err.count("\n") == 1))
        attempt.note = "refused" if refused else f"NOT refused: rc {attempt.rc}, {err[-300:]}"
    return attempt


def _watch(cmd: list[str], out: Path, ranks: int, plan: Optional[Plan], logs: Path, env: dict, limit) -> Attempt:
    t0 = time.monotonic()
    with open(f"{logs}.out", "w") as stdout, open(f"{logs}.err", "w") as stderr:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=stdout, stderr=stderr,
                                stdin=subprocess.DEVNULL, preexec_fn=limit, start_new_session=True)
    moment, fired, last_log, last_change, last_read = "", False, log_steps(out), None, 0.0
    worker_seen: Optional[float] = None
    while proc.poll() is None:
        now = time.monotonic()
        if now - last_read > 0.02:  # the log every 20 ms; a checkpoint write is looked for every 1 ms
            steps, last_read = log_steps(out), now
            if steps != last_log:  # a step logged (or the log trimmed to the checkpoint) by this attempt
                last_log, last_change = steps, now
        stuck = now - last_change > STALL_S if last_change is not None else now - t0 > STARTUP_S
        if stuck or now - t0 > ATTEMPT_S:
            moment = moment or "stalled"
            break
        target = _target(proc, ranks, plan.rank) if plan is not None and plan.kill and not fired else None
        if target is not None:
            reached = max(last_log, default=0)
            if plan.kill == "save" and reached >= plan.after and _in_save(out):
                fired, moment = _send(target, plan.sig), "save"
            elif plan.kill == "loader":
                if worker_seen is None and _children(target):
                    worker_seen, reached_then = now, last_change
                if worker_seen is not None and now - worker_seen >= plan.delay:
                    fired = _send(target, plan.sig)
                    moment = "loader" if last_change == reached_then else "step"
            elif plan.kill == "worker" and reached >= plan.after and _children(target):
                fired, moment = _send(_children(target)[-1], signal.SIGKILL), "worker"
            elif plan.kill == "time" and now - t0 >= plan.delay:
                in_save = _in_save(out)
                fired = _send(target, plan.sig)
                moment = "save" if in_save else ("startup" if last_change is None else "step")
        time.sleep(0.001)
    _end_group(proc)
    saved, ok = saved_step(out)
    return Attempt(kind=plan.kind if plan else "none", rc=proc.returncode, reached=max(log_steps(out), default=0),
                   saved=saved, moment=moment if (fired or moment == "stalled") else ("after-exit" if plan and plan.kill
                                                                                       else ""),
                   seconds=round(time.monotonic() - t0, 2), checkpoint_ok=ok)


def _send(pid: int, sig: int) -> bool:
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        kids = _children(todo.pop())
        found += kids
        todo += kids
    return found


def _end_group(proc: subprocess.Popen) -> None:
    """After the attempt: kill whatever is left of the job, as a scheduler ending it would: the process
    group and every descendant (torchrun starts each rank in a process group of its own; a hanging rank, or a
    rank whose torchrun launcher was killed, would otherwise live on and hold the run lock)."""
    for pid in [*_descendants(proc.pid), proc.pid]:
        _send(pid, signal.SIGKILL)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def draw(kind: str, rng: random.Random, ranks: int, total_steps: int, ref_seconds: float,
         ckpt_bytes: int, shards: tuple[Path, ...] = ()) -> Plan:
    """The fault of ``kind`` with its moment drawn from ``rng`` (``shards``: the run's shard files)."""
    rank = rng.randrange(ranks)
    step = rng.randint(1, total_steps - 1)
    die = {"FD_TEST_DIE_RANK": str(rank)}
    if kind == "kill_save":  # rank 0 writes; killing rank 1 then also lands during rank 0's write
        return Plan(kind, kill="save", after=rng.randint(0, total_steps - 1), rank=rank)
    if kind == "kill_loader":
        return Plan(kind, kill="loader", delay=rng.uniform(0.0, 0.05), rank=rank)
    if kind == "kill_random":
        return Plan(kind, kill="time", delay=rng.uniform(0.0, ref_seconds), rank=rank)
    if kind in ("sigterm", "sigusr1"):
        name = "SIGTERM" if kind == "sigterm" else "SIGUSR1"
        if rng.random() < 0.5:  # after a random step, from inside (the hook)
            return Plan(kind, env={"FD_TEST_SIGNAL_AT_STEP": f"{step}:{name}", **die}, rank=rank)
        return Plan(kind, kill="time", sig=getattr(signal, name), delay=rng.uniform(0.0, ref_seconds), rank=rank)
    if kind == "rank_dies":
        return Plan(kind, env={"FD_TEST_DIE_AT_STEP": str(step), **die}, rank=rank)
    if kind == "rank_hangs":
        return Plan(kind, env={"FD_TEST_HANG_AT_STEP": str(step), **die}, rank=rank)
    if kind == "disk_full":
        return Plan(kind, fsize=int(ckpt_bytes * rng.uniform(0.2, 0.95)))
    if kind == "kill_eval":  # finetune.py: in the k-th evaluation (one per epoch), at its start or its end
        at = f"{rng.randint(1, max(1, total_steps // 4))}:{rng.choice(['start', 'end'])}"
        return Plan(kind, env={"FD_TEST_KILL_IN_EVAL": at, **die}, rank=rank)
    if kind == "kill_worker":
        return Plan(kind, kill="worker", after=rng.randint(0, total_steps - 1), rank=rank)
    if kind == "truncate_shard":
        shard = rng.choice(shards)
        return Plan(kind, shard=str(shard), cut=rng.randrange(1, shard.stat().st_size))
    raise ValueError(kind)


KINDS = ("kill_save", "kill_loader", "kill_random", "sigterm", "sigusr1", "rank_dies", "rank_hangs", "disk_full")
# drawn only when asked for (--kinds, --shards), so that the figures of a seed drawn from KINDS stay as they were
WORKER_KINDS = ("kill_worker",)
FINETUNE_KINDS = ("kill_eval",)
SHARD_KINDS = ("truncate_shard",)
