"""The run config as a whole: the core sections (`gen_dist.schema`), one section per registered model family, and
the checks that need the families and the parallel strategies. Precedence: defaults < YAML file < dotted
overrides; unknown keys, wrong types and impossible values are errors naming the key, before any process starts."""

from __future__ import annotations

import dataclasses
from dataclasses import field
from pathlib import Path
from typing import Any

import yaml

from gen_dist.data.mixture import check_sources
from gen_dist.family import families, family
from gen_dist.parallel import STRATEGIES
from gen_dist.parsing import apply_values, parse_override, read_yaml
from gen_dist.schema import ConfigError, RunConfig, check_keys, to_dict, validate_core, validate_eval


def config_class() -> type[RunConfig]:
    """RunConfig with a section for every registered family, made once per set of families."""
    found = families()
    key = tuple((f.name, f.section) for f in found.values())
    if key not in _CLASSES:
        fields = [(f.name, f.section, field(default_factory=f.section)) for f in found.values()]
        _CLASSES[key] = dataclasses.make_dataclass("RunConfig", fields, bases=(RunConfig,))
    return _CLASSES[key]


_CLASSES: dict[tuple, type[RunConfig]] = {}


def validate(cfg: RunConfig) -> None:
    """Checks across fields that types alone cannot express: the core sections', the strategy's, every
    family's and evaluation's."""
    found = families()
    for f in found.values():
        if f.resolve is not None:
            f.resolve(cfg)
    validate_core(cfg, tuple(found))
    check_sources(cfg)
    if cfg.parallel.strategy not in STRATEGIES:
        raise ConfigError(f"config key 'parallel.strategy' must be one of {', '.join(STRATEGIES)}, got "
                          f"{cfg.parallel.strategy!r}")
    STRATEGIES[cfg.parallel.strategy].validate(cfg)
    for f in found.values():
        check_keys(cfg, {f"{f.name}.{k}": v for k, v in f.choices.items()}, tuple(f"{f.name}.{k}" for k in f.positive))
        if f.check is not None:
            f.check(cfg)
    task = found[cfg.task].task
    validate_eval(cfg, task.generates, task.reconstructs)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Build a RunConfig from defaults, then the YAML file, then `overrides` (highest precedence)."""
    text, source = "", "defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        text, source = p.read_text(), f"config file {p}"
    return config_from_yaml(text, source, overrides)


def config_from_yaml(text: str, source: str, overrides: list[str] = ()) -> RunConfig:
    """Build a RunConfig from YAML text (a file's, or one stored in an exported checkpoint)."""
    cfg = config_class()()
    try:
        data = read_yaml(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{source} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must hold a mapping at the top level")
    apply_values(cfg, data)
    for o in overrides:
        apply_values(cfg, parse_override(o))
    validate(cfg)
    return cfg


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def check_same_model(saved: RunConfig, cfg: RunConfig) -> None:
    """A run directory can only be resumed with the model it was trained with."""
    sections = ("task", "data.resolution", "data.channels", f"{cfg.task}.")
    free = {f"{cfg.task}.{k}" for k in family(cfg.task).sampling_keys}  # how it samples, not what it is
    old, new = _flatten(to_dict(saved)), _flatten(to_dict(cfg))
    changed = [k for k in new if k.startswith(sections) and k not in free and old.get(k) != new[k]]
    if changed:
        diff = ", ".join(f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in changed)
        raise ConfigError(f"run directory {cfg.out_dir} holds checkpoints of another model ({diff}); "
                          f"use a new run_dir")
