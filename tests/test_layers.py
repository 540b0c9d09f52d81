"""fd_ref's layers import one way only.

Every module's imports are read from its source (function-local ones and ``TYPE_CHECKING`` ones included) and
checked against the layer table below: a module may import its own layer and the layers below it, the
method only itself and ``fd_ref.errors``. There is no import cycle between modules, and no module imports a
private name (``_x``) from another module, nor reaches into one through an object (``trainer._log(...)``
where ``_log`` is defined in another module: only ``self`` / ``cls`` or the defining module may touch it).
``fd_ref/engine/`` holds the training loop and what keeps a run alive, nothing else (evaluation helpers
live in ``fd_ref/eval/``). The checker is also fed small invented packages, so that each rule is seen to
fail when it is broken.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fd_ref"

# layer -> rank: a module may import a layer of lower rank, or its own layer
RANKS = {
    "errors": 0, "files": 0, "__init__": 0,    # plain utilities every layer may use
    "config": 1,                               # settings: defaults < YAML < flags
    "method": 1,                               # the paper's equations and the FD objective
    "checkpoint": 2,                           # checkpoint I/O and key conversions
    "models": 3, "data": 3,                    # networks; datasets, transforms, batching
    "optim": 4,                                # parameter groups, layer decay, schedule, LARS
    "engine": 5,                               # the loop and what keeps a run alive
    "eval": 6,                                 # evaluation, k-NN, PHI-S statistics: outside the loop
    "analysis": 6, "timm_export": 6,           # diagnostics; timm / Hugging Face export
    "cli": 7,                                  # what the scripts' main runs in
}
ONLY = {"method": {"method", "errors"}}        # layers restricted further than their rank

# the loop and what keeps a run alive: its settings, start-up, resume, lock, stop signals, processes, precision,
# random state, fault hook, MFU count and TensorBoard log (evaluation lives in fd_ref/eval/)
ENGINE = {"__init__", "trainer", "job", "setup", "resume", "runlock", "stop", "distributed", "precision", "rng",
          "faults", "flops", "tensorboard"}


def layer(module: str) -> str:
    """``fd_ref.models.vit`` -> ``models``; ``fd_ref`` -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(module: str, source: str, is_package: bool) -> list[tuple[str, list[str], int]]:
    """``(imported fd_ref module, names, line)`` for every import statement of ``source``."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "fd_ref"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "fd_ref":
                out.append((target, [a.name for a in node.names], node.lineno))
    return out


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_definitions(source: str) -> set[str]:
    """The private names a module defines: functions, classes, module or class variables, ``self._x``."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
              and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
            names.add(node.attr)
    return {n for n in names if is_private(n)}


def private_reaches(source: str) -> list[tuple[str, int]]:
    """``(name, line)`` of every ``obj._name`` whose ``obj`` is not ``self`` or ``cls``."""
    return [(node.attr, node.lineno) for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Attribute) and is_private(node.attr)
            and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))]


