"""Mutation score of the method, the optimiser and the training loop's step and evaluation (mutmut 2).

mutmut plants one small change at a time (an operator flipped, a constant moved by one, an argument
dropped) into a module and runs the tests that import it; a mutant the tests let through "survives". The
score is killed / (killed + survived) over the mutants that are not equivalent to the original code;
docs/testing.md keeps the figure and one line per survivor.

    pip install -r bench/requirements-mutation.txt      # mutmut pins its own click/pony: use a separate venv
    nohup nice -n 15 python bench/mutation.py > /work/cache/mutation.log 2>&1 &   # long: hours on 2 cores
    python bench/mutation.py --report                    # the table and every survivor's diff, from the caches

Each target runs in its own copy of the committed tree (``git archive HEAD``) under ``--work``, with its own
mutmut cache: rerunning the same command continues where it stopped (killed mutants stay killed; survivors
are tested again once the tests change). The copy is refreshed from HEAD whenever a target starts, so its
tests are the committed ones. ``--only`` picks targets by substring. The loop's step and ``evaluate()`` are
mutated on their own lines only (a patch file naming them, mutmut's ``--use-patch-file``). Tests marked
``slow`` (torch.compile) or ``cuda`` are deselected: minutes each on a CPU, and compile adds no check of
its own that the eager tests lack. Not part of CI.
"""
from __future__ import annotations

import argparse
import ast
import os
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (module, functions to mutate or None for the whole file); in this order: small and fast first
TARGETS: list[tuple[str, list[str] | None]] = [
    ("fd_ref/method/whitening.py", None),
    ("fd_ref/method/loss.py", None),
    ("fd_ref/method/losses.py", None),
    ("fd_ref/method/projection.py", None),
    ("fd_ref/method/drop_path.py", None),
    ("fd_ref/method/target_norm.py", None),
    ("fd_ref/method/position.py", None),
    ("fd_ref/method/multi_teacher.py", None),
    ("fd_ref/method/distill.py", None),
    ("fd_ref/optim/schedule.py", None),
    ("fd_ref/optim/lars.py", None),
    ("fd_ref/optim/groups.py", None),
    ("fd_ref/engine/evaluate.py", ["evaluate"]),
    ("fd_ref/engine/trainer.py", ["Trainer._run", "Trainer._optimizer_step"]),
]
# tests that exercise a module without importing it by name (run after the importers)
EXTRA_TESTS = {
    "fd_ref/method/distill.py": ["tests/test_timm_backbone.py"],
}
# tests run first (pytest -x stops at the first failure: a quick, targeted file kills most mutants sooner)
FIRST_TESTS = {
    "fd_ref/engine/evaluate.py": ["tests/test_loop.py"],
    "fd_ref/engine/trainer.py": ["tests/test_loop.py"],
}
NOT_TESTS = {"tests/test_layers.py"}  # reads the import graph, runs nothing
PYTEST = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "not slow and not cuda"]


def tests_for(module: str) -> list[str]:
    """The test files that import ``module`` (``fd_ref.a.b`` or ``from fd_ref.a import b``), FIRST_TESTS before
    them and EXTRA_TESTS after."""
    dotted = module[:-3].replace("/", ".")
    package, name = dotted.rsplit(".", 1)
    pattern = re.compile(rf"(\b{re.escape(dotted)}\b|from {re.escape(package)} import [^\n]*\b{name}\b)")
    found = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                   if pattern.search(p.read_text()))
    first, extra = ([t for t in table.get(module, []) if (ROOT / t).exists()] for table in (FIRST_TESTS, EXTRA_TESTS))
    return [t for t in dict.fromkeys(first + found + extra) if t not in NOT_TESTS]


def function_lines(path: Path, names: list[str]) -> set[int]:
    """Line numbers of the bodies of ``names`` ("func" or "Class.method") in ``path``."""
    tree, lines = ast.parse(path.read_text()), set()
    for name in names:
        node, found = tree, None
        for part in name.split("."):
            found = next((n for n in ast.iter_child_nodes(node) if getattr(n, "name", None) == part), None)
            if found is None:
                raise SystemExit(f"{path}: no {name}")
            node = found
        lines.update(range(found.body[0].lineno, found.end_lineno + 1))
    return lines


