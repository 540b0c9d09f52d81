"""The teacher settings of train.py, one entry per teacher (``--teacher A B ...``; issue #24).

``--teacher`` takes one or more names; ``--teacher-checkpoint``, ``--teacher-kwargs`` and
``--teacher-weight`` take one value per teacher in the same order (``none`` where a teacher has no file or
no arguments), or a single value that applies to every teacher (the single-teacher command lines and
configs, unchanged). In a YAML config each of them may be a list.
"""
from __future__ import annotations

from typing import Any, Mapping

from fd_ref.errors import UserError

TEACHER_KEYS = ("teacher", "teacher_checkpoint", "teacher_kwargs", "teacher_weight")


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def teacher_settings(cfg: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``[{"teacher": name, "teacher_checkpoint": ..., "teacher_kwargs": ..., "teacher_weight": ...}, ...]``."""
    names = _as_list(cfg["teacher"])
    columns = {"teacher": names}
    for key in TEACHER_KEYS[1:]:
        values = _as_list(cfg[key])
        if len(values) == 1:
            values = values * len(names)
        if len(values) != len(names):
            flag = "--" + key.replace("_", "-")
            raise UserError(f"{len(names)} teachers ({', '.join(map(str, names))}) but {len(values)} {flag} "
                            f"values: give one per teacher in the same order (none where a teacher has none)")
        columns[key] = values
    if len(set(zip(names, columns["teacher_checkpoint"]))) != len(names):  # the same name and file twice
        raise UserError(f"the same teacher is listed twice: {', '.join(map(str, names))}")
    return [{key: columns[key][k] for key in TEACHER_KEYS} for k in range(len(names))]
