"""Runs of train.py that stop part-way, as real processes (issue #8): a loss that turns nan (stop with the last
good checkpoint, or skip under --nan-policy skip), SIGTERM (save, exit 143, the same command resumes), a SIGTERM
to the whole process group (DataLoader workers included), SIGKILL after a step and inside a checkpoint
write (checkpoint.pt always loads), and a torchrun rank that dies (the whole job ends, with one line). The
runs are forked from tests/robustness_helpers.py's launcher unless a test asks for a real interpreter.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from robustness_helpers import (
    BASE_ENV,
    FAULT_ENTRY,
    ROOT,
    TRAIN,
    close_launcher_per_module,  # noqa: F401 - the autouse fixture: one launcher per module, closed at its end
    assert_user_error,
    free_port,
    load_checkpoint,
    log_steps,
    run,
    start,
    temporaries,
    wait_for,
)


# --------------------------------------------------------------------------------------------------------
# Numerics
# --------------------------------------------------------------------------------------------------------

# lr 1e30 without warm-up: the first step leaves weights ~1e28, so step 2's attention logits overflow
BLOW_UP = ["--lr", "1e30", "--warmup-epochs", "0", "--save-every", "1"]


def test_nan_loss_stops_with_the_last_good_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = run(tmp_path, "train.py", *TRAIN, *BLOW_UP, "--output", out)
    assert_user_error(r, "loss became nan", "at step 2", f"last good checkpoint: {out / 'checkpoint.pt'} (step 1)",
                      "lower --lr")
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 1
    assert log_steps(out) == [1]
    assert not temporaries(tmp_path)


def test_nan_policy_skip(tmp_path: Path) -> None:
    # two bad steps (fault injection): skipped, counted, training finishes
    out = tmp_path / "skip"
    r = run(tmp_path, "train.py", *TRAIN, "--epochs", "2", "--nan-policy", "skip", "--save-every", "1",
            "--output", out, env={"FD_TEST_NAN_AT_STEPS": "2,3"})
    assert r.rc == 0, r.err[-3000:]
    assert "step skipped (1 so far)" in r.out and "step skipped (2 so far)" in r.out
    assert "note: 2 step(s) skipped for a non-finite loss" in r.out
    assert log_steps(out) == [1, 2, 3, 4, 5, 6]  # 8 batches, 2 of them dropped; no line for a skipped step
    assert json.loads((out / "log.jsonl").read_text().splitlines()[-1])["skipped_steps"] == 2
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 6

    # weights that stay broken (lr 1e30): stop after 20 skips in a row
    out = tmp_path / "give_up"
    r = run(tmp_path, "train.py", *TRAIN, *BLOW_UP, "--epochs", "6", "--nan-policy", "skip", "--output", out)
    assert r.rc == 2 and "Traceback" not in r.err, r.err[-3000:]
    assert "step skipped (20 so far)" in r.out and "(21 so far)" not in r.out
    assert_user_error(r, "not finite for 21 steps in a row", "(step 1)", "lower --lr")
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 1


# --------------------------------------------------------------------------------------------------------
# Interruption
# --------------------------------------------------------------------------------------------------------

def test_sigterm_saves_and_the_same_command_resumes(tmp_path: Path) -> None:
    out = tmp_path / "out"
    command = [*TRAIN, "--epochs", "4", "--save-every", "1", "--output", out]  # 16 steps
    proc = start(tmp_path, "train.py", *command)
    wait_for(lambda: len(log_steps(out)) >= 3, proc, what="three steps")
    proc.signal(signal.SIGTERM)
    assert proc.wait(60) == 143
    r = proc.result()
    assert "Traceback" not in r.err, r.err
    saved = load_checkpoint(out / "checkpoint.pt")["step"]
    assert 3 <= saved < 16
    assert f"received SIGTERM: saved {out / 'checkpoint.pt'} at step {saved}" in r.out
    assert not temporaries(out)

    r = run(tmp_path, "train.py", *command)
    assert r.rc == 0, r.err[-3000:]
    assert f"resumed from {out / 'checkpoint.pt'} at step {saved}" in r.out
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 16
    assert log_steps(out) == list(range(1, 17))  # each step logged once across the two runs


def _children(pid: int) -> list[int]:
    """The child processes of ``pid``: Linux's /proc/PID/task/*/children where the kernel has it, else pgrep -P."""
    try:
        return [int(k) for task in Path(f"/proc/{pid}/task").iterdir()
                for k in (task / "children").read_text().split()]
    except OSError:
        found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
        return [int(k) for k in found.stdout.split()]


def _alive(pid: int) -> bool:
    """``pid`` exists and is not a zombie (ps's state, which every POSIX system reports)."""
    state = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()
    return bool(state) and not state.startswith("Z")


