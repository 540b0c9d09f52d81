"""bench/soak.py at toy size (issue #25): two trials (one process, then two torchrun ranks), each with
faults drawn from the seed, checked against an uninterrupted run, and the broken-image corpus through
train.py and finetune.py; then the checks themselves, each shown to catch what a fault could break. The
full soak (100 trials) is a benchmark (README: Reliability), not a test."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from soak import check_run  # noqa: E402

import robustness_helpers as rb  # noqa: E402
from robustness_helpers import close_launcher_per_module  # noqa: E402,F401 - autouse: one launcher per module


@pytest.fixture(scope="module")
def soak(tmp_path_factory) -> tuple[Path, dict, str]:
    work = tmp_path_factory.mktemp("soak")
    r = subprocess.run([sys.executable, "bench/soak.py", "--trials", "2", "--seed", "7", "--epochs", "1", "--out",
                        str(work)], cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return work, json.loads(r.stdout.strip().splitlines()[-1]), r.stdout


def test_a_two_trial_soak_survives_bit_exact_and_no_bad_file_crashes_a_run(soak) -> None:
    work, summary, text = soak
    assert (summary["trials"], summary["survived"], summary["bit_exact"]) == (2, 2, 2), text
    assert summary["faults"] >= 2 and sum(k["trials"] for k in summary["per_kind"].values()) == 2
    assert summary["bad_files_tried"] == 17 and summary["bad_files_crashed"] == 0
    assert summary["corpus"]["problems"] == {"train.py": "", "finetune.py": ""}, summary["corpus"]
    assert "fault kind   trials survived bit-exact" in text
    trials = [json.loads(line) for line in (work / "trials.jsonl").read_text().splitlines()]
    assert [t["ranks"] for t in trials] == [1, 2]
    assert not (work / "trials").exists() or not os.listdir(work / "trials")  # survivors' folders removed


def test_the_soak_continues_where_it_stopped(soak) -> None:
    work, summary, _ = soak
    r = subprocess.run([sys.executable, "bench/soak.py", "--trials", "2", "--seed", "7", "--epochs", "1", "--out",
                        str(work), "--no-corpus"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "trial 0:" not in r.stdout  # both trials read back from trials.jsonl, none rerun
    again = json.loads(r.stdout.strip().splitlines()[-1])
    assert {k: again[k] for k in ("trials", "survived", "bit_exact", "per_kind")} == {
        k: summary[k] for k in ("trials", "survived", "bit_exact", "per_kind")}


def test_the_checks_catch_what_a_fault_could_break(soak, tmp_path: Path) -> None:
    work, _, _ = soak
    ref = work / "reference_1rank_1ep"
    steps = 4

    def copy() -> Path:
        out = tmp_path / f"run{len(os.listdir(tmp_path))}"
        shutil.copytree(ref, out)
        return out

    assert check_run(copy(), ref, steps) == ([], True)
    out = copy()
    (out / ".checkpoint.pt.x1.tmp").write_bytes(b"half")
    assert "files ['.checkpoint.pt.x1.tmp'] missing or left over" in check_run(out, ref, steps)[0]
    out = copy()
    lines = (out / "log.jsonl").read_text().splitlines()
    (out / "log.jsonl").write_text("\n".join(lines[:2] + lines[1:]) + "\n")  # step 2 logged twice
    assert "not 1..4 once each" in check_run(out, ref, steps)[0][0]
    out = copy()
    blob = bytearray((out / "student.pt").read_bytes())
    blob[-200] ^= 1
    (out / "student.pt").write_bytes(bytes(blob))
    assert check_run(out, ref, steps) == ([], False)  # survived, but not bit-exact
    out = copy()
    record = json.loads(lines[2])
    record["loss"] = float.fromhex(record["loss"].hex()) + 1e-7
    (out / "log.jsonl").write_text("\n".join(lines[:2] + [json.dumps(record)] + lines[3:]) + "\n")
    assert check_run(out, ref, steps) == ([], False)
    out = copy()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], "
                               "os.O_RDWR); fcntl.lockf(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
                               str(out / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert check_run(out, ref, steps)[0] == ["the run lock is still held"]
    finally:
        holder.kill()
        holder.wait()


# --------------------------------------------------------------------------------------------------------
# Faults the soak found
# --------------------------------------------------------------------------------------------------------

def test_a_stop_between_the_last_checkpoint_and_the_export_is_not_a_finished_run(tmp_path: Path) -> None:
    """Found by the 100-trial soak (2 of 100 trials, SIGKILL of rank 1 during a save at the last step): the
    last step's checkpoint was on disk, student.pt was the one exported at the previous epoch end, and the
    rerun said "already finished": the run delivered the weights of step 4 as its result. Now the final
    checkpoint is written after the export and says so (``finished``); a run stopped before that resumes
    at the last step, exports, and then (only then) counts as finished."""
    command = [*rb.TRAIN, "--epochs", "2", "--save-every", "1"]  # 8 steps; student.pt exported at 4 and 8
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert rb.run(tmp_path, "train.py", *command, "--output", ref).rc == 0
    # exits right after step 8 and its checkpoint, before the epoch end's export (fault hook)
    r = rb.run(tmp_path, "train.py", *command, "--output", out, env={"FD_TEST_DIE_AT_STEP": "8"})
    assert r.rc == 1 and rb.load_checkpoint(out / "checkpoint.pt")["step"] == 8
    assert not rb.load_checkpoint(out / "checkpoint.pt").get("finished")
    assert (out / "student.pt").read_bytes() != (ref / "student.pt").read_bytes()  # step 4's
    r = rb.run(tmp_path, "train.py", *command, "--output", out)
    assert r.rc == 0 and f"resumed from {out / 'checkpoint.pt'} at step 8" in r.out, r.out + r.err[-2000:]
    assert (out / "student.pt").read_bytes() == (ref / "student.pt").read_bytes()
    assert rb.log_steps(out) == list(range(1, 9))
    assert rb.load_checkpoint(out / "checkpoint.pt")["finished"]
    r = rb.run(tmp_path, "train.py", *command, "--output", out)
    assert r.rc == 0 and "already finished (step 8 of 8" in r.out


def test_a_truncated_shard_attempt_is_refused_and_the_shard_restored(tmp_path: Path) -> None:
    """The soak's ``truncate_shard`` fault: the attempt on the cut shard stops at start with one line (the
    soak notes "refused"), and the shard is whole again for the next attempt; an attempt that did not
    refuse (here: a "cut" at the shard's full length, which leaves it whole) is noted as such."""
    import random

    from soak import run_args
    from soak_runs import draw, run_attempt

    from fd_ref.data.make_shards import make_shards
    shards = tmp_path / "shards"
    make_shards("synthetic", shards, 8, synthetic_size=32, img_size=32, seed=0)
    files = tuple(sorted(shards.glob("train-*.tar")))
    before = {f: f.read_bytes() for f in files}
    plan = draw("truncate_shard", random.Random(0), 1, 4, 10.0, 1000, files)
    out = tmp_path / "run"
    attempt = run_attempt(run_args(1, 1, out, shards), out, 1, plan, tmp_path / "logs")
    assert attempt.note == "refused" and attempt.rc == 2, attempt
    assert {f: f.read_bytes() for f in files} == before
    plan.cut = len(before[Path(plan.shard)])
    attempt = run_attempt(run_args(1, 1, out, shards) + ["--max-steps", "1"], out, 1, plan, tmp_path / "logs")
    assert attempt.note.startswith("NOT refused") and attempt.rc == 0, attempt
