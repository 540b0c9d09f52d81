"""What the tests that run train.py and finetune.py as processes share (tests/test_user_errors.py,
tests/test_interruption.py, tests/test_reliability.py): starting a run, waiting for it, reading its log and
checkpoint, checking its one-line errors, and the tiny model flags every run uses.

The scripts run as separate processes, so exit codes, signals and stderr are real. Starting a fresh
interpreter costs ~6 CPU-seconds of imports (torch, torchvision, timm) on this machine, so by default each
run is forked from a *launcher*: one helper process (this file run as a script) that imports train.py's and
finetune.py's modules once, computes nothing, and for each run forks a child that executes the script file
as ``__main__`` exactly as ``python train.py ARGS`` would (own stdout/stderr files, own exit status, own
signal handling; an uncaught exception prints its traceback and exits 1, as the interpreter does). Set
``FD_ROBUSTNESS_REAL=1`` to start every run as ``[sys.executable, "train.py", ...]`` instead; a few tests
(one user error, SIGTERM + resume, the two-rank torchrun job) always use real interpreters.

A test module that starts runs imports the autouse fixture ``close_launcher_per_module``: one launcher per test
module, closed when the module's tests end.
"""
from __future__ import annotations

import json
import os
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
def close_launcher_per_module():
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

    from fd_ref.models.vit import create_vit
    model = create_vit("vit_tiny", img_size=32, patch_size=16, depth=1, embed_dim=embed_dim, num_heads=2)
    state = {k: v for k, v in model.state_dict().items() if not any(d in k for d in drop.get("state", ()))}
    blob = {"model": state}
    if record_config:
        blob["model_config"] = {k: v for k, v in model.config.items() if k not in drop.get("config", ())}
    torch.save(blob, path)
    return path


def load_checkpoint(path: Path) -> dict:
    from fd_ref.checkpoint.io import load_file
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
# Image folders
# --------------------------------------------------------------------------------------------------------

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


if __name__ == "__main__":
    _launcher_main()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for a torchrun rendezvous)."""
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