def patch_for(module: str, lines: set[int]) -> str:
    """A unified diff in which exactly ``lines`` of ``module`` are new: what --use-patch-file mutates."""
    text = (ROOT / module).read_text().splitlines()
    out = [f"--- a/{module}", f"+++ b/{module}"]
    out.append(f"@@ -1,{len(text) - len(lines)} +1,{len(text)} @@")
    out += [("+" if i in lines else " ") + line for i, line in enumerate(text, 1)]
    return "\n".join(out) + "\n"


def work_dir(work: Path, module: str) -> Path:
    return work / module[:-3].replace("/", "_")


def run_target(work: Path, module: str, functions: list[str] | None, mutmut: str) -> None:
    here = work_dir(work, module)
    here.mkdir(parents=True, exist_ok=True)
    for entry in here.iterdir():  # a fresh copy of HEAD; only mutmut's cache is kept
        if entry.name != ".mutmut-cache":
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "HEAD"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(here), "--exclude=bench/results"], input=archive, check=True)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], check=True,
                            capture_output=True, text=True).stdout.strip()
    tests = tests_for(module)
    runner = shlex.join(PYTEST + tests)
    cmd = [mutmut, "run", "--paths-to-mutate", module, "--tests-dir", "tests", "--runner", runner,
           "--simple-output", "--no-progress", "--test-time-multiplier", "3", "--test-time-base", "60"]
    if functions:
        (here / "mutate.patch").write_text(patch_for(module, function_lines(ROOT / module, functions)))
        cmd += ["--use-patch-file", "mutate.patch"]
    print(f"== {module} {'(' + ', '.join(functions) + ')' if functions else ''} at {commit}\n"
          f"   tests: {' '.join(tests)}", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    subprocess.run(cmd, cwd=here, env=env)
    (here / "COMMIT").write_text(commit + "\n")


def counts(here: Path) -> dict[str, int]:
    cache = here / ".mutmut-cache"
    if not cache.exists():
        return {}
    with sqlite3.connect(cache) as db:
        return dict(db.execute("select status, count(*) from Mutant group by status").fetchall())


def report(work: Path, mutmut: str) -> None:
    """One row per target and the diff of every survivor (and timeout/suspicious), from the mutmut caches."""
    total_k = total_s = 0
    print("| module | commit | killed | survived | timeout | suspicious | untested |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for module, functions in TARGETS:
        here = work_dir(work, module)
        c = counts(here)
        if not c:
            continue
        commit = (here / "COMMIT").read_text().strip() if (here / "COMMIT").exists() else "?"
        name = module + (f" ({', '.join(functions)})" if functions else "")
        print(f"| {name} | {commit} | {c.get('ok_killed', 0)} | {c.get('bad_survived', 0)} | "
              f"{c.get('bad_timeout', 0)} | {c.get('ok_suspicious', 0)} | {c.get('untested', 0)} |")
        total_k, total_s = total_k + c.get("ok_killed", 0), total_s + c.get("bad_survived", 0)
    if total_k + total_s:
        print(f"\nkilled {total_k} of {total_k + total_s} tested ({100 * total_k / (total_k + total_s):.1f}%)")
    for module, _ in TARGETS:
        here = work_dir(work, module)
        if not counts(here):
            continue
        with sqlite3.connect(here / ".mutmut-cache") as db:
            ids = [r[0] for r in db.execute("select id from Mutant where status in "
                                            "('bad_survived', 'bad_timeout', 'ok_suspicious') order by id")]
        for i in ids:
            diff = subprocess.run([mutmut, "show", str(i)], cwd=here, capture_output=True, text=True).stdout
            print(f"\n### {module} #{i}\n{diff.strip()}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default=os.environ.get("FD_MUTATION_WORK", "/work/cache/mutation"))
    p.add_argument("--mutmut", default=shutil.which("mutmut") or "mutmut", help="the mutmut executable")
    p.add_argument("--only", nargs="*", help="targets whose path contains one of these")
    p.add_argument("--list", action="store_true", help="print each target's tests and exit")
    p.add_argument("--report", action="store_true", help="print the table and the survivors, run nothing")
    args = p.parse_args(argv)
    work = Path(args.work)
    targets = [(m, f) for m, f in TARGETS if not args.only or any(o in m for o in args.only)]
    if args.list:
        for module, _ in targets:
            print(module, " ".join(tests_for(module)))
        return
    if args.report:
        report(work, args.mutmut)
        return
    for module, functions in targets:
        run_target(work, module, functions, args.mutmut)


if __name__ == "__main__":
    main()
