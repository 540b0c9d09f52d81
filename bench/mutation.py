"""Mutation score of the method, the optimiser and the training loop's step and evaluation (mutmut 2).

mutmut plants one small change at a time (an operator flipped, a constant moved by one, an argument
dropped) into a module and runs the tests on it; a mutant the tests let through "survives". The
score is killed / (killed + survived) over the mutants that are not equivalent to the original code;
docs/testing.md keeps the figure and one line per survivor.

    python -m venv /tmp/mutmut && /tmp/mutmut/bin/pip install -r bench/requirements-mutation.txt  # its own venv:
    pip install coverage==7.17.3                        # mutmut pins click/pony; coverage goes where torch is
    nohup nice -n 15 python bench/mutation.py --mutmut /tmp/mutmut/bin/mutmut > /tmp/mutation.log 2>&1 &  # hours
    python bench/mutation.py --report                    # the table and every survivor's diff, from the caches

Each target runs in its own copy of the committed tree (``git archive HEAD``) under ``--work``. mutmut makes
the mutants (its cache lists them; ``mutmut apply`` writes one into the copy); this script runs, on each, the
tests that run the mutated line (coverage.py, once per target, records which test runs which line; a test that
never runs a line cannot see it changed), restores the file and records the outcome in ``results.json`` after
every mutant, so rerunning the same command continues where it stopped (killed mutants stay killed; survivors
are tried again at a new commit). ``--only`` picks targets by substring. The loop's step and ``evaluate()`` are
mutated on their own lines only. Tests marked ``slow`` (torch.compile) or ``cuda`` are deselected: minutes each
on a CPU, and compile adds no check of its own that the eager tests lack. A mutant whose tests run past 3x the
unmutated time (2 minutes at least) counts as killed (a timeout). Not part of CI. To stop a background run, end
its process group (``kill -- -PGID``).
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (module, functions to mutate or None for the whole file); in this order: small and fast first
TARGETS: list[tuple[str, list[str] | None]] = [
    ("fd_ref/method/whitening.py", None),
    ("fd_ref/method/loss.py", None),
    ("fd_ref/method/loss_options.py", None),
    ("fd_ref/method/projection.py", None),
    ("fd_ref/method/drop_path.py", None),
    ("fd_ref/method/target_norm.py", None),
    ("fd_ref/method/position.py", None),
    ("fd_ref/method/multi_teacher.py", None),
    ("fd_ref/method/masking.py", None),
    ("fd_ref/method/distill.py", None),
    ("fd_ref/optim/schedule.py", None),
    ("fd_ref/optim/lars.py", None),
    ("fd_ref/optim/groups.py", None),
    ("fd_ref/eval/evaluate.py", ["evaluate"]),
    ("fd_ref/engine/trainer.py", ["Trainer._run", "Trainer._optimizer_step"]),
]
# tests that exercise a module without importing it by name (run after the importers)
EXTRA_TESTS = {
    "fd_ref/method/distill.py": ["tests/test_timm_backbone.py"],
    "fd_ref/engine/trainer.py": ["tests/test_host_sync.py"],  # runs train.py's loop, checks its read-backs
}
# tests run first (pytest -x stops at the first failure: a quick, targeted file kills most mutants sooner)
FIRST_TESTS = {
    "fd_ref/eval/evaluate.py": ["tests/test_loop.py"],
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


def _fresh_copy(here: Path) -> str:
    """``here`` becomes a copy of HEAD (mutmut's cache and our results kept); returns HEAD's short hash."""
    here.mkdir(parents=True, exist_ok=True)
    for entry in here.iterdir():
        if entry.name not in (".mutmut-cache", "results.json", "mutants.txt"):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "HEAD"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(here), "--exclude=bench/results"], input=archive, check=True)
    return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], check=True,
                          capture_output=True, text=True).stdout.strip()


def _mutants(here: Path, module: str, functions: list[str] | None, mutmut: str) -> list[tuple[int, str]]:
    """mutmut's mutants of ``module`` (``functions`` only, if given): [(mutmut id, key)], key = "line:index:text".
    mutmut lists them in its cache through a run whose test command always passes (seconds)."""
    cmd = [mutmut, "run", "--paths-to-mutate", module, "--tests-dir", "tests", "--runner", "true",
           "--simple-output", "--no-progress"]
    if functions:
        (here / "mutate.patch").write_text(patch_for(module, function_lines(here / module, functions)))
        cmd += ["--use-patch-file", "mutate.patch"]
    subprocess.run(cmd, cwd=here, capture_output=True)
    with sqlite3.connect(here / ".mutmut-cache") as db:
        rows = db.execute('select m.id, l.line_number, m."index", l.line from Mutant m join Line l on m.line = l.id '
                          'order by l.line_number, m."index"').fetchall()
    wanted = function_lines(here / module, functions) if functions else None
    return [(i, f"{n + 1}:{k}:{text.strip()}") for i, n, k, text in rows if wanted is None or n + 1 in wanted]


def preload() -> None:
    """Import the third-party libraries the tests use, once, in this process: each mutant's tests then run in a
    fork of it (:func:`run_forked`) and skip their import (several seconds of the ten or so a mutant takes).
    fd_ref itself is never imported here: every fork imports the mutated copy afresh."""
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["PYTHONDONTWRITEBYTECODE"] = "1"
    import hypothesis  # noqa: F401
    import numpy  # noqa: F401
    import PIL.Image  # noqa: F401
    import pytest  # noqa: F401
    import timm  # noqa: F401
    import torch
    import torchvision  # noqa: F401
    torch.set_num_threads(1)


def run_forked(here: Path, tests: list[str], timeout: float) -> str:
    """Run pytest on ``tests`` in a fork of this process with ``here`` as the working directory: "killed" (a
    test failed or the run crashed), "survived" or "timeout" (the fork and everything it started are ended)."""
    pid = os.fork()
    if pid == 0:  # the child: its own process group, so that a timeout ends what its tests started too
        code = 3
        try:
            os.setsid()
            os.chdir(here)
            sys.path.insert(0, str(here))
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)
            os.dup2(null, 2)
            import pytest
            code = int(pytest.main([*PYTEST[3:], *tests]))
        finally:
            os._exit(code)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return "survived" if os.waitstatus_to_exitcode(status) == 0 else "killed"
        time.sleep(0.05)
    try:
        os.killpg(pid, 9)
    except ProcessLookupError:
        pass
    os.waitpid(pid, 0)
    return "timeout"


def tests_by_line(here: Path, module: str, tests: list[str], env: dict) -> tuple[dict[int, list[str]], float]:
    """Run ``tests`` once under coverage.py, each test's lines labelled with its node id (bench/mutation_contexts.py):
    {line of ``module``: the tests that run it}, and the seconds the run took. A line run at collection (imports,
    module-level code, ``def`` lines) maps to every file of ``tests``; one run by a fixture's setup or teardown to
    the whole file of the test it ran for; a line absent from the map is run by no test in this process (a
    subprocess may run it) and gets every file too. Raises if the tests fail without a mutant."""
    rc = here / ".coveragerc-mutation"
    rc.write_text(f"[run]\ninclude = {module}\ndata_file = .coverage-mutation\n")
    t = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "coverage", "run", f"--rcfile={rc}", *PYTEST[1:], "-p",
                          "mutation_contexts", *tests], cwd=here, env={**env, "PYTHONPATH": str(here / "bench")},
                         capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if run.returncode != 0:
        raise RuntimeError(run.stdout[-2000:] + run.stderr[-2000:])
    from coverage import CoverageData
    data = CoverageData(basename=str(here / ".coverage-mutation"))
    data.read()
    measured = [f for f in data.measured_files() if Path(f).resolve() == (here / module).resolve()]
    by_line: dict[int, list[str]] = {}
    for line, contexts in (data.contexts_by_lineno(measured[0]).items() if measured else []):
        chosen: list[str] = []
        for context in contexts:
            node, _, phase = context.partition("@")
            if not node:
                chosen = list(tests)
                break
            chosen.append(node.split("::")[0] if phase else node.split("[")[0])  # all of a parametrised test
        by_line[line] = list(dict.fromkeys(chosen))
    return by_line, seconds


def body_lines(path: Path) -> set[int]:
    """The lines inside function bodies of ``path``: only those run when a test calls them. Every other line
    (imports, constants, class attributes, a ``def`` line with its defaults) runs when the module is imported,
    which may happen inside whichever test imports it first."""
    lines: set[int] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines.update(range(node.body[0].lineno, node.end_lineno + 1))
    return lines


def selected(by_line: dict[int, list[str]], line: int, tests: list[str], in_bodies: set[int]) -> list[str]:
    """The tests to run on a mutant of ``line``: those that run it (a file named whole drops its single tests),
    in the order of ``tests`` (FIRST_TESTS first); every file for a line outside function bodies, and for one
    where coverage saw no test run it."""
    chosen = (by_line.get(line) if line in in_bodies else None) or tests
    files = {c for c in chosen if "::" not in c}
    order = {t: i for i, t in enumerate(tests)}
    kept = [c for c in chosen if "::" not in c or c.split("::")[0] not in files]
    return sorted(kept, key=lambda c: (order.get(c.split("::")[0], len(order)), c))


def run_target(work: Path, module: str, functions: list[str] | None, mutmut: str) -> None:
    """Apply each mutant in turn (``mutmut apply``), run the tests that run its line, restore the file; results
    in ``results.json`` (written after every mutant: a rerun continues; survivors are tried again at a new
    commit)."""
    here = work_dir(work, module)
    commit = _fresh_copy(here)
    tests = tests_for(module)
    env = dict(os.environ)  # preload() has set one thread and no bytecode files
    print(f"== {module} {'(' + ', '.join(functions) + ')' if functions else ''} at {commit}\n"
          f"   tests: {' '.join(tests)}", flush=True)
    try:
        by_line, seconds = tests_by_line(here, module, tests, env)
    except RuntimeError as failure:
        print(f"   the tests fail without a mutant: skipped\n{failure}", flush=True)
        return
    timeout = max(120.0, 3 * seconds)
    if run_forked(here, tests, timeout) != "survived":
        print("   the tests fail in a forked run without a mutant: skipped", flush=True)
        return
    results_path = here / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    pristine = (here / module).read_text()
    in_bodies = body_lines(here / module)
    mutants = _mutants(here, module, functions, mutmut)
    results = {key: results[key] for _, key in mutants if key in results}  # a moved line is a new mutant
    (here / "mutants.txt").write_text(f"{len(mutants)}\n")
    print(f"   {len(mutants)} mutants, timeout {timeout:.0f} s", flush=True)
    for mutant_id, key in mutants:
        done = results.get(key)
        if done and (done["status"] == "killed" or done["commit"] == commit):
            continue
        subprocess.run([mutmut, "apply", str(mutant_id)], cwd=here, check=True, capture_output=True)
        diff = subprocess.run(["diff", "-u", "-", module], cwd=here, input=pristine, capture_output=True,
                              text=True).stdout
        chosen = selected(by_line, int(key.split(":")[0]), tests, in_bodies)
        t = time.perf_counter()
        try:
            status = run_forked(here, chosen, timeout)
        finally:
            (here / module).write_text(pristine)
        results[key] = {"status": status, "commit": commit, "seconds": round(time.perf_counter() - t, 1),
                        "tests": len(chosen),
                        "diff": [line for line in diff.splitlines() if line[:1] in "+-" and line[:3] not in
                                 ("+++", "---")]}
        tmp = results_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(results_path)
        print(f"   {status:<8} {key[:90]} ({len(chosen)} tests, {time.perf_counter() - t:.0f} s)", flush=True)


def report(work: Path) -> None:
    """One row per target, then every survivor (and timeout) with its diff, from the results files."""
    total_k = total_s = 0
    print("| module | commit(s) | mutants | killed | survived | timeout | not yet run |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    survivors = []
    for module, functions in TARGETS:
        here = work_dir(work, module)
        if not (here / "results.json").exists():
            continue
        results = json.loads((here / "results.json").read_text())
        listed = int((here / "mutants.txt").read_text()) if (here / "mutants.txt").exists() else len(results)
        c = {s: sum(r["status"] == s for r in results.values()) for s in ("killed", "survived", "timeout")}
        commits = ", ".join(sorted({r["commit"] for r in results.values()}))
        name = module + (f" ({', '.join(functions)})" if functions else "")
        print(f"| {name} | {commits} | {listed} | {c['killed']} | {c['survived']} | {c['timeout']} | "
              f"{max(listed - len(results), 0)} |")
        total_k, total_s = total_k + c["killed"] + c["timeout"], total_s + c["survived"]
        survivors += [(module, key, r) for key, r in results.items() if r["status"] != "killed"]
    if total_k + total_s:
        print(f"\nkilled (timeouts included) {total_k} of {total_k + total_s} run "
              f"({100 * total_k / (total_k + total_s):.1f}%)")
    for module, key, r in survivors:
        print(f"\n{r['status']}: {module} line {key.split(':')[0]} (at {r['commit']})")
        print("\n".join("    " + line for line in r["diff"]))


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
        report(work)
        return
    preload()
    for module, functions in targets:
        run_target(work, module, functions, args.mutmut)


if __name__ == "__main__":
    main()
