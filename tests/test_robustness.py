"""Robustness of train.py and finetune.py (issue #8): every failure a user can meet ends in one clear line
and exit code 2 (or completes, where it should), and nothing half-written stays on disk.

The scripts run as separate processes, so exit codes, signals and stderr are real. Starting a fresh
interpreter costs ~6 CPU-seconds of imports (torch, torchvision, timm) on this machine, so by default each
run is forked from a *launcher*: one helper process (this file run as a script) that imports train.py's and
finetune.py's modules once, computes nothing, and for each run forks a child that executes the script file
as ``__main__`` exactly as ``python train.py ARGS`` would (own stdout/stderr files, own exit status, own
signal handling; an uncaught exception prints its traceback and exits 1, as the interpreter does). Set
``FD_ROBUSTNESS_REAL=1`` to start every run as ``[sys.executable, "train.py", ...]`` instead; a few tests
(one user error, SIGTERM + resume, the two-rank torchrun job) always use real interpreters.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

ROOT = Path(__file__).resolve().parent.parent
FAULT_ENTRY = str(ROOT / "tests" / "run_with_faults.py")  # `python SCRIPT`, with the FD_TEST_* faults installed
REAL = os.environ.get("FD_ROBUSTNESS_REAL", "0") not in ("0", "")
BASE_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
            "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "0", "FD_TEST_DIE_AT_STEP": ""}


# --------------------------------------------------------------------------------------------------------
# The launcher (this file run as a script)
# --------------------------------------------------------------------------------------------------------

def _launcher_main() -> None:
    """Serve JSON requests on stdin: spawn (fork a child running a script) and poll (reap a child)."""
    _serve()
    os._exit(0)  # at EOF: skip the slow interpreter shutdown (torch and friends loaded)


def _serve() -> None:
    import runpy
    import traceback

    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    import finetune  # noqa: F401 - preload every module the scripts use (no computation happens here)
    import train  # noqa: F401
    from fault_injection import install_from_env
    proto.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "poll":
            try:
                pid, status = os.waitpid(req["pid"], 0 if req.get("block") else os.WNOHANG)
            except ChildProcessError:
                proto.write(json.dumps({"rc": None, "gone": True}) + "\n")
                continue
            rc = os.waitstatus_to_exitcode(status) if pid else None
            proto.write(json.dumps({"rc": rc}) + "\n")
            continue
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid:
            proto.write(json.dumps({"pid": pid}) + "\n")
            continue
        # the child: become `python script args...`
        code = 1
        try:
            proto.close()
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
                handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(handle, fd)
                os.close(handle)
            os.environ.update(req["env"])
            install_from_env()  # the faults FD_TEST_* asks for (tests/fault_injection.py)
            if req.get("fsize"):  # a file-size limit: writes past it fail with EFBIG, like a full disk
                import resource
                resource.setrlimit(resource.RLIMIT_FSIZE, (req["fsize"], req["fsize"]))
            os.chdir(req["cwd"])
            script = str(ROOT / req["script"])
            sys.argv = [script, *req["args"]]
            sys.path[0] = str(ROOT)
            try:
                runpy.run_path(script, run_name="__main__")
                code = 0
            except SystemExit as e:
                if e.code is None:
                    code = 0
                elif isinstance(e.code, int):
                    code = e.code
                else:
                    print(e.code, file=sys.stderr)
                    code = 1
            except BaseException:  # noqa: BLE001 - what the interpreter does with an uncaught exception
                traceback.print_exc()
                code = 1
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)


class _Launcher:
    def __init__(self, log: Path) -> None:
        env = {**os.environ, **BASE_ENV}
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve())], cwd=ROOT, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=open(log, "w"), text=True, bufsize=1)
        assert self._read().get("ready"), "the launcher did not start"

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the launcher died")
        return json.loads(line)

    def ask(self, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


_launcher: Optional[_Launcher] = None


def _get_launcher(tmp_root: Path) -> _Launcher:
    global _launcher
    if _launcher is None:
        _launcher = _Launcher(tmp_root / "launcher.log")
    return _launcher


@dataclass
class Result:
    rc: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]


class Proc:
    """A running script: ``poll()``, ``wait(timeout)``, ``signal(sig)``, then ``result()``."""

    def __init__(self, script: str, args: list[str], env: dict, logdir: Path, real: bool,
                 fsize: Optional[int] = None) -> None:
        logdir.mkdir(parents=True, exist_ok=True)
        n = len(list(logdir.glob("*.out")))
        self.out_path, self.err_path = logdir / f"{n}.out", logdir / f"{n}.err"
        self.out_path.touch()  # claim the name now: a process started right after picks the next one
        self.err_path.touch()
        self.rc: Optional[int] = None
        self.popen: Optional[subprocess.Popen] = None
        if real:
            def limit() -> None:
                if fsize:
                    import resource
                    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
            with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
                self.popen = subprocess.Popen([sys.executable, FAULT_ENTRY, script, *args], cwd=ROOT,
                                              env={**os.environ, **BASE_ENV, **env}, preexec_fn=limit,
                                              stdin=subprocess.DEVNULL, stdout=out, stderr=err)
            self.pid = self.popen.pid
        else:
            self.launcher = _get_launcher(logdir.parent)
            reply = self.launcher.ask(op="spawn", script=script, args=args, env={**BASE_ENV, **env},
                                      cwd=str(ROOT), stdout=str(self.out_path), stderr=str(self.err_path),
                                      fsize=fsize)
            self.pid = reply["pid"]

    def poll(self) -> Optional[int]:
        if self.rc is None:
            if self.popen is not None:
                self.rc = self.popen.poll()
            else:
                self.rc = self.launcher.ask(op="poll", pid=self.pid)["rc"]
        return self.rc

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                self.signal(signal.SIGKILL)
                while self.poll() is None:
                    time.sleep(0.05)
                raise AssertionError(f"process {self.pid} ran past {timeout} s; killed. stderr:\n"
                                     f"{self.err_path.read_text()[-3000:]}")
            time.sleep(0.05)
        return self.rc

    def signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def result(self) -> Result:
        return Result(self.rc, self.out_path.read_text(), self.err_path.read_text())


def start(tmp: Path, script: str, *args: str, env: Optional[dict] = None, real: bool = REAL,
          fsize: Optional[int] = None) -> Proc:
    """Start ``script`` with ``args``; ``fsize``: a limit in bytes on the size of any file it writes."""
    return Proc(script, [str(a) for a in args], env or {}, tmp / "logs", real, fsize)


def run(tmp: Path, script: str, *args: str, env: Optional[dict] = None, timeout: float = 60,
        real: bool = REAL, fsize: Optional[int] = None) -> Result:
    proc = start(tmp, script, *args, env=env, real=real, fsize=fsize)
    proc.wait(timeout)
    return proc.result()



# --------------------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def _close_launcher():
    yield
    global _launcher
    if _launcher is not None:
        _launcher.close()
        _launcher = None


# tiny models: 32 px images, 2x2 patch grids, one block; teacher and student built offline
TRAIN = ["--img-size", "32", "--patch-size", "16", "--depth", "1", "--embed-dim", "64", "--num-heads", "2",
         "--teacher", "vit_tiny", "--teacher-patch-size", "16", "--teacher-depth", "1", "--batch-size", "8",
         "--epochs", "1", "--num-workers", "0", "--log-every", "1", "--synthetic-size", "32"]
FINETUNE = ["--img-size", "32", "--batch-size", "8", "--epochs", "1", "--num-workers", "0", "--log-every", "1",
            "--synthetic-size", "32", "--num-classes", "10"]


def assert_user_error(r: Result, *fragments: str) -> str:
    """Exit code 2, exactly one non-empty stderr line 'error: ...' naming ``fragments``, no traceback."""
    assert r.rc == 2, f"exit code {r.rc}\nstdout:\n{r.out[-2000:]}\nstderr:\n{r.err[-3000:]}"
    assert "Traceback" not in r.err, r.err
    assert len(r.err_lines) == 1, r.err
    line = r.err_lines[0]
    assert line.startswith("error: "), line
    for fragment in fragments:
        assert fragment.lower() in line.lower(), f"{fragment!r} not in {line!r}"
    return line


def temporaries(folder: Path) -> list[Path]:
    return [f for f in folder.rglob("*.tmp")]


def assert_nothing_written(tmp: Path, output: Path) -> None:
    assert not output.exists(), f"{output} was created by a run that failed before training"
    assert not temporaries(tmp), temporaries(tmp)


def student_file(path: Path, embed_dim: int = 64, record_config: bool = True, **drop) -> Path:
    """A student.pt as train.py writes it (or a bare state dict / an older config with keys dropped)."""
    import torch

    from fd_ref.vit import create_vit
    model = create_vit("vit_tiny", img_size=32, patch_size=16, depth=1, embed_dim=embed_dim, num_heads=2)
    state = {k: v for k, v in model.state_dict().items() if not any(d in k for d in drop.get("state", ()))}
    blob = {"model": state}
    if record_config:
        blob["model_config"] = {k: v for k, v in model.config.items() if k not in drop.get("config", ())}
    torch.save(blob, path)
    return path


def load_checkpoint(path: Path) -> dict:
    from fd_ref.checkpoint import load_file
    return load_file(path)


def log_steps(output: Path) -> list[int]:
    log = output / "log.jsonl"
    if not log.exists():
        return []
    steps = []
    for line in log.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError):
            pass  # a line being written right now
    return steps


def wait_for(predicate, proc: Proc, timeout: float = 60, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            r = proc.result()
            raise AssertionError(f"exited ({r.rc}) before {what}\nstdout:\n{r.out[-2000:]}\nstderr:\n{r.err[-2000:]}")
        if time.monotonic() > deadline:
            proc.signal(signal.SIGKILL)
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


# --------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------

def test_missing_data_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = run(tmp_path, "train.py", *TRAIN, "--data", tmp_path / "nowhere", "--output", out)
    assert_user_error(r, "nowhere", "existing folder")
    assert_nothing_written(tmp_path, out)
    r = run(tmp_path, "finetune.py", *FINETUNE, "--from-scratch", "--data", tmp_path / "nowhere", "--output", out)
    assert_user_error(r, "nowhere", "existing folder")
    assert_nothing_written(tmp_path, out)


def test_empty_data_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (tmp_path / "empty").mkdir()
    r = run(tmp_path, "train.py", *TRAIN, "--data", tmp_path / "empty", "--output", out)
    assert_user_error(r, "empty", "no class sub-folders")
    (tmp_path / "no_images" / "cat").mkdir(parents=True)
    (tmp_path / "no_images" / "cat" / "notes.txt").write_text("not an image")
    r = run(tmp_path, "finetune.py", *FINETUNE, "--from-scratch", "--data", tmp_path / "no_images",
            "--val-split", "1", "--output", out)
    assert_user_error(r, "no_images", "contains no images")
    assert_nothing_written(tmp_path, out)


def _image_folder(root: Path, n_good: int) -> dict[str, Path]:
    """``n_good`` ordinary JPEGs plus every awkward kind of file, spread over classes a/ and b/."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in "ab":
        (root / cls).mkdir(parents=True, exist_ok=True)
    for i in range(n_good):
        pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "ab"[i % 2] / f"good{i}.jpg", quality=90)
    files = {"gray": root / "a" / "gray.png", "cmyk": root / "b" / "cmyk.jpg", "deep": root / "a" / "deep16.png",
             "huge": root / "b" / "huge.png", "corrupt": root / "a" / "corrupt.jpg",
             "truncated": root / "b" / "truncated.jpg", "zero": root / "a" / "zero.png"}
    Image.fromarray(rng.integers(0, 256, (36, 36), dtype=np.uint8), mode="L").save(files["gray"])
    Image.fromarray(rng.integers(0, 256, (36, 36, 4), dtype=np.uint8), mode="CMYK").save(files["cmyk"])
    Image.fromarray(rng.integers(0, 65536, (36, 36)).astype(np.uint16)).save(files["deep"])  # 16-bit PNG
    Image.new("P", (6000, 6000), 7).save(files["huge"])  # 36 Mpixels, ~16 KB on disk
    files["corrupt"].write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG " * 40)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (120, 120, 3), dtype=np.uint8)).save(buf, format="JPEG")
    files["truncated"].write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    files["zero"].write_bytes(b"")
    return files


