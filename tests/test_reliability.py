"""Many ranks, one truth (issue #16): coordinated pre-emption, one-line peer failures, one run per output
folder, failed saves, resume safety, image skips summed over ranks, unknown model_config keys.

Multi-rank runs are two gloo ranks, each forked from tests/robustness_helpers.py's launcher with the RANK /
WORLD_SIZE / MASTER_ADDR / MASTER_PORT variables torchrun would set, so every rank has its own exit code,
stdout, stderr and signal handling. Every row of README's Reliability table added by issue #16 is a test
here.
"""
from __future__ import annotations

import errno
import json
import os
import signal
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import robustness_helpers as rb
from fd_ref.models.from_file import check_model_config
from fd_ref.checkpoint.io import save_atomic
from fd_ref.errors import UserError
from fd_ref.engine.resume import RUN_CONTROL_KEYS, config_differences, describe
from robustness_helpers import close_launcher_per_module  # noqa: F401 - the autouse fixture: one launcher per module

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def start_ranks(tmp: Path, *args, env: dict | None = None, rank_env: dict | None = None) -> list[rb.Proc]:
    """Two ranks of ``train.py args`` joined through a fresh port; ``rank_env[r]``: extra variables of rank r."""
    port = str(rb.free_port())
    procs = []
    for r in range(2):
        e = {"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
             "MASTER_PORT": port, **(env or {}), **((rank_env or {}).get(r, {}))}
        procs.append(rb.start(tmp, "train.py", *args, env=e))
    return procs


def wait_all(procs: list[rb.Proc], timeout: float = 90) -> list[rb.Result]:
    for p in procs:
        p.wait(timeout)
    return [p.result() for p in procs]


