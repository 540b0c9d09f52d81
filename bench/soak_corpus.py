"""The broken image files of bench/broken_images.py through train.py and finetune.py (bench/soak.py).

Both scripts run on one folder holding every corpus file next to good JPEGs (one loader worker, every file
in a batch each epoch; finetune.py holds 8 images out for validation, with a split seed that puts some of
the bad files there). A run passes when it exits 0, counts exactly the files the corpus says are
skipped (``skipped_images`` in log.jsonl, and the closing note), and leaves every entry of the folder as it
was (names, modes, sizes, modification times, contents). If a run fails, each kind is tried alone next to
good images to name the files that broke it.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

from broken_images import EXPECTED, bad_files, make_corpus
from soak_runs import ENV, ROOT

FINETUNE = ["--from-scratch", "--patch-size", "16", "--depth", "1", "--embed-dim", "32", "--num-heads", "2",
            "--num-classes", "3"]
VAL_SPLIT = 8
IMAGE_NAMES = sum(os.fsdecode(name).endswith((".jpg", ".png")) for name, _, _, _ in EXPECTED.values())


def snapshot(root: Path) -> dict:
    """Every entry under ``root`` (links not followed): mode, size, mtime and, for files, a content hash."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            digest = ""
            if stat.S_ISREG(st.st_mode):
                try:
                    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
                except PermissionError:
                    digest = "unreadable"
            out[path] = (st.st_mode, st.st_size, st.st_mtime_ns, digest)
    return out


def _run(script: str, args: list[str], out: Path) -> tuple[int, str]:
    shutil.rmtree(out, ignore_errors=True)
    try:
        r = subprocess.run([sys.executable, script, *args, "--output", str(out)], cwd=ROOT,
                           env={**os.environ, **ENV}, capture_output=True, text=True, timeout=300,
                           stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return -1, "timed out after 300 s"
    return r.returncode, r.stdout + r.stderr


def _skips(out: Path) -> int:
    """Skipped files in log.jsonl: training (``skipped_images``) plus validation (``skipped_val_images``)."""
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()] if (
        out / "log.jsonl").exists() else []
    return sum(max([r.get(key, 0) for r in lines] or [0]) for key in ("skipped_images", "skipped_val_images"))


def _noted(text: str) -> int:
    """Skipped files in the closing notes (training and validation)."""
    return sum(int(n) for n in re.findall(r"^note: (\d+) unreadable (?:validation )?image", text, re.M))


def split_seed(root: Path, bad: dict[str, Path]) -> int:
    """A --split-seed whose held-out images include some of the bad files but not all."""
    from fd_ref.data.datasets import split_indices
    from fd_ref.data.images import RobustImageFolder

    listed = [path for path, _ in RobustImageFolder(root).samples]
    bad_paths = {str(p) for p in bad.values()}
    for seed in range(1000):
        held_out = sum(listed[i] in bad_paths for i in split_indices(len(listed), VAL_SPLIT, seed)[1])
        if 0 < held_out < len(bad_paths) or len(bad_paths) < 2:
            return seed
    return 0


def _scripts(root: Path, tiny: list[str], seed: int, epochs: int) -> dict[str, list[str]]:
    return {"train.py": [*tiny, "--data", str(root), "--batch-size", "8", "--epochs", str(epochs)],
            "finetune.py": [*FINETUNE, "--img-size", "32", "--data", str(root), "--batch-size", "8", "--epochs",
                            str(epochs), "--num-workers", "1", "--log-every", "1", "--precision", "fp32", "--progress",
                            "false", "--val-split", str(VAL_SPLIT), "--split-seed", str(seed)]}


def _try(root: Path, bad: dict[str, Path], tiny: list[str], work: Path, epochs: int) -> dict[str, str]:
    """script -> the problem found ('' when none)."""
    problems = {}
    expected_skips = len(bad)
    for script, args in _scripts(root, tiny, split_seed(root, bad), epochs).items():
        before = snapshot(root)
        out = work / f"out_{Path(script).stem}"
        rc, text = _run(script, args, out)
        problem = ""
        if rc != 0:
            problem = f"exit {rc}: {text.strip().splitlines()[-1] if text.strip() else ''}"
        elif _skips(out) != expected_skips:
            problem = f"log.jsonl counts {_skips(out)} skipped image(s), the corpus has {expected_skips}"
        elif _noted(text) != expected_skips:
            problem = f"the closing notes count {_noted(text)} skipped image(s), the corpus has {expected_skips}"
        elif snapshot(root) != before:
            problem = "the image folder changed"
        problems[script] = problem
    return problems


def run_corpus(work: Path, tiny: list[str], n_good: int = 24, epochs: int = 2) -> dict:
    """Both scripts over the whole corpus; on a failure, each kind alone. Returns tried / crashed / problems."""
    shutil.rmtree(work, ignore_errors=True)
    n_good += -(n_good + IMAGE_NAMES) % 8  # a whole number of batches: every file is read each epoch
    root = work / "images"
    paths = make_corpus(root, n_good=n_good)
    problems = _try(root, bad_files(paths), tiny, work, epochs)
    culprits: dict[str, dict[str, str]] = {}
    if any(problems.values()):
        for kind in EXPECTED:
            alone = work / f"alone_{kind}"
            only = make_corpus(alone, n_good=n_good)
            for other, path in only.items():
                if other != kind and EXPECTED[other][0]:
                    os.unlink(path) if os.path.islink(path) or not path.is_dir() else shutil.rmtree(path)
            found = {s: p for s, p in _try(alone, bad_files({kind: only[kind]}), tiny, work, epochs).items() if p}
            if found:
                culprits[kind] = found
    for script, problem in problems.items():
        print(f"corpus, {script}: {problem or 'no crash, skips counted, folder untouched'}", flush=True)
    crashed = sum(any(p.startswith("exit") for p in found.values()) for found in culprits.values())
    return {"tried": len(EXPECTED), "crashed": crashed, "skipped": len(bad_files(paths)),
            "problems": problems, "culprits": culprits}
