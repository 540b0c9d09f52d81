"""The reader's path: every fd_ref function ``python train.py`` passes from argv to the first optimiser step.

    python bench/reader_path.py                      # the quickstart (train.py's defaults), fp32
    python bench/reader_path.py --script finetune.py --pretrained out/quickstart/student.pt
    python bench/reader_path.py --list               # also every function, in the order first reached

A profiler (``sys.setprofile``) records each call into a function defined in this repository (fd_ref/ and the
script; not torch, timm or the standard library; comprehensions and lambdas count as part of the function
that holds them) from the start of the script's ``main(argv)`` until the first
``optimizer.step()``, where the run is stopped. Calls in DataLoader worker processes are not seen.

It prints the number of functions and files on the path, how often ``main()`` calls into
``fd_ref.engine.setup`` (or any module named ``setup``), and the detours, of three kinds a script reader
trips over:

- ``forward``: a function whose body (after its docstring) is at most some plain reads into local names and
  then one call whose arguments call nothing: it only passes on to another function;
- ``private``: a call to a ``_name`` function or method of another module (one module reaching into another's
  private members);
- ``extra``: a second call of the script's ``step_fn`` before the first optimiser step (a hidden real step).
"""
from __future__ import annotations

import argparse
import ast
import importlib.util
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


first_line: dict[tuple[str, str], int] = {}  # (path, qualname) -> the code object's first line


class FirstStep(BaseException):
    """Raised by the optimiser-step hook: the path ends here (BaseException: no ``except Exception`` eats it)."""


def ours(filename: str) -> str | None:
    """The repository-relative path of a file of fd_ref or a top-level script, else None."""
    try:
        rel = Path(filename).resolve().relative_to(ROOT)
    except ValueError:
        return None
    if rel.parts[0] == "fd_ref" or (len(rel.parts) == 1 and rel.suffix == ".py"):
        return rel.as_posix()
    return None


def function_nodes(path: str) -> dict[int, ast.AST]:
    """First line (the first decorator's, as code objects count it) -> function definition, for one file."""
    out = {}
    for node in ast.walk(ast.parse((ROOT / path).read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out[min([node.lineno] + [d.lineno for d in node.decorator_list])] = node
    return out


def calls_in(node: ast.AST) -> int:
    return sum(isinstance(n, ast.Call) for n in ast.walk(node))


def only_forwards(node: ast.AST) -> bool:
    """True for a body of plain reads into names, then one call (returned or not) whose arguments call nothing."""
    body = list(node.body)
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the docstring
    if not body:
        return False
    *reads, last = body
    if any(not isinstance(s, ast.Assign) or calls_in(s) for s in reads):
        return False
    value = last.value if isinstance(last, (ast.Return, ast.Expr)) else None
    return isinstance(value, ast.Call) and calls_in(value) == 1


def trace(script: str, argv: list[str]) -> tuple[list[tuple[str, str]], list[tuple[str, str, str]], Counter, int]:
    """``(functions in the order first reached, private crossings, calls from main() per callee, calls of
    step_fn)``."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    spec = importlib.util.spec_from_file_location(Path(script).stem, ROOT / script)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT))
    spec.loader.exec_module(module)

    order: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    private: list[tuple[str, str, str]] = []
    from_main: Counter = Counter()
    step_calls = [0]
    first_line.clear()

    def profile(frame, event, arg):  # noqa: ARG001
        if event != "call":
            return
        code = frame.f_code
        where = ours(code.co_filename)
        if where is None or code.co_name.startswith("<"):  # comprehensions and lambdas are part of their function
            return
        key = (where, code.co_qualname)
        if code.co_name == "step_fn":
            step_calls[0] += 1
        if key not in seen:
            seen.add(key)
            order.append(key)
            first_line[key] = code.co_firstlineno
        caller = frame.f_back
        if caller is None:
            return
        caller_file = ours(caller.f_code.co_filename)
        name = code.co_name
        if caller_file and caller_file != where and name.startswith("_") and not name.startswith("__"):
            private.append((f"{caller_file}:{caller.f_code.co_qualname}", where, code.co_qualname))
        if caller_file == script and caller.f_code.co_name == "main":
            from_main[(where, code.co_qualname)] += 1

    def stop(optimizer, args, kwargs):  # noqa: ARG001
        raise FirstStep

    hook = register_optimizer_step_pre_hook(stop)
    sys.setprofile(profile)
    try:
        module.main(argv)
    except FirstStep:
        pass
    finally:
        sys.setprofile(None)
        hook.remove()
    return order, private, from_main, step_calls[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--script", default="train.py", help="train.py or finetune.py")
    parser.add_argument("--list", action="store_true", help="print every function on the path")
    args, rest = parser.parse_known_args()
    with tempfile.TemporaryDirectory() as out:
        argv = ["--precision", "fp32", "--progress", "false", "--output", os.path.join(out, "run")] + rest
        order, private, from_main, step_calls = trace(args.script, argv)
    nodes = {path: function_nodes(path) for path in {p for p, _ in order}}
    forwards = []
    for path, qualname in order:
        node = nodes[path].get(first_line[(path, qualname)])
        if node is not None and only_forwards(node):
            forwards.append((path, qualname))
    accum = int(rest[rest.index("--accum-steps") + 1]) if "--accum-steps" in rest else 1
    files = sorted({p for p, _ in order})
    setup_calls = sum(n for (p, _), n in from_main.items() if Path(p).stem == "setup")
    print(f"{args.script} -> first optimiser step: {len(order)} functions in {len(files)} files")
    print(f"main() calls into setup: {setup_calls}")
    detours = ([("forward", f"{p}:{q}") for p, q in forwards]
               + [("private", f"{c} -> {p}:{q}") for c, p, q in dict.fromkeys(private)]
               + [("extra", f"step_fn called {step_calls} times for {accum} micro-batch(es)")] * (step_calls > accum))
    print(f"detours: {len(detours)}")
    for kind, what in detours:
        print(f"  {kind:8s} {what}")
    print("files: " + " ".join(files))
    if args.list:
        for path, qualname in order:
            print(f"  {path}:{qualname}")


if __name__ == "__main__":
    main()