BAD_FILES = ("corrupt", "truncated", "zero")


def _check_skips(r: Result, files: dict[str, Path], output: Path) -> None:
    assert r.rc == 0, r.err[-3000:]
    assert "Traceback" not in r.err
    assert f"note: {len(BAD_FILES)} unreadable image(s) skipped" in r.out, r.out
    warnings = [line for line in r.err_lines if line.startswith("skipping unreadable image")]
    assert len(warnings) == len(BAD_FILES), r.err
    for key, path in files.items():  # every bad file named once, no good one
        assert sum(str(path) in line for line in warnings) == (1 if key in BAD_FILES else 0), (key, r.err)
    records = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    assert [rec for rec in records if "loss" in rec][-1].get("skipped_images") == len(BAD_FILES)
    assert not temporaries(output)


def test_bad_image_files_are_skipped_and_counted(tmp_path: Path) -> None:
    """24 files = 3 batches of 8, so one epoch reads every file: 3 bad ones skipped, the rest (grayscale,
    CMYK, 16-bit, 6000x6000) converted. train.py reads in the main process, finetune.py in a loader
    worker (the count still reaches the main process)."""
    files = _image_folder(tmp_path / "mixed", n_good=24 - 7)
    out = tmp_path / "out"
    r = run(tmp_path, "train.py", *TRAIN, "--data", tmp_path / "mixed", "--output", out, timeout=120)
    _check_skips(r, files, out)
    assert "on 24 images" in r.out

    ft = tmp_path / "ft"
    files = _image_folder(ft / "train", n_good=24 - 7)
    _image_folder(ft / "val", n_good=4)
    for key in files:  # a val/ of good images only
        if key in BAD_FILES or key == "huge":
            (ft / "val" / files[key].relative_to(ft / "train")).unlink()
    r = run(tmp_path, "finetune.py", *FINETUNE, "--from-scratch", "--num-classes", "2", "--num-workers", "1",
            "--patch-size", "16", "--depth", "1", "--data", ft, "--output", tmp_path / "ft_out", timeout=120)
    _check_skips(r, files, tmp_path / "ft_out")