def violations(sources: dict[str, tuple[str, bool]]) -> list[str]:
    """Every broken rule in ``sources`` (module name -> (source, is_package)), one line each."""
    found, edges = [], {}
    defined = {module: private_definitions(source) for module, (source, _) in sources.items()}
    for module, (source, _) in sources.items():
        for name, line in private_reaches(source):
            owners = [m for m, names in defined.items() if m != module and name in names]
            if owners and name not in defined[module]:
                found.append(f"{module}:{line} reaches into private {name} of {', '.join(sorted(owners))}")
    for module, (source, is_package) in sources.items():
        here = layer(module)
        for target, names, line in imports(module, source, is_package):
            # ``from fd_ref.models import hub`` imports the module fd_ref.models.hub
            resolved = [f"{target}.{n}" for n in names if f"{target}.{n}" in sources] or [target]
            for dep in resolved:
                if dep != module:
                    edges.setdefault(module, set()).add(dep)
            there = layer(target)
            allowed = ONLY.get(here)
            if here != there and (there not in allowed if allowed else RANKS[there] >= RANKS[here]):
                found.append(f"{module}:{line} imports {target} (layer {there}, not below {here})")
            private = [n for n in names if n.startswith("_") and f"{target}.{n}" not in sources]
            if private and target != module:
                found.append(f"{module}:{line} imports private {', '.join(private)} from {target}")
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:  # depth-first search; state 1: on the path, 2: done
        state[node] = 1
        for dep in sorted(edges.get(node, ())):
            if state.get(dep) == 1:
                found.append("import cycle: " + " -> ".join(path[path.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for module in sorted(sources):
        if module not in state:
            visit(module, [module])
    return found


def package_sources() -> dict[str, tuple[str, bool]]:
    sources = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        sources[".".join(parts[:-1] if is_package else parts)] = (path.read_text(), is_package)
    return sources


def test_every_layer_is_in_the_table():
    sources = package_sources()
    assert len(sources) > 40
    assert {layer(m) for m in sources} <= set(RANKS), sorted({layer(m) for m in sources} - set(RANKS))


def test_fd_ref_imports_one_way_without_cycles_or_private_names():
    assert violations(package_sources()) == []


def test_the_engine_holds_the_loop_and_what_keeps_a_run_alive():
    """No evaluation, k-NN or statistics module in fd_ref/engine/: those serve a script, not the loop."""
    engine = {module.split(".")[-1] if module != "fd_ref.engine" else "__init__"
              for module in package_sources() if layer(module) == "engine"}
    assert engine <= ENGINE, sorted(engine - ENGINE)
    evaluation = {module for module in package_sources() if layer(module) == "eval"}
    assert {"fd_ref.eval.evaluate", "fd_ref.eval.knn", "fd_ref.eval.knn_eval", "fd_ref.eval.target_fit"} <= evaluation


def test_the_method_imports_nothing_but_itself_and_errors():
    sources = package_sources()
    for module, (source, is_package) in sources.items():
        if layer(module) == "method":
            assert {layer(t) for t, _, _ in imports(module, source, is_package)} <= {"method", "errors"}, module


def invented(importer: str, code: str, imported: str) -> dict[str, tuple[str, bool]]:
    """A two-module package: ``importer`` holding ``code``, and an empty ``imported``."""
    return {importer: (code, False), imported: ("", False)}


CASES = [  # (importer, its code, the module it imports, a fragment of the line the checker must write)
    ("fd_ref.data.sampler", "from fd_ref.engine.trainer import Trainer", "fd_ref.engine.trainer", "(layer engine, not below data)"),
    ("fd_ref.models.vit", "def f():\n    from fd_ref.optim.groups import g\n", "fd_ref.optim.groups", "fd_ref.models.vit:2 imports"),
    ("fd_ref.models.vit", "from fd_ref.data.transforms import MEAN", "fd_ref.data.transforms", "layer data, not below models"),
    ("fd_ref.method.distill", "from fd_ref.files import write_atomic", "fd_ref.files", "imports fd_ref.files"),
    ("fd_ref.engine.trainer", "from fd_ref.engine.loop import _in_main_thread", "fd_ref.engine.loop", "imports private _in_main"),
]


@pytest.mark.parametrize("importer, code, imported, expected", CASES)
def test_the_checker_finds_each_broken_rule(importer, code, imported, expected):
    found = violations(invented(importer, code, imported))
    assert any(expected in line for line in found), found


PRIVATE_CASES = [  # (the module reaching in, its code, the module owning the name, a fragment of the line)
    ("fd_ref.engine.resume", "def f(trainer):\n    trainer._log({})\n", "class Trainer:\n    def _log(self, r): ...\n",
     "fd_ref.engine.resume:2 reaches into private _log of fd_ref.engine.trainer"),
    ("fd_ref.engine.resume", "def f(trainer):\n    trainer._step = 3\n", "class T:\n    def __init__(self):\n        self._step = 0\n",
     "reaches into private _step"),
    ("fd_ref.eval.knn_eval", "from fd_ref.engine import trainer\nx = trainer._HELPER\n", "_HELPER = 1\n",
     "reaches into private _HELPER"),
]


@pytest.mark.parametrize("module, code, owner_code, expected", PRIVATE_CASES)
def test_the_checker_finds_a_reach_into_another_modules_private_member(module, code, owner_code, expected):
    sources = {module: (code, False), "fd_ref.engine.trainer": (owner_code, False)}
    assert any(expected in line for line in violations(sources)), violations(sources)


def test_private_members_through_self_cls_or_the_own_module_or_another_library_are_allowed():
    owner = "class Trainer:\n    def _log(self, r): ...\n    def log(self, r):\n        self._log(r)\n"
    same_name = "class Other:\n    def _log(self, r): ...\n    @classmethod\n    def f(cls, o):\n        o._log(1)\n        cls._log(o, 2)\n"
    library = "import torch\nx = torch._C\ny = torch.nn.modules.batchnorm._BatchNorm\n"
    sources = {"fd_ref.engine.trainer": (owner, False), "fd_ref.engine.other": (same_name, False),
               "fd_ref.engine.lib": (library, False)}
    assert violations(sources) == []


def test_the_checker_finds_a_cycle_through_a_function_local_import():
    sources = {"fd_ref.models.a": ("from fd_ref.models.b import x", False),
               "fd_ref.models.b": ("def f():\n    from .a import y\n", False)}
    assert "import cycle: fd_ref.models.a -> fd_ref.models.b -> fd_ref.models.a" in violations(sources)


def test_relative_and_package_imports_resolve():
    sources = {"fd_ref.models": ("from . import hub", True), "fd_ref.models.hub": ("", False),
               "fd_ref.models.vit": ("from ..method.position import Grid\nfrom fd_ref.models import hub", False),
               "fd_ref.method.position": ("", False)}
    assert violations(sources) == []
    assert imports("fd_ref.models.vit", sources["fd_ref.models.vit"][0], False)[0][0] == "fd_ref.method.position"


def test_importing_the_objective_loads_only_the_method():
    """In a fresh interpreter, the FD objective brings no hub, checkpoint, timm or torchvision with it."""
    import subprocess
    import sys

    code = ("import sys, fd_ref.method.distill; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('fd_ref', 'timm', 'torchvision')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=PACKAGE.parent, capture_output=True, text=True,
                         timeout=300, check=True).stdout
    loaded = ast.literal_eval(out.strip())
    assert "fd_ref.method.distill" in loaded
    assert {layer(m) for m in loaded if m.startswith("fd_ref")} <= {"__init__", "method", "errors"}, loaded
    assert not [m for m in loaded if m.split(".")[0] in ("timm", "torchvision")], loaded
