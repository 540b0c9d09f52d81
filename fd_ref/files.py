"""Small file and text utilities shared by the library and the scripts: atomic writes, the process umask,
wrapper-prefix stripping of parameter names, and true/false parsing of command-line text."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable

# Prefixes wrappers add to parameter names: DDP (``module.``), torch.compile (``_orig_mod.``) and the FD
# wrapper (``student.``).
WRAPPER_PREFIXES: tuple[str, ...] = ("module.", "_orig_mod.", "student.")

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


def current_umask() -> int:
    """The process umask (it can only be read by setting it: set, then restored at once)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def write_atomic(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file next to ``path`` (``.NAME.*.tmp``), give it the usual
    permissions (mkstemp creates 0600) and rename it to ``path``: readers see the old file or the whole new
    one, never part of it. On any error the temporary is removed and ``path`` keeps its old content."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~current_umask())
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """``Path(path).write_text(text)``, atomically (:func:`write_atomic`)."""
    return write_atomic(path, lambda tmp: Path(tmp).write_text(text))


def strip_prefixes(name: str, prefixes: Iterable[str] = WRAPPER_PREFIXES) -> str:
    """Remove any leading ``prefixes`` from ``name``, repeatedly (``module.student.x`` -> ``x``)."""
    prefixes = tuple(prefixes)
    changed = True
    while changed:
        changed = False
        for prefix in prefixes:
            if name.startswith(prefix):
                name, changed = name[len(prefix):], True
    return name


def parse_bool(text: str) -> bool:
    """``1 / true / yes / on`` -> True, ``0 / false / no / off`` -> False (any case); else ValueError."""
    word = text.lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ValueError(f"expected true/false, got {text!r}")
