"""Text into a typed config: YAML read the way a config means it, values checked against each field's type (wrong
types and unknown keys are errors naming the key), dotted command-line overrides."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import types
import typing
from typing import Any

import yaml

from gen_dist.schema import ConfigError, Switch


class _Loader(yaml.SafeLoader):
    """YAML as a config means it: only true and false are booleans. YAML 1.1 also reads yes/no/on/off as
    booleans, which would make `train.mixed_precision: no` the boolean False; here such a word stays a word, and
    a boolean key takes it as its truth value."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))
WORDS = {"yes": True, "on": True, "no": False, "off": False}
"""YAML 1.1's other boolean words, which a boolean key accepts."""


def read_yaml(text: str) -> Any:
    """A config's YAML (a file, an override's value, the config stored with a checkpoint)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader)


def _check_type(key: str, value: Any, tp: Any) -> Any:
    """Return `value` as type `tp` or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_check_type(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        made = tp()
        apply_values(made, value, key + ".")
        return made
    if tp is Switch:
        value = {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value
        if value not in Switch.VALUES:
            raise ConfigError(f"config key '{key}' must be one of {', '.join(Switch.VALUES)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"config key '{key}': union types are not supported")
    if tp is bool and isinstance(value, str) and value.lower() in WORDS:
        return WORDS[value.lower()]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads `1e-3` (no dot) as a string; accept what Python reads as a number.
        with contextlib.suppress(ValueError):
            value = float(value)
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"config key '{key}' must be {tp.__name__}, got {value!r}")
    if not isinstance(value, tp):
        raise ConfigError(f"config key '{key}' must be {tp.__name__}, got {type(value).__name__} {value!r}")
    if tp is float and not math.isfinite(value):
        raise ConfigError(f"config key '{key}' must be a finite number, got {value!r}")
    return value


def apply_values(obj: Any, values: dict[str, Any], prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for k, v in values.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise ConfigError(f"unknown config key '{key}' (known: {', '.join(sorted(names))})")
        current = getattr(obj, k)
        if dataclasses.is_dataclass(current):
            if not isinstance(v, dict):
                raise ConfigError(f"config key '{key}' must be a mapping, got {v!r}")
            apply_values(current, v, key + ".")
        else:
            setattr(obj, k, _check_type(key, v, hints[k]))


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = value
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out


def parse_override(text: str) -> dict[str, Any]:
    """`train.steps=10` -> {'train': {'steps': 10}}; the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key=value (e.g. train.steps=100)")
    key, raw = text.split("=", 1)
    try:
        value = read_yaml(raw) if raw else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{text}': value is not valid YAML ({e})") from None
    return _nest(key.strip(), value)
