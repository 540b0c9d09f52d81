"""Randomised fault soak (issue #25): how many injected faults a short distillation survives with nothing lost.

    python bench/soak.py --trials 100 --seed 0 --out /tmp/soak/run     # the benchmark (README: Reliability)
    python bench/soak.py --trials 6 --seed 1                           # a quick look

Each trial distils at test size (32 px, one block, 32 synthetic images, batch 8, fp32, CPU, a checkpoint
every 2 steps, one DataLoader worker): one process in even trials, two gloo ranks under torchrun in odd
ones. A fault is drawn from ``--seed`` and the trial number (bench/soak_runs.py ``draw``):

    kill_save    SIGKILL of the process (or one rank) while a checkpoint is being written, after a random step
    kill_loader  SIGKILL 0-50 ms after the target's DataLoader worker appeared (the loader starting)
    kill_random  SIGKILL at a random moment of the run (start-up included)
    sigterm / sigusr1  pre-emption: after a random step (the fault hook) or at a random moment (from outside)
    rank_dies    the process (or one rank) exits abruptly after a random step (the fault hook)
    rank_hangs   it stops answering after a random step; the survivor ends after FD_DIST_TIMEOUT, the soak
                 kills what is stuck (as a scheduler's time limit would)
    disk_full    the attempt may write only files smaller than a random share of a checkpoint (EFBIG)
    kill_worker  SIGKILL of the target's DataLoader worker alone (the main process lives), after a random step
    truncate_shard  (--shards) a random shard cut at a random byte for one attempt, which must stop at start
                 with one line naming it (no step taken); the shard is restored before the next attempt

    kill_eval    (--finetune) SIGKILL of the process (or one rank) at the start or the end of a random epoch's
                 evaluation (the fault hook FD_TEST_KILL_IN_EVAL)

The first eight are drawn by default; ``--kinds`` picks others (kill_worker among them). ``--shards`` runs
every trial on tar shards of the same synthetic images (``python -m fd_ref.data.make_shards``, 8 images per
shard, so every kill lands inside a shard) and adds truncate_shard to the kinds drawn. ``--finetune`` runs
``finetune.py`` instead (fine-tuning the student of the uninterrupted one-process distillation, evaluating
every epoch; kill_save then also lands in the writes of ``best.pt``) and adds kill_eval; its runs are
checked the same way, with ``best.pt`` and ``results.json`` in place of ``student.pt``.

Then the same command runs again, with a further fault drawn in a quarter of the attempts (at most 3 in
all), until the run finishes. Checked against an uninterrupted run of the same settings: ``student.pt``
equal byte for byte, ``log.jsonl`` with every step once and the same loss, lr and gradient norm bit for
bit, no other file in the run folder (no temporary), the run lock free, every ``checkpoint.pt`` left by a
fault loadable. Steps redone = steps reached by a faulted attempt past the checkpoint it left.

Then the corpus of broken image files (bench/broken_images.py) goes through train.py and finetune.py next
to good images: no run may crash, the skipped files must be counted in log.jsonl, nothing in the folder
may change. Results go to ``OUT/trials.jsonl`` as each trial ends; rerunning the same command continues
where it stopped. The last line printed is a JSON summary.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))
from soak_corpus import run_corpus  # noqa: E402
from soak_runs import FINETUNE_KINDS, KINDS, SHARD_KINDS, WORKER_KINDS, draw, log_steps, run_attempt  # noqa: E402

TINY = ["--img-size", "32", "--patch-size", "16", "--depth", "1", "--embed-dim", "64", "--num-heads", "2",
        "--teacher", "vit_tiny", "--teacher-patch-size", "16", "--teacher-depth", "1", "--synthetic-size", "32",
        "--num-workers", "1", "--log-every", "1", "--save-every", "2", "--precision", "fp32", "--progress", "false"]
FT_TINY = [*TINY[:8], "--synthetic-size", "32", "--num-workers", "1", "--log-every", "1", "--save-every", "2",
           "--precision", "fp32", "--progress", "false", "--mixup", "0", "--cutmix", "0"]
RUN_FILES = {".lock", "checkpoint.pt", "config.yaml", "log.jsonl", "student.pt"}
FT_FILES = {".lock", "checkpoint.pt", "config.yaml", "log.jsonl", "best.pt", "results.json"}
FOLLOW_UP = 0.25   # chance of a further fault in a resumed attempt
MAX_FAULTS = 3
EXACT_KEYS = ("step", "epoch", "loss", "lr", "grad_norm")


def run_args(ranks: int, epochs: int, out: Path, shards: Path | None = None, student: Path | None = None) -> list[str]:
    """Total batch 8 either way: 8 on one process, 4 on each of two ranks; ``student``: finetune.py's."""
    data = ["--data", str(shards)] if shards else []
    base = [*FT_TINY, "--pretrained", str(student)] if student else TINY
    return [*base, *data, "--batch-size", str(8 // ranks), "--epochs", str(epochs), "--output", str(out)]


def script_of(student: Path | None) -> str:
    return "finetune.py" if student else "train.py"


def records(out: Path) -> list[dict]:
    return [{k: r.get(k) for k in EXACT_KEYS} for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())
            if "loss" in r]


def reference(work: Path, ranks: int, epochs: int, shards: Path | None = None, student: Path | None = None) -> dict:
    """The uninterrupted run of these settings (kept in ``work`` for a later soak of the same settings)."""
    out = work / f"reference_{ranks}rank_{epochs}ep{'_shards' if shards else ''}{'_finetune' if student else ''}"
    info = out.with_suffix(".json")
    if info.exists():
        return json.loads(info.read_text())
    shutil.rmtree(out, ignore_errors=True)
    attempt = run_attempt(run_args(ranks, epochs, out, shards, student), out, ranks, None, work / "logs" / out.name,
                          script_of(student))
    if attempt.rc != 0:
        raise SystemExit(f"the uninterrupted reference run failed (exit {attempt.rc}); see {work / 'logs'}")
    ref = {"out": str(out), "seconds": attempt.seconds, "steps": len(log_steps(out)),
           "checkpoint_bytes": (out / "checkpoint.pt").stat().st_size, "finetune": student is not None}
    info.write_text(json.dumps(ref))
    return ref


def lock_free(out: Path) -> bool:
    fd = os.open(out / ".lock", os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def check_run(out: Path, ref_out: Path, steps: int, finetune: bool = False) -> tuple[list[str], bool]:
    """(problems, bit-exact) of a finished run folder against the uninterrupted one: student.pt (finetune.py:
    best.pt and results.json) written, every step logged once, no other file (no temporary), the lock free;
    bit-exact: those files equal byte for byte and every step's loss, lr and gradient norm equal."""
    problems = []
    deliverables, expected = (("best.pt", "results.json"), FT_FILES) if finetune else (("student.pt",), RUN_FILES)
    problems += [f"no {name}" for name in deliverables if not (out / name).exists()]
    if log_steps(out) != list(range(1, steps + 1)):
        problems.append(f"steps logged {log_steps(out)}, not 1..{steps} once each")
    files = set(os.listdir(out)) if out.is_dir() else set()
    if files != expected:
        problems.append(f"files {sorted(files ^ expected)} missing or left over")
    elif not lock_free(out):
        problems.append("the run lock is still held")
    exact = not problems and all((out / n).read_bytes() == (ref_out / n).read_bytes() for n in deliverables) and \
        records(out) == records(ref_out)
    return problems, exact


def trial(work: Path, seed: int, index: int, epochs: int, kinds: tuple[str, ...] = KINDS,
          shards: Path | None = None, student: Path | None = None) -> dict:
    rng = random.Random(f"{seed}:{index}")
    ranks = 1 if index % 2 == 0 else 2
    ref = reference(work, ranks, epochs, shards, student)
    out = work / "trials" / f"{index:04d}"
    shutil.rmtree(out, ignore_errors=True)
    args = run_args(ranks, epochs, out, shards, student)
    shard_files = tuple(sorted(shards.glob("train-*.tar"))) if shards else ()
    kind = rng.choice(kinds)
    attempts, faults, fault = [], 0, kind
    while True:
        plan = draw(fault, rng, ranks, ref["steps"], ref["seconds"], ref["checkpoint_bytes"],
                    shard_files) if fault else None
        faults += plan is not None
        resumed_at = attempts[-1].saved if attempts else 0
        attempt = run_attempt(args, out, ranks, plan, work / "logs" / out.name, script_of(student))
        attempt.note = f"resumed at {resumed_at}"
        attempts.append(attempt)
        if attempt.rc == 0 or plan is None or len(attempts) > 2 * MAX_FAULTS + 2:
            break
        fault = rng.choice(kinds) if faults < MAX_FAULTS and rng.random() < FOLLOW_UP else None
    problems, exact = check_run(out, Path(ref["out"]), ref["steps"], student is not None)
    if attempts[-1].rc != 0:
        problems.insert(0, f"the last attempt exited {attempts[-1].rc}")
    if not all(a.checkpoint_ok for a in attempts):
        problems.append("a checkpoint left by a fault did not load")
    problems += [f"truncated shard {a.note}" for a in attempts if a.note.startswith("NOT refused")]
    survived = not problems
    redone = sum(max(0, a.reached - a.saved) for a in attempts[:-1])
    result = {"trial": index, "seed": seed, "epochs": epochs, "shards": shards is not None,
              "finetune": student is not None, "ranks": ranks,
              "kind": kind, "faults": faults,
              "survived": survived, "bit_exact": survived and exact, "redone_steps": redone,
              "moments": [a.moment for a in attempts if a.moment],
              "attempts": [{"kind": a.kind, "rc": a.rc, "reached": a.reached, "saved": a.saved, "moment": a.moment,
                            "s": a.seconds, "note": a.note} for a in attempts],
              "problems": problems}
    if survived and exact:
        shutil.rmtree(out)  # keep what failed, or survived but not bit-exact, to look at
    return result


def report(results: list[dict], corpus: dict, seconds: float) -> dict:
    """Per fault kind: the trials it opened (survived, bit-exact), and every fault of that kind injected
    (first or later in a trial) with the optimiser steps it cost (reached past the checkpoint it left)."""
    print(f"\n{'fault kind':<12} {'trials':>6} {'survived':>8} {'bit-exact':>9} | {'faults':>6} "
          f"{'steps redone':>12} {'per fault':>9} {'max':>4}")
    per_kind = {}
    for kind in KINDS + WORKER_KINDS + SHARD_KINDS + FINETUNE_KINDS:
        rows = [r for r in results if r["kind"] == kind]
        costs = [max(0, a["reached"] - a["saved"]) for r in results for a in r["attempts"] if a["kind"] == kind]
        if not rows and not costs:
            continue
        per_kind[kind] = {"trials": len(rows), "survived": sum(r["survived"] for r in rows),
                          "bit_exact": sum(r["bit_exact"] for r in rows), "faults": len(costs),
                          "redone_steps": sum(costs), "max_redone": max(costs, default=0)}
        k = per_kind[kind]
        print(f"{kind:<12} {k['trials']:>6} {k['survived']:>8} {k['bit_exact']:>9} | {k['faults']:>6} "
              f"{k['redone_steps']:>12} {k['redone_steps'] / max(k['faults'], 1):>9.2f} {k['max_redone']:>4}")
    moments = [m for r in results for m in r["moments"]]
    shares = {m: moments.count(m) for m in sorted(set(moments))}
    print(f"outside faults landed: {shares}")
    for r in results:
        if not r["bit_exact"]:
            print(f"trial {r['trial']} ({r['kind']}, {r['ranks']} rank(s)): {r['problems'] or 'not bit-exact'}; "
                  f"attempts {r['attempts']}")
    return {"trials": len(results), "survived": sum(r["survived"] for r in results),
            "bit_exact": sum(r["bit_exact"] for r in results),
            "faults": sum(r["faults"] for r in results),
            "redone_steps": sum(r["redone_steps"] for r in results),
            "bad_files_tried": corpus.get("tried", 0), "bad_files_crashed": corpus.get("crashed", 0),
            "moments": shares, "per_kind": per_kind, "corpus": corpus, "seconds": round(seconds, 1)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=3, help="of 4 steps each")
    p.add_argument("--out", default="/tmp/fd_soak", help="work folder (run folders, logs, trials.jsonl)")
    p.add_argument("--no-corpus", action="store_true", help="skip the broken image files")
    p.add_argument("--kinds", default=None, help="the faults drawn (comma-separated; default: the first eight, "
                   f"with --shards also {','.join(SHARD_KINDS)}; others: {','.join(WORKER_KINDS)})")
    p.add_argument("--shards", action="store_true", help="run every trial on tar shards of the synthetic images")
    p.add_argument("--finetune", action="store_true", help="fault finetune.py runs instead of train.py ones")
    a = p.parse_args(argv)
    kinds = tuple(a.kinds.split(",")) if a.kinds else \
        KINDS + (SHARD_KINDS if a.shards else ()) + (FINETUNE_KINDS if a.finetune else ())
    work = Path(a.out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    shards = work / "shards" if a.shards else None
    if shards and not shards.exists():  # the images train.py's synthetic set gives with these settings
        from fd_ref.data.make_shards import make_shards
        make_shards("synthetic", shards, 8, synthetic_size=32, img_size=32, seed=0)
    student = Path(reference(work, 1, 1, shards)["out"]) / "student.pt" if a.finetune else None
    t0 = time.monotonic()
    done_path = work / "trials.jsonl"
    done = {}
    if done_path.exists():
        for line in done_path.read_text().splitlines():
            r = json.loads(line)
            if (r["seed"], r["epochs"], r.get("shards", False), r.get("finetune", False)) == (
                    a.seed, a.epochs, a.shards, a.finetune):
                done[r["trial"]] = r
    for index in range(a.trials):
        if index in done:
            continue
        r = trial(work, a.seed, index, a.epochs, kinds, shards, student)
        done[index] = r
        with open(done_path, "a") as f:
            f.write(json.dumps(r) + "\n")
        print(f"trial {index}: {r['kind']} on {r['ranks']} rank(s), {r['faults']} fault(s), "
              f"{'survived' if r['survived'] else 'FAILED'}{', bit-exact' if r['bit_exact'] else ''}, "
              f"{r['redone_steps']} step(s) redone, moments {r['moments']}", flush=True)
    corpus = {} if a.no_corpus else run_corpus(work / "corpus", TINY, epochs=min(2, a.epochs))
    summary = report([done[i] for i in range(a.trials)], corpus, time.monotonic() - t0)
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