def test_a_shielded_worker_obeys_only_its_parent() -> None:
    """``shield_loader_worker`` in a fresh child (default signal dispositions, as under the spawn and
    forkserver start methods, Python 3.14's default, where no handler is inherited): SIGUSR1 and SIGTERM
    from another process leave it running; SIGTERM from its parent ends it with status 0."""
    from fd_ref.data.sampler import shield_loader_worker
    ping_r, ping_w = os.pipe()
    pong_r, pong_w = os.pipe()
    child = os.fork()
    if child == 0:  # the worker: shielded, then answers every ping until its input closes
        try:
            os.close(ping_w)
            os.close(pong_r)
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                signal.signal(sig, signal.SIG_DFL)
            shield_loader_worker(0)
            os.write(pong_w, b"r")  # ready
            while os.read(ping_r, 1):
                # answer once the shield has taken any SIGTERM: a second SIGTERM sent while one is still
                # pending would merge into it (standard signals do not queue) and keep its sender
                deadline = time.monotonic() + 60
                while signal.SIGTERM in signal.sigpending() and time.monotonic() < deadline:
                    time.sleep(0.001)
                os.write(pong_w, b"s" if signal.SIGTERM in signal.sigpending() else b"p")
        finally:
            os._exit(3)  # only if its input closes: the shield let it run
    os.close(ping_r)
    os.close(pong_w)
    try:
        assert os.read(pong_r, 1) == b"r"
        for name in ("USR1", "TERM"):
            subprocess.run(["kill", f"-{name}", str(child)], check=True)  # sent by the kill process, now pending
            # a signal that ends the worker ends it in its blocking read: it would never answer (EOF)
            os.write(ping_w, b"?")
            assert os.read(pong_r, 1) == b"p", f"SIG{name} from another process ended the worker"
        os.kill(child, signal.SIGTERM)  # from the parent (the other process's SIGTERM is taken: see above)
        deadline = time.monotonic() + 60  # a guard against a hang only: the exit itself is waited for
        while (status := os.waitpid(child, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert status[0] == child and os.waitstatus_to_exitcode(status[1]) == 0, status
    finally:
        for fd in (ping_w, pong_r):
            os.close(fd)
        try:
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def test_a_sigterm_to_the_whole_process_group_still_saves_and_resumes(tmp_path: Path) -> None:
    """A scheduler that signals the process group reaches the DataLoader workers too. Here every worker gets
    the signal first and the main process 12 steps later (the worst order: an unshielded worker dies before
    the main process hears anything): the run must still finish its step, save and exit 143, and resume."""
    out = tmp_path / "out"
    command = [*TRAIN, "--epochs", "25", "--save-every", "1", "--output", out]  # 100 steps
    command[command.index("--num-workers") + 1] = "2"
    proc = start(tmp_path, "train.py", *command, real=True)  # a real interpreter: its own exit path
    wait_for(lambda: len(log_steps(out)) >= 3, proc, what="three steps")
    workers = _children(proc.pid)
    assert len(workers) == 2, workers
    for pid in workers:
        os.kill(pid, signal.SIGTERM)
    # An unshielded worker dies at once and the main process fails when it next needs that worker's batches:
    # give it 12 more steps (the four batches already fetched and then some) before signalling it too.
    seen = len(log_steps(out))
    deadline = time.monotonic() + 20
    while proc.poll() is None and len(log_steps(out)) < seen + 12 and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.signal(signal.SIGTERM)
    assert proc.wait(60) == 143
    r = proc.result()
    assert "Traceback" not in r.err and "killed by signal" not in r.err, r.err[-3000:]
    saved = load_checkpoint(out / "checkpoint.pt")["step"]
    assert f"received SIGTERM: saved {out / 'checkpoint.pt'} at step {saved}" in r.out
    assert not any(_alive(pid) for pid in workers)  # the workers ended with the main process
    r = run(tmp_path, "train.py", *command)
    assert r.rc == 0, r.err[-3000:]
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 100
    assert log_steps(out) == list(range(1, 101))


def test_sigkill_after_a_step_and_inside_a_checkpoint_write_never_breaks_the_checkpoint(tmp_path: Path) -> None:
    """SIGKILL-like ends at two named points (no handler can run): an abrupt exit right after step 3 (its
    checkpoint complete), then a SIGKILL inside step 6's checkpoint write (bytes written, not yet renamed).
    checkpoint.pt always loads and holds the last complete step; the rerun resumes from it and removes the
    half-written temporary."""
    out = tmp_path / "out"
    command = [*TRAIN, "--epochs", "5", "--save-every", "1", "--output", out]  # 20 steps
    r = run(tmp_path, "train.py", *command, env={"FD_TEST_DIE_AT_STEP": "3"})
    assert r.rc == 1 and "exits abruptly after step 3" in r.err, r.err[-3000:]
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 3 and not temporaries(out)

    r = run(tmp_path, "train.py", *command, env={"FD_TEST_DIE_IN_WRITE_AFTER_STEP": "5"})
    assert r.rc == -signal.SIGKILL and "killed inside the first file write after step 5" in r.err, r.err[-3000:]
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 5
    assert len(temporaries(out)) == 1  # step 6's, never renamed

    r = run(tmp_path, "train.py", *command)
    assert r.rc == 0, r.err[-3000:]
    assert f"resumed from {out / 'checkpoint.pt'} at step 5" in r.out
    assert not temporaries(out)
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 20
    assert log_steps(out) == list(range(1, 21))


# --------------------------------------------------------------------------------------------------------
# Distributed
# --------------------------------------------------------------------------------------------------------

def test_a_dying_rank_ends_the_whole_job_in_bounded_time(tmp_path: Path) -> None:
    """torchrun, 2 gloo ranks; rank 1 exits abruptly after step 1 (fault injection). Rank 0 fails at its
    next collective (connection reset, or FD_DIST_TIMEOUT at worst) and torchrun ends the job non-zero."""
    out = tmp_path / "out"
    env = {**os.environ, **BASE_ENV, "FD_TEST_DIE_AT_STEP": "1", "FD_TEST_DIE_RANK": "1", "FD_DIST_TIMEOUT": "20"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), FAULT_ENTRY, "train.py", *TRAIN, "--synthetic-size", "64", "--epochs", "3",
           "--save-every", "1", "--output", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=150)  # a hang fails
    assert proc.returncode != 0, proc.stdout
    # rank 0 ends on the peer's failure at its next collective, with the one line that says so
    assert "rank 0: rank 1 failed (" in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]
    assert "rank 1 exits abruptly after step 1" in proc.stderr
    assert "2 process(es)" in proc.stdout
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 1  # rank 0 saved step 1 before rank 1 died
    assert not temporaries(out)
