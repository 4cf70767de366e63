"""Weighted mixtures of sources (data.sources): each source's own config, and the seeded plan of which source
each step takes.

Step k's source is drawn with probability weight / sum of weights from a generator seeded by (seed, k) alone, so
the plan is the same on any number of ranks and a resumed run continues it at its step. Every source has its own
stream and position: it is read once per its own epoch, a small one repeating sooner than a large one."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import PurePosixPath

import numpy as np

from gen_dist.schema import ConfigError, RunConfig

MIX_SEED = 0x4D1C


def source_name(path: str) -> str:
    return PurePosixPath(path.rstrip("/").split("::")[0]).name.split("{")[0] or path


def source_configs(cfg: RunConfig) -> list[tuple[str, RunConfig]]:
    """(name, the run's config reading that source) for each of data.sources; data.path's alone without them."""
    if not cfg.data.sources:
        return [(source_name(cfg.data.path), cfg)]
    out = []
    for s in cfg.data.sources:
        one = copy.copy(cfg)
        one.data = dataclasses.replace(cfg.data, path=s.path, split=s.split, index=s.index, sources=[],
                                       label_key=s.label_key or cfg.data.label_key,
                                       caption_key=s.caption_key or cfg.data.caption_key)
        out.append((s.name or source_name(s.path), one))
    return out


def check_sources(cfg: RunConfig) -> None:
    """Weights a plan can draw from, and names the metrics can tell apart."""
    sources = cfg.data.sources
    if not sources:
        return
    weights = [s.weight for s in sources]
    if any(w < 0 for w in weights) or not sum(weights) > 0:
        raise ConfigError(f"data.sources weights must be >= 0 and not all 0, got {weights}")
    if any(not s.path for s in sources):
        raise ConfigError("every entry of data.sources needs a path")
    names = [n for n, _ in source_configs(cfg)]
    if len(set(names)) != len(names):
        raise ConfigError(f"data.sources names {names} repeat: give each source a distinct name")
    if cfg.data.latents:
        raise ConfigError("data.sources mixes image sources: data.latents (one pre-encoded set) cannot be mixed")


def source_at(seed: int, step: int, weights: np.ndarray) -> int:
    """The source that step `step` takes."""
    p = np.asarray(weights, dtype=np.float64)
    return int(np.random.default_rng([seed, MIX_SEED, step]).choice(len(p), p=p / p.sum()))
