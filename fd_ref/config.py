"""Configuration: defaults written at the top of each script, overridden by a YAML file, overridden by
command-line flags (``--lr 1e-3``, ``--grad-checkpointing`` / ``--no-grad-checkpointing``).

    resolved = defaults  <-  --config file.yaml  <-  explicit flags

Every key of the defaults becomes a flag (underscores as dashes); its type is the default's type. A
YAML key or flag that names no setting is an error with one line, exit code 2. A key in ``multi`` takes
one or more values (``--teacher A B``, a YAML list); a single value stays a plain value, as before.

An alias keeps an old switch working after its choice became a value of another setting:
``aliases={"whiten": ("target_norm", "none")}`` makes ``--no-whiten`` (or ``whiten: false`` in a YAML file)
mean ``--target-norm none``, ``--whiten`` change nothing, and ``--no-whiten`` beside another
``--target-norm`` an error. The resolved settings hold the setting only, never the alias.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from fd_ref.errors import UserError
from fd_ref.files import FALSE_WORDS, TRUE_WORDS, parse_bool


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        raise UserError(f"{self.prog}: {message} (see --help)")


def _parse_bool(text: str) -> bool:
    try:
        return parse_bool(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _parse_untyped(text: str):
    """A flag whose default is None: none/null -> None, true/false -> bool, numbers -> int/float, else str."""
    if text.lower() in ("none", "null", ""):
        return None
    if text.lower() in TRUE_WORDS[1:] + FALSE_WORDS[1:]:
        return _parse_bool(text)
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def build_parser(defaults: dict[str, Any], help_text: dict[str, str], prog: str, description: str,
                 multi: Sequence[str] = (), aliases: Mapping[str, tuple[str, Any]] | None = None) -> _Parser:
    parser = _Parser(prog=prog, description=description)
    parser.add_argument("--config", type=str, default=None, help="YAML file of settings (flags win)")
    for alias, (key, value) in (aliases or {}).items():
        parser.add_argument("--" + alias.replace("_", "-"), dest=alias, action=argparse.BooleanOptionalAction,
                            default=None, help=help_text.get(alias) or f"--no-{alias.replace('_', '-')} is "
                            f"--{key.replace('_', '-')} {value}")
    for key, value in defaults.items():
        flag = "--" + key.replace("_", "-")
        helptext = help_text.get(key, "")
        if isinstance(value, bool):
            parser.add_argument(flag, dest=key, action=argparse.BooleanOptionalAction, default=None,
                                help=f"{helptext} (default: {value})")
        elif isinstance(value, (list, tuple)):
            kind = type(value[0]) if value else str
            parser.add_argument(flag, dest=key, type=kind, nargs="+", default=None,
                                help=f"{helptext} (default: {value})")
        elif key in multi:
            parser.add_argument(flag, dest=key, type=_parse_untyped if value is None else type(value), nargs="+",
                                default=None, help=f"{helptext} (one or more; default: {value})")
        elif value is None:
            parser.add_argument(flag, dest=key, type=_parse_untyped, default=None,
                                help=f"{helptext} (default: none)")
        else:
            parser.add_argument(flag, dest=key, type=type(value), default=None,
                                help=f"{helptext} (default: {value})")
    return parser


def _coerce(key: str, value: Any, default: Any, source: str) -> Any:
    if default is None or value is None:
        return value
    try:
        if isinstance(default, bool):
            return value if isinstance(value, bool) else _parse_bool(str(value))
        if isinstance(default, float):
            return float(value)
        if isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if isinstance(default, (list, tuple)):
            return list(value) if isinstance(value, (list, tuple)) else [value]
        return type(default)(value)
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        raise UserError(f"{source}: {key} = {value!r} is not a valid {type(default).__name__}") from None


def help_from_source(path: str | Path) -> dict[str, str]:
    """Flag help taken from the comments beside a script's DEFAULTS entries (``key=value,  # text``)."""
    import re
    helps = {}
    for line in Path(path).read_text().splitlines():
        m = re.match(r"\s+(\w+)=.*?#\s*(.+)$", line)
        if m:
            helps.setdefault(m.group(1), m.group(2).strip())
    return helps


def load_yaml(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of setting: value")
    return data


def _one_or_many(values: list) -> Any:
    return values[0] if len(values) == 1 else list(values)


def resolve_config(defaults: dict[str, Any], argv: Sequence[str] | None = None, *,
                   help_text: dict[str, str] | None = None, prog: str = "", description: str = "",
                   multi: Sequence[str] = (), aliases: Mapping[str, tuple[str, Any]] | None = None) -> dict:
    """defaults <- YAML (``--config``) <- explicit flags; returns the resolved dict. ``multi``: keys that
    take one or more values (a list when there are several); ``aliases``: old boolean switches, each the
    value of another setting when switched off (module docstring)."""
    aliases = aliases or {}
    parser = build_parser(defaults, help_text or {}, prog or Path(sys.argv[0]).name, description, multi, aliases)
    args = parser.parse_args(list(argv) if argv is not None else None)
    config = dict(defaults)
    switched: dict[str, Any] = {}  # alias -> its value (YAML, then the flag)
    if args.config:
        for key, value in load_yaml(args.config).items():
            key = key.replace("-", "_")
            if key in aliases:
                switched[key] = _coerce(key, value, True, args.config)
                continue
            if key not in defaults:
                raise UserError(f"config file {args.config}: unknown setting {key!r}")
            if key in multi and isinstance(value, (list, tuple)) and value:
                config[key] = _one_or_many([_coerce(key, v, defaults[key], args.config) for v in value])
            else:
                config[key] = _coerce(key, value, defaults[key], args.config)
    for key, value in vars(args).items():
        if key in aliases:
            if value is not None:
                switched[key] = value
        elif key != "config" and value is not None:
            config[key] = _one_or_many(value) if key in multi else value
    for alias, on in switched.items():
        key, value = aliases[alias]
        if on:
            continue
        if config[key] not in (defaults[key], value):
            raise UserError(f"--no-{alias.replace('_', '-')} means --{key.replace('_', '-')} {value}; it "
                            f"contradicts --{key.replace('_', '-')} {config[key]}")
        config[key] = value
    config["config"] = args.config
    return config


def save_yaml(config: dict, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config, sort_keys=False))
