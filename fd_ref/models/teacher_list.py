"""The teacher settings of train.py, one entry per teacher (``--teacher A B ...``).

``--teacher`` takes one or more names; ``--teacher-checkpoint``, ``--teacher-kwargs`` and
``--teacher-weight`` take one value per teacher in the same order (``none`` where a teacher has no file or
no arguments), or a single value that applies to every teacher (the single-teacher command lines and
configs, unchanged). In a YAML config each of them may be a list.
"""
from __future__ import annotations

import json
from typing import Any, Mapping

from fd_ref.errors import UserError
from fd_ref.models.timm_backbone import parse_kwargs

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
    # the same teacher twice: the same name, file and arguments (however the arguments are written)
    kwargs = [json.dumps(parse_kwargs(k, "--teacher-kwargs"), sort_keys=True, default=str)
              for k in columns["teacher_kwargs"]]
    if len(set(zip(names, columns["teacher_checkpoint"], kwargs))) != len(names):
        raise UserError(f"the same teacher is listed twice: {', '.join(map(str, names))}")
    return [{key: columns[key][k] for key in TEACHER_KEYS} for k in range(len(names))]
