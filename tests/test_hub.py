"""The hub check goes through huggingface_hub's own configuration: HF_HUB_OFFLINE, HF_ENDPOINT (a mirror)
and its errors. No test touches the network: the "hub" is either switched off, a closed local port, or a
local HTTP server the test runs itself. Each run is a fresh interpreter, since huggingface_hub reads its
environment variables when first imported."""
from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ["train.py", "--teacher", "timm:vit_tiny_patch16_224", "--img-size", "32", "--patch-size", "8",
         "--depth", "1", "--embed-dim", "16", "--num-heads", "2", "--synthetic-size", "16", "--batch-size",
         "8", "--epochs", "1", "--num-workers", "0", "--progress", "false"]


def _env(tmp_path: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", HF_HOME=str(tmp_path / "hf_home"), **extra)
    return env


def _run(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.parametrize("setting, expected", [
    ({"HF_HUB_OFFLINE": "1"}, "offline mode (HF_HUB_OFFLINE is set)"),
    ({"HF_ENDPOINT": "http://127.0.0.1:9"}, "no connection to http://127.0.0.1:9"),
])
def test_unreachable_hub_without_cache_is_one_line_exit_2(tmp_path, setting, expected):
    out = tmp_path / "out"
    proc = _run(TRAIN + ["--output", str(out)], _env(tmp_path, **setting))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: could not get the weights of teacher"), proc.stderr
    assert expected in lines[0] and "--teacher-checkpoint" in lines[0]
    assert "Retrying" not in proc.stderr + proc.stdout  # one request, no back-off
    assert not (out / "checkpoint.pt").exists() and not (out / "student.pt").exists()


class _NotFound(http.server.BaseHTTPRequestHandler):
    paths: list[str] = []

    def _answer(self) -> None:
        self.paths.append(self.path)
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_GET = _answer

    def log_message(self, *args) -> None:  # quiet
        pass


def test_the_check_asks_the_configured_mirror(tmp_path):
    """HF_ENDPOINT pointing at a mirror: the check asks that mirror (and counts any answer as reachable),
    instead of probing huggingface.co and wrongly going offline."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        mirror = f"http://127.0.0.1:{server.server_address[1]}"
        code = "from fd_ref.models.hub import hub_unreachable; print(repr(hub_unreachable('timm/some_model')))"
        proc = _run(["-c", code], _env(tmp_path, HF_ENDPOINT=mirror))
    finally:
        server.shutdown()
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "None"  # reachable: the mirror answered
    assert any(p.startswith("/timm/some_model/") for p in _NotFound.paths), _NotFound.paths


def test_hub_error_messages_name_the_cause():
    from huggingface_hub import errors as hf_errors

    from fd_ref.models.hub import hub_error_message
    assert "offline mode" in hub_error_message(hf_errors.OfflineModeIsEnabled("x"))
    assert "no connection" in hub_error_message(ConnectionError("refused"))