def test_batch_larger_than_dataset(tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = run(tmp_path, "train.py", *TRAIN, "--batch-size", "64", "--output", out)
    assert_user_error(r, "32 images", "batch 64", "lower --batch-size")
    assert_nothing_written(tmp_path, out)


# --------------------------------------------------------------------------------------------------------
# Names and shapes
# --------------------------------------------------------------------------------------------------------

def test_unknown_teacher_and_model(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert_user_error(run(tmp_path, "train.py", *TRAIN, "--teacher", "vit_gigantic", "--output", out),
                      "unknown teacher 'vit_gigantic'", "timm:")
    assert_user_error(run(tmp_path, "train.py", *TRAIN, "--model", "resnet50", "--output", out),
                      "unknown model 'resnet50'", "vit_tiny")
    assert_user_error(run(tmp_path, "finetune.py", *FINETUNE, "--from-scratch", "--model", "resnet50",
                          "--output", out), "unknown model 'resnet50'")
    assert_nothing_written(tmp_path, out)


def test_checkpoint_of_another_architecture(tmp_path: Path) -> None:
    import torch

    out = tmp_path / "out"
    # a bare 64-wide state dict, fine-tuned as the default 192-wide vit_tiny
    bare = student_file(tmp_path / "bare.pt", embed_dim=64, record_config=False)
    line = assert_user_error(run(tmp_path, "finetune.py", *FINETUNE, "--pretrained", bare, "--patch-size", "16",
                                 "--depth", "1", "--output", out), "another architecture", "--model")
    assert "(1, 1, 64) vs (1, 1, 192)" in line
    # a training checkpoint of another model found in --output
    out.mkdir()
    torch.save({"model": {"cls_token": torch.zeros(1, 1, 32)}, "optimizer": {}, "scheduler": {}, "step": 3,
                "epoch": 0}, out / "checkpoint.pt")
    assert_user_error(run(tmp_path, "train.py", *TRAIN, "--output", out), "does not match this model",
                      "another --output")
    assert not temporaries(tmp_path)


def test_fewer_classes_than_the_data_has(tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = run(tmp_path, "finetune.py", *FINETUNE, "--from-scratch", "--num-classes", "4", "--output", out)
    assert_user_error(r, "the data has 10 classes", "--num-classes is 4", "pass --num-classes 10")
    assert_nothing_written(tmp_path, out)


def test_img_size_that_does_not_match_the_teacher_checkpoint(tmp_path: Path) -> None:
    import torch

    from fd_ref.vit import create_vit
    teacher = create_vit("vit_tiny", img_size=32, patch_size=16, depth=1)
    torch.save({"model": teacher.state_dict(), "model_config": teacher.config}, tmp_path / "teacher.pt")
    out = tmp_path / "out"
    r = run(tmp_path, "train.py", *TRAIN, "--teacher-checkpoint", tmp_path / "teacher.pt", "--img-size", "48",
            "--output", out)
    assert_user_error(r, "trained at 32 px", "--img-size is 48", "pass --img-size 32")
    assert_nothing_written(tmp_path, out)


# --------------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------------

def test_truncated_checkpoint(tmp_path: Path) -> None:
    good = student_file(tmp_path / "student.pt").read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good[: len(good) // 2])
    out = tmp_path / "out"
    for script, flags in (("finetune.py", [*FINETUNE, "--pretrained", cut]),
                          ("train.py", [*TRAIN, "--resume", cut]),
                          ("train.py", [*TRAIN, "--teacher-checkpoint", cut])):
        r = run(tmp_path, script, *flags, "--output", out)
        assert_user_error(r, str(cut), "truncated or corrupt", "earlier checkpoint")
        assert_nothing_written(tmp_path, out)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    assert_user_error(run(tmp_path, "train.py", *TRAIN, "--resume", empty, "--output", out), "ends too early")


class _RunsCode:
    """Unpickling this calls os.system: what a malicious checkpoint does."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_checkpoint_that_would_run_code_is_refused(tmp_path: Path) -> None:
    import torch

    def evil(path: Path, marker: Path) -> Path:
        torch.save({"model": {"w": torch.zeros(2)}, "model_config": {}, "step": 1, "payload": _RunsCode(
            f"touch {marker}")}, path)
        return path

    # the payload is real: loading it the unsafe way runs the command
    control = tmp_path / "control_marker"
    torch.load(evil(tmp_path / "control.pt", control), weights_only=False)
    assert control.exists()

    marker = tmp_path / "pwned"
    bad = evil(tmp_path / "evil.pt", marker)
    out = tmp_path / "out"
    for script, flags in (("finetune.py", [*FINETUNE, "--pretrained", bad]),
                          ("train.py", [*TRAIN, "--resume", bad]),
                          ("train.py", [*TRAIN, "--teacher-checkpoint", bad])):
        r = run(tmp_path, script, *flags, "--output", out)
        assert_user_error(r, "refused to load", str(bad), "could run code", "posix.system")
        assert not marker.exists(), "the checkpoint's code ran"
        assert_nothing_written(tmp_path, out)


def test_older_checkpoints_with_missing_keys(tmp_path: Path) -> None:
    import torch

    # a student.pt from an older version: no layer scale in its state, a model_config without newer keys
    old = student_file(tmp_path / "old.pt", state=("ls1.", "ls2."), config=("qkv_bias", "layer_scale_init"))
    out = tmp_path / "ft"
    r = run(tmp_path, "finetune.py", *FINETUNE, "--pretrained", old, "--max-steps", "2", "--output", out)
    assert r.rc == 0, r.err[-3000:]
    summary = [line for line in r.out.splitlines() if "missing" in line]
    assert len(summary) == 1, r.out
    assert "blocks.0.ls1.gamma" in summary[0] and "blocks.0.ls2.gamma" in summary[0]
    assert json.loads((out / "results.json").read_text())["steps"] == 2

    # a training checkpoint from an older version: no random state, position or counters
    out = tmp_path / "train"
    r = run(tmp_path, "train.py", *TRAIN, "--max-steps", "2", "--output", out)
    assert r.rc == 0, r.err[-3000:]
    blob = torch.load(out / "checkpoint.pt", weights_only=True)
    for key in ("rng", "micro", "best", "skipped", "config", "model_config"):
        blob.pop(key)
    torch.save(blob, out / "checkpoint.pt")
    r = run(tmp_path, "train.py", *TRAIN, "--max-steps", "4", "--output", out)
    assert r.rc == 0, r.err[-3000:]
    assert f"resumed from {out / 'checkpoint.pt'} at step 2" in r.out
    assert "records no random state" in r.out
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 4


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
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


def _alive(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def test_a_shielded_worker_obeys_only_its_parent() -> None:
    """``shield_loader_worker`` in a fresh child (default signal dispositions, as under the spawn and
    forkserver start methods, Python 3.14's default, where no handler is inherited): SIGUSR1 and SIGTERM
    from another process leave it running; SIGTERM from its parent ends it with status 0."""
    from fd_ref.loop_stop import shield_loader_worker
    child = os.fork()
    if child == 0:  # the worker
        try:
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                signal.signal(sig, signal.SIG_DFL)
            shield_loader_worker(0)
            time.sleep(30)
        finally:
            os._exit(3)  # only if the sleep ends: the shield let it run
    try:
        time.sleep(0.5)
        for name in ("USR1", "TERM"):
            subprocess.run(["kill", f"-{name}", str(child)], check=True)  # sent by the kill process
            time.sleep(0.3)
            assert os.waitpid(child, os.WNOHANG) == (0, 0), f"SIG{name} from another process ended the worker"
        os.kill(child, signal.SIGTERM)  # from the parent
        deadline = time.monotonic() + 10
        while (status := os.waitpid(child, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert status[0] == child and os.waitstatus_to_exitcode(status[1]) == 0, status
    finally:
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


def test_sigkill_at_random_moments_never_breaks_the_checkpoint(tmp_path: Path) -> None:
    """SIGKILL (no handler can run) a few times, once deliberately in the middle of a checkpoint write;
    checkpoint.pt always loads, and the rerun resumes from it and cleans up the half-written temporary."""

    out = tmp_path / "out"
    # 192-wide, 2 blocks: ~12 MB checkpoints, so a write (with fsync) takes a while
    command = [*TRAIN, "--embed-dim", "192", "--num-heads", "3", "--depth", "2", "--epochs", "5",
               "--save-every", "1", "--output", out]  # 20 steps
    rng = random.Random(8)
    last_saved, left_temporary = 0, False
    for attempt in range(6):
        proc = start(tmp_path, "train.py", *command)
        target = max(log_steps(out), default=0) + 1
        wait_for(lambda: max(log_steps(out), default=0) >= target, proc, what=f"step {target}")
        if attempt < 2:  # a random moment after a step was logged (often during its checkpoint write)
            time.sleep(rng.uniform(0.0, 0.25))
        else:  # as soon as a checkpoint write has begun
            wait_for(lambda: any(out.glob(".checkpoint.pt.*.tmp")), proc, what="a checkpoint write")
        proc.signal(signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
        left_temporary = bool(temporaries(out))
        # killed before the first save there is no checkpoint yet; otherwise it is always complete
        saved = load_checkpoint(out / "checkpoint.pt")["step"] if (out / "checkpoint.pt").exists() else 0
        assert saved >= last_saved
        last_saved = saved
        if attempt >= 2 and left_temporary and last_saved:
            break
    assert last_saved > 0
    assert left_temporary, "no SIGKILL landed during a checkpoint write"
    assert temporaries(out)  # the last kill left a half-written temporary behind

    r = run(tmp_path, "train.py", *command)
    assert r.rc == 0, r.err[-3000:]
    assert f"resumed from {out / 'checkpoint.pt'} at step {last_saved}" in r.out
    assert not temporaries(out)
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 20
    assert log_steps(out) == list(range(1, 21))


# --------------------------------------------------------------------------------------------------------
# Distributed
# --------------------------------------------------------------------------------------------------------

def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_dying_rank_ends_the_whole_job_in_bounded_time(tmp_path: Path) -> None:
    """torchrun, 2 gloo ranks; rank 1 exits abruptly after step 1 (fault injection). Rank 0 fails at its
    next collective (connection reset, or FD_DIST_TIMEOUT at worst) and torchrun ends the job non-zero."""
    out = tmp_path / "out"
    env = {**os.environ, **BASE_ENV, "FD_TEST_DIE_AT_STEP": "1", "FD_TEST_DIE_RANK": "1", "FD_DIST_TIMEOUT": "20"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), FAULT_ENTRY, "train.py", *TRAIN, "--synthetic-size", "64", "--epochs", "3",
           "--save-every", "1", "--output", str(out)]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=150)
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0, proc.stdout
    assert elapsed < 90, f"the job took {elapsed:.0f} s to end"
    assert "rank 1 exits abruptly after step 1" in proc.stderr
    assert "2 process(es)" in proc.stdout
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 1  # rank 0 saved step 1 before rank 1 died
    assert not temporaries(out)


# --------------------------------------------------------------------------------------------------------
# The launcher changes nothing: the same case through a fresh interpreter
# --------------------------------------------------------------------------------------------------------

def test_real_interpreter(tmp_path: Path) -> None:
    import torch

    marker = tmp_path / "pwned"
    torch.save({"model": _RunsCode(f"touch {marker}")}, tmp_path / "evil.pt")
    out = tmp_path / "out"
    r = run(tmp_path, "finetune.py", *FINETUNE, "--pretrained", tmp_path / "evil.pt", "--output", out,
            real=True, timeout=120)
    assert_user_error(r, "refused to load", "could run code")
    assert not marker.exists()
    assert_nothing_written(tmp_path, out)


if __name__ == "__main__":
    _launcher_main()