def losses(output: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (output / "log.jsonl").read_text().splitlines())
            if "loss" in r}


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file in ``folder`` with its content and modification time (ns)."""
    return {str(f.relative_to(folder)): (f.read_bytes(), f.stat().st_mtime_ns)
            for f in sorted(folder.rglob("*")) if f.is_file()}


def one_error_line(r: rb.Result, rc: int, *fragments: str) -> str:
    assert r.rc == rc, f"exit code {r.rc}\nstdout:\n{r.out[-2000:]}\nstderr:\n{r.err[-3000:]}"
    assert "Traceback" not in r.err, r.err
    lines = [line for line in r.err_lines if line.startswith("error:")]
    assert len(lines) == 1, r.err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# --------------------------------------------------------------------------------------------------------
# Pre-emption on every rank
# --------------------------------------------------------------------------------------------------------

# depth 2 with drop path: each rank's random stream matters, so an exact resume needs every rank's RNG state.
# 24 files (3 unreadable) = 3 steps of 2 ranks x 4 images per epoch; 12 epochs = 36 steps
TWO_RANKS = [*rb.TRAIN, "--depth", "2", "--drop-path", "0.2", "--batch-size", "4", "--epochs", "12",
             "--save-every", "5", "--lr", "0.05"]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images") / "mixed"
    rb._image_folder(root, n_good=24 - 7)
    return root


@pytest.fixture(scope="module")
def uninterrupted(images, tmp_path_factory) -> tuple[Path, list[rb.Result]]:
    tmp = tmp_path_factory.mktemp("uninterrupted")
    out = tmp / "out"
    results = wait_all(start_ranks(tmp, *TWO_RANKS, "--data", images, "--output", out))
    for r in results:
        assert r.rc == 0, r.err[-3000:]
    return out, results


def test_image_skips_are_summed_over_ranks(uninterrupted) -> None:
    """Every rank's skips count (before: only rank 0's share). Each rank names a bad file once, in a warning,
    and the closing note and log.jsonl count exactly those warnings, all ranks together; after epoch 0,
    where every file was read by one rank or the other, all 3 bad files are in the count."""
    out, results = uninterrupted
    shares = [sum(line.startswith("skipping unreadable image") for line in r.err_lines) for r in results]
    assert all(shares), shares  # both ranks met some, over 12 epochs
    note = [line for line in results[0].out.splitlines() if line.startswith("note:") and "unreadable" in line]
    assert note == [f"note: {sum(shares)} unreadable image(s) skipped over all ranks (named in the warnings "
                    f"above)"], results[0].out
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if "loss" in line]
    counts = [rec.get("skipped_images", 0) for rec in records]
    assert counts[-1] == sum(shares) and counts == sorted(counts)
    assert counts[2] >= 3  # step 3, the end of epoch 0


@pytest.mark.parametrize("case", ["sigterm_to_rank1", "signals_to_both"])
def test_preemption_stops_every_rank_after_the_same_step(case, images, uninterrupted, tmp_path) -> None:
    """A stop signal reaching rank 1 only (sent by the test while the job runs), or one reaching each rank
    (SIGUSR1 on rank 0, SIGTERM on rank 1, both during step 3: each rank signals itself): both ranks stop
    after the same step (the one after the signal: the agreement runs alongside the next step), one
    checkpoint, one line each, exit 143 on both; the same command resumes with the losses of the
    uninterrupted run."""
    ref, _ = uninterrupted
    out = tmp_path / "out"
    command = [*TWO_RANKS, "--data", images, "--output", out]
    if case == "sigterm_to_rank1":
        procs = start_ranks(tmp_path, *command)
        rb.wait_for(lambda: len(rb.log_steps(out)) >= 3, procs[1], what="three steps")
        procs[1].signal(signal.SIGTERM)
        names, on = "SIGTERM", "rank 1"
    else:
        procs = start_ranks(tmp_path, *command, rank_env={0: {"FD_TEST_SIGNAL_AT_STEP": "3:SIGUSR1"},
                                                          1: {"FD_TEST_SIGNAL_AT_STEP": "3:SIGTERM"}})
        names, on = "SIGTERM and SIGUSR1", "ranks 0, 1"
    results = wait_all(procs)
    assert [r.rc for r in results] == [143, 143], [r.err[-2000:] for r in results]
    saved = rb.load_checkpoint(out / "checkpoint.pt")
    step = saved["step"]
    assert 3 <= step < 36 and len(saved["rng_ranks"]) == 2
    if case == "signals_to_both":
        assert step == 4
    lines = [[line for line in r.out.splitlines() if "stopped" in line or "received" in line] for r in results]
    assert lines[0] == [f"received {names} on {on}: saved {out / 'checkpoint.pt'} at step {step}, where all 2 "
                        f"ranks stopped; run the same command again to resume"], results[0].out
    assert lines[1] == [f"rank 1: stopped after step {step} ({names} on {on}); rank 0 saved "
                        f"{out / 'checkpoint.pt'}"], results[1].out
    for r in results:
        assert "Traceback" not in r.err and not any(line.startswith("error") for line in r.err_lines), r.err
    assert not rb.temporaries(out)

    results = wait_all(start_ranks(tmp_path, *command))
    assert [r.rc for r in results] == [0, 0], results[0].err[-3000:]
    assert f"resumed from {out / 'checkpoint.pt'} at step {step}" in results[0].out
    assert losses(out) == losses(ref)  # bit for bit, every step once


# --------------------------------------------------------------------------------------------------------
# A peer that dies or hangs
# --------------------------------------------------------------------------------------------------------

PEER = [*rb.TRAIN, "--synthetic-size", "64", "--epochs", "3", "--save-every", "1"]


def test_a_dying_peer_ends_the_survivor_with_one_line(tmp_path: Path) -> None:
    out = tmp_path / "out"
    procs = start_ranks(tmp_path, *PEER, "--output", out,
                        rank_env={1: {"FD_TEST_DIE_AT_STEP": "2", "FD_TEST_DIE_RANK": "1"}})
    # bound: the next collective fails at once (connection closed) + the 5 s roll call + start-up
    r0, r1 = wait_all(procs, timeout=60)
    assert r1.rc == 1 and "rank 1 exits abruptly after step 2" in r1.err
    one_error_line(r0, 1, "rank 0: rank 1 failed (lost its connection) during step 3",
                   f"last complete checkpoint: {out / 'checkpoint.pt'} (step 2)", "run the same command again")
    assert rb.load_checkpoint(out / "checkpoint.pt")["step"] == 2
    assert not rb.temporaries(out)


def test_a_hanging_peer_ends_the_survivor_after_the_timeout(tmp_path: Path) -> None:
    out = tmp_path / "out"
    procs = start_ranks(tmp_path, *PEER, "--output", out, env={"FD_DIST_TIMEOUT": "3"},
                        rank_env={1: {"FD_TEST_HANG_AT_STEP": "2", "FD_TEST_DIE_RANK": "1"}})
    try:
        # bound: FD_DIST_TIMEOUT (3 s) + the 5 s roll call + start-up
        procs[0].wait(60)
        assert procs[1].poll() is None  # the hanging rank is still alive
    finally:
        procs[1].signal(signal.SIGKILL)
        procs[1].wait(30)
    one_error_line(procs[0].result(), 1, "rank 0: rank 1 failed (timed out) during step 3",
                   f"last complete checkpoint: {out / 'checkpoint.pt'} (step 2)")
    assert rb.load_checkpoint(out / "checkpoint.pt")["step"] == 2


# --------------------------------------------------------------------------------------------------------
# One run per output folder
# --------------------------------------------------------------------------------------------------------

def test_one_run_per_output_folder(tmp_path: Path) -> None:
    """A second run on a folder whose run is alive is refused and touches nothing; once the first run is
    killed (SIGKILL: no clean-up runs), its stale lock file does not block the resume."""
    out = tmp_path / "out"
    command = [*rb.TRAIN, "--epochs", "2", "--save-every", "1", "--output", out]
    first = rb.start(tmp_path, "train.py", *command, env={"FD_TEST_HANG_AT_STEP": "3"})
    try:
        # the hook prints this at its named point, after step 3 and its checkpoint: nothing is written after it
        rb.wait_for(lambda: "hangs after step 3" in first.err_path.read_text(), first, what="the hang after step 3")
        assert rb.load_checkpoint(out / "checkpoint.pt")["step"] == 3
        before = snapshot(out)
        r = rb.run(tmp_path, "train.py", *command)
        line = rb.assert_user_error(r, f"another run (pid {first.pid} on ", f"is using --output {out} right now",
                                    "another --output")
        assert snapshot(out) == before, line
    finally:
        first.signal(signal.SIGKILL)
        first.wait(30)
    assert (out / ".lock").exists()  # stale: its holder is dead
    r = rb.run(tmp_path, "train.py", *command)
    assert r.rc == 0, r.err[-3000:]
    assert f"resumed from {out / 'checkpoint.pt'} at step 3" in r.out
    assert rb.load_checkpoint(out / "checkpoint.pt")["step"] == 8


# --------------------------------------------------------------------------------------------------------
# A save that fails: full disk, read-only folder
# --------------------------------------------------------------------------------------------------------

def test_a_save_that_fails_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    """The resumed run may write only small files (RLIMIT_FSIZE: writing past the limit fails with EFBIG,
    as a full disk fails with ENOSPC): its first checkpoint write fails; one line, exit 2, the previous
    checkpoint intact and loadable, no temporary left; the same command resumes once there is room."""
    out = tmp_path / "out"
    command = [*rb.TRAIN, "--save-every", "1", "--output", out]
    r = rb.run(tmp_path, "train.py", *command, "--max-steps", "2")
    assert r.rc == 0, r.err[-3000:]
    size = (out / "checkpoint.pt").stat().st_size
    before = (out / "checkpoint.pt").read_bytes()
    r = rb.run(tmp_path, "train.py", *command, "--max-steps", "4", fsize=size // 2)
    rb.assert_user_error(r, "saving step 3 failed: could not write", "File too large", "EFBIG",
                         f"last complete checkpoint: {out / 'checkpoint.pt'} (step 2)")
    assert (out / "checkpoint.pt").read_bytes() == before
    assert rb.load_checkpoint(out / "checkpoint.pt")["step"] == 2
    assert not rb.temporaries(out)
    r = rb.run(tmp_path, "train.py", *command, "--max-steps", "4")
    assert r.rc == 0 and "at step 2" in r.out, r.err[-3000:]
    assert rb.log_steps(out) == [1, 2, 3, 4]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EDQUOT])
def test_save_atomic_os_errors_become_one_line(code, tmp_path, monkeypatch) -> None:
    """An OS error in the middle of writing (after some bytes reached the temporary): UserError naming the
    reason, the old file unchanged, no temporary left."""
    path = tmp_path / "checkpoint.pt"
    save_atomic({"w": torch.ones(3)}, path)
    before = path.read_bytes()
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(UserError) as e:
        save_atomic({"w": torch.zeros(3)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    message = str(e.value)
    assert "\n" not in message and os.strerror(code) in message and errno.errorcode[code] in message
    assert f"could not write {path}" in message
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


# --------------------------------------------------------------------------------------------------------
# Resume safety
# --------------------------------------------------------------------------------------------------------

def test_a_rerun_with_other_settings_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    command = [*rb.TRAIN, "--epochs", "2", "--output", out]
    r = rb.run(tmp_path, "train.py", *command, "--max-steps", "2")
    assert r.rc == 0, r.err[-3000:]
    before = snapshot(out)
    r = rb.run(tmp_path, "train.py", *command, "--lr", "0.002", "--epochs", "3", "--teacher-depth", "1")
    rb.assert_user_error(r, "was written by a run with other settings: epochs 2 -> 3, lr 0.001 -> 0.002",
                         "pass another --output", "--allow-config-change", "--epochs, --lr")
    assert snapshot(out) == before  # config.yaml, log.jsonl, checkpoint.pt untouched

    # run control may change: more steps, other logging / saving, workers
    r = rb.run(tmp_path, "train.py", *command, "--max-steps", "3", "--log-every", "2", "--save-every", "3")
    assert r.rc == 0 and "resumed from" in r.out, r.err[-3000:]

    # the explicit flag: continues with the new settings, says so, and the log records it
    r = rb.run(tmp_path, "train.py", *command, "--lr", "0.002", "--max-steps", "4", "--allow-config-change")
    assert r.rc == 0, r.err[-3000:]
    assert "note: continuing" in r.out and "lr 0.001 -> 0.002" in r.out
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    change = [rec for rec in records if rec.get("event") == "config_change"]
    assert change == [{"step": 3, "epoch": 0, "event": "config_change", "changed": {"lr": [0.001, 0.002]}}]
    step4 = [rec for rec in records if rec["step"] == 4 and "loss" in rec][0]
    lr_new = 0.002 * 8 / 512  # the new base lr (scaled to the batch) drives the schedule from here on
    assert step4["lr"] <= lr_new and step4["lr"] > 0.001 * 8 / 512 * 0.5
    import yaml
    assert yaml.safe_load((out / "config.yaml").read_text())["lr"] == 0.002


def test_a_finished_run_says_so_and_touches_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    command = [*rb.TRAIN, "--output", out]
    assert rb.run(tmp_path, "train.py", *command).rc == 0
    before = snapshot(out)
    r = rb.run(tmp_path, "train.py", *command, "--log-every", "5")
    assert r.rc == 0 and not r.err_lines, r.err
    assert r.out.splitlines() == [f"the run in {out} already finished (step 4 of 4, student.pt written); "
                                  f"nothing to do. To train again pass another --output"]
    assert snapshot(out) == before


def test_finetune_refuses_other_settings_and_keeps_a_finished_run(tmp_path: Path) -> None:
    """The same checks in finetune.py (in-process): a finished run returns its results.json untouched."""
    import finetune

    out = tmp_path / "ft"
    argv = [*rb.FINETUNE, "--from-scratch", "--patch-size", "16", "--depth", "1", "--embed-dim", "32",
            "--num-heads", "2", "--progress", "false", "--output", str(out)]
    results = finetune.main(argv)
    before = snapshot(out)
    with pytest.raises(UserError, match=r"other settings: mixup 0.8 -> 0.5 .*--allow-config-change"):
        finetune.main(argv + ["--mixup", "0.5"])
    assert finetune.main(argv + ["--eval-every", "2"]) == json.loads(json.dumps(results))
    assert snapshot(out) == before


# -- the comparison itself ---------------------------------------------------------------------------------
_values = st.one_of(st.integers(-5, 5), st.floats(allow_nan=False, width=32), st.text(max_size=3), st.booleans(),
                    st.none())
_configs = st.dictionaries(st.sampled_from(["lr", "epochs", "data", "teacher", "seed", *sorted(RUN_CONTROL_KEYS)]),
                           _values, min_size=1)


@given(_configs, _configs)
def test_config_differences_are_the_non_control_keys_that_differ(saved, current) -> None:
    diff = config_differences(saved, current)
    assert not set(diff) & RUN_CONTROL_KEYS
    for key in set(saved) & set(current) - RUN_CONTROL_KEYS:
        same = saved[key] == current[key] and type(saved[key]) is type(current[key])
        assert (key in diff) == (not same) or (isinstance(saved[key], (int, float)) and not isinstance(
            saved[key], bool) and saved[key] == current[key]), (key, saved[key], current[key])
        if key in diff:
            assert diff[key] == (saved[key], current[key])
            assert f"{key} {saved[key]!r} -> {current[key]!r}" in describe(diff)
    assert config_differences(saved, saved) == {}
    # changing only run-control keys never counts
    control_only = {**saved, **{k: "changed" for k in RUN_CONTROL_KEYS}}
    assert config_differences(saved, control_only) == {}


def test_config_differences_for_keys_one_side_lacks() -> None:
    defaults = {"lr": 1e-3, "new_setting": 7}
    # a setting added after the checkpoint was written: compared with its default
    assert config_differences({"lr": 1e-3}, {"lr": 1e-3, "new_setting": 7}, defaults) == {}
    assert config_differences({"lr": 1e-3}, {"lr": 1e-3, "new_setting": 8}, defaults) == {"new_setting": (7, 8)}
    # derived values the older checkpoint did not record (no default): not compared
    assert config_differences({"lr": 1e-3}, {"lr": 1e-3, "world_size": 2}, defaults) == {}
    assert config_differences({"x": [1, 2]}, {"x": (1, 2)}) == {}


# --------------------------------------------------------------------------------------------------------
# A newer checkpoint's model_config
# --------------------------------------------------------------------------------------------------------

def test_unknown_model_config_keys_are_named(tmp_path: Path) -> None:
    from fd_ref.models.from_file import build_model, read_model_file
    from fd_ref.models.vit import create_vit

    model = create_vit("vit_tiny", img_size=32, patch_size=16, depth=1, embed_dim=64, num_heads=2)
    path = tmp_path / "student.pt"
    torch.save({"model": model.state_dict(), "model_config": {**model.config, "swiglu": True, "rope": "2d"}}, path)
    with pytest.raises(UserError) as e:
        read_model_file(path)
    message = str(e.value)
    assert "\n" not in message and "rope='2d', swiglu=True" in message and "newer version" in message
    assert check_model_config(model.config, path) == model.config
    torch.save({"model": model.state_dict(), "model_config": model.config}, path)
    rebuilt = build_model(read_model_file(path))
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), model.state_dict().values()))


@pytest.mark.parametrize("message, peer", [
    ("[../gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:52911", True),
    ("[../gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:16009: Connection reset by peer", True),
    ("[../gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 3000ms for recv operation to complete", True),
    ("Application timeout caused pair closure", True),  # seen in DDP's backward after a timed-out collective
    ("mat1 and mat2 shapes cannot be multiplied (8x64 and 32x10)", False),
    ("CUDA out of memory. Tried to allocate 2.00 GiB", False),
])
def test_peer_failures_are_told_from_local_errors(message, peer) -> None:
    from fd_ref.engine.distributed import is_peer_failure
    assert is_peer_failure(RuntimeError(message)) is peer
    assert not is_peer_failure(ValueError(message))
