"""The registry of model families. Each family is one module that registers itself on import: its config
section, its checks and its task. The built-in ones are imported here; GEN_DIST_PLUGINS (comma-separated module
names) adds others, in every process of a run. Family modules import heavy libraries (diffusers) where they use
them, so that reading the registry stays cheap."""

from __future__ import annotations

import importlib
import os

from gen_dist.tasks.base import Family, Phase, Reduce, Task

BUILTIN = ("diffusion", "gan", "vae", "autoencoder", "classifier")
PLUGINS_ENV = "GEN_DIST_PLUGINS"

_FAMILIES: dict[str, Family] = {}
_loaded = False


def register(family: Family) -> Family:
    """Called by a family module when it is imported."""
    _FAMILIES[family.name] = family
    return family


def families() -> dict[str, Family]:
    """Every registered family, by name: the built-in ones, then those of the modules in GEN_DIST_PLUGINS."""
    global _loaded
    if not _loaded:
        _loaded = True
        for name in BUILTIN:
            importlib.import_module(f"gen_dist.tasks.{name}")
        for module in filter(None, (m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(","))):
            try:
                importlib.import_module(module)
            except ImportError as e:
                from gen_dist.config import ConfigError

                raise ConfigError(f"{PLUGINS_ENV} names {module!r}, which cannot be imported: {e}") from None
    return _FAMILIES


def family(name: str) -> Family:
    return families()[name]


__all__ = ["Family", "Phase", "Reduce", "Task", "families", "family", "register"]
