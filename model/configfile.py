"""Config files and nested dataclass configs: one reader, one generic ``from_dict``.

``from_dict(Cls, data)`` builds a (possibly nested) dataclass from plain data, as read from TOML
or JSON: nested dataclass fields take tables, tuples take lists, and an unknown key is an error
that names the valid ones. ``to_dict`` is the inverse (what ``manifest.json`` records).
Standard library only, so the model core can use it.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or a config value is unusable (a usage error, not a bug)."""


def read_config(path: str | Path) -> dict:
    """The table of a TOML (``.toml``) or JSON file."""
    import tomllib

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read the config file {path}: {e.strerror or e}") from None
    try:
        data = tomllib.loads(text) if path.suffix.lower() == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path} is not valid {'TOML' if path.suffix.lower() == '.toml' else 'JSON'}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a table of options, got a {type(data).__name__}")
    return data


def from_dict(cls: type[T], data: Any, where: str = "") -> T:
    """An instance of dataclass ``cls`` from ``data`` (a mapping, or already a ``cls``)."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a table of {cls.__name__} options, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(_at(where, k) for k in unknown)}; "
                          f"valid options{' of ' + where if where else ''}: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _value(hints[name], value, _at(where, name)) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:  # a missing option, or a value the config's own checks refuse
        raise ConfigError(f"{where or cls.__name__}: {e}") from None


def to_dict(obj: Any) -> Any:
    """Plain data (dicts, lists, scalars) of a dataclass tree."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    return obj


def _at(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _value(hint, value, where: str):
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        if len(options) == 1:
            return _value(options[0], value, where)
        return value
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value
