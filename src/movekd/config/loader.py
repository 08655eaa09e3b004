"""Typed configs from plain data: dataclasses built from YAML/JSON dicts, with validation.

``from_dict(Cls, data)`` builds a (nested) dataclass and raises ``ConfigError`` naming the full dotted
key of anything wrong: an unknown key, a wrong type, a missing required field. ``apply_overrides``
applies ``--set key=value`` strings (value parsed as YAML, so ``1e-3``, ``true``, ``[a, b]`` work)
to the plain dict before it is built, so overrides are validated the same way.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from movekd.errors import UserError


class ConfigError(UserError, ValueError):
    """A config value or key is invalid; the message names the dotted key."""


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp, key: str):
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if len(errors) == 1 else f"'{key}': {value!r} fits none of {_type_name(tp)}")
    if origin is typing.Literal:
        if value not in get_args(tp):
            raise ConfigError(f"'{key}' must be one of {list(get_args(tp))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}' must be a mapping of {tp.__name__} fields, got {value!r}")
        if hasattr(tp, "from_dict"):  # a dataclass that validates itself (e.g. TeacherSpec)
            try:
                return tp.from_dict(value)
            except (ValueError, TypeError) as error:
                raise ConfigError(f"'{key}': {error}") from error
        return from_dict(tp, value, prefix=f"{key}.")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{key}' must be a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"'{key}' must have {len(args)} items, got {len(value)}")
            return tuple(_convert(v, a, f"{key}.{i}") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        converted = [_convert(v, item, f"{key}.{i}") for i, v in enumerate(value)]
        return tuple(converted) if origin is tuple else converted
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}' must be a mapping, got {value!r}")
        _, value_type = get_args(tp) or (Any, Any)
        return {k: _convert(v, value_type, f"{key}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML reads "1e-3" as a string
            return float(value)
        except ValueError:
            pass
    if tp is Path and isinstance(value, (str, Path)):
        return Path(value)
    if isinstance(tp, type) and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"'{key}' must be {_type_name(tp)}, got {value!r}")


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass ``cls`` from ``data``; unknown or ill-typed keys raise ``ConfigError``."""
    if not isinstance(data, dict):
        raise ConfigError(f"'{prefix.rstrip('.') or cls.__name__}' must be a mapping, got {data!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}' (known keys here: {', '.join(fields)})")
    kwargs = {}
    for name, field in fields.items():
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], f"{prefix}{name}")
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required config key '{prefix}{name}'")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as error:  # __post_init__ checks
        raise ConfigError(f"'{prefix.rstrip('.') or cls.__name__}': {error}") from error


def to_dict(config) -> dict:
    """Plain-data form of a config (paths as strings, tuples as lists): what is saved in checkpoints."""

    def plain(value):
        if dataclasses.is_dataclass(value) and hasattr(value, "to_dict"):
            return plain(value.to_dict())
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, Path):
            return str(value)
        return value

    return plain(config)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``key.sub=value`` strings to a nested dict (list items by index: ``stages.0.lr=1e-4``)."""
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"override '{override}' must look like key=value")
        dotted, raw = override.split("=", 1)
        value = yaml.safe_load(raw) if raw.strip() else ""
        parts = dotted.strip().split(".")
        node: Any = data
        for depth, part in enumerate(parts[:-1]):
            where = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"override key '{dotted}': '{where}' is not an index of a {len(node)}-item list")
                node = node[int(part)]
            else:
                if part not in node:
                    node[part] = {}
                node = node[part]
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"override key '{dotted}': '{where}' is a value, not a section")
        last = parts[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise ConfigError(f"override key '{dotted}': '{last}' is not an index of the list")
            node[int(last)] = value
        else:
            node[last] = value
    return data


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {error}") from error
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data
