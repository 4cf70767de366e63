"""The sweep file: its space of config keys, objective, sampler and pruner, checked against the config schema."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from gen_dist.config import load_config
from gen_dist.family import family
from gen_dist.schema import ConfigError, RunConfig, eval_metric_keys

if TYPE_CHECKING:
    pass

SWEEP_FILE = "sweep.yaml"


KINDS = ("float", "int", "categorical")
SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("none", "median")


@dataclass
class Param:
    key: str
    kind: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] = field(default_factory=list)

    def probe_values(self) -> list[Any]:
        """Values that must each give a valid config."""
        if self.kind == "categorical":
            return list(self.choices)
        cast = int if self.kind == "int" else float
        return [cast(self.low), cast(self.high)]


@dataclass
class Sweep:
    """A sweep file, checked."""

    path: Path
    name: str
    config: str
    overrides: list[str]
    space: list[Param]
    metric: str
    direction: str
    at: str
    trials: int
    sampler: str
    seed: int
    pruner: str
    warmup_evals: int
    stale_minutes: float
    retries: int
    dir: Path

    @property
    def lower_is_better(self) -> bool:
        return self.direction == "minimize"


TOP = {"name", "config", "overrides", "space", "objective", "trials", "sampler", "seed", "pruner", "warmup_evals",
       "stale_minutes", "retries", "dir"}


def load_sweep(path: Path) -> Sweep:
    """Read and check a sweep file: every key of the space against the config schema (each bound or choice
    must give a valid config), the objective against what the runs log. ConfigError names the problem."""
    if not path.is_file():
        raise ConfigError(f"sweep file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"sweep file {path} is not valid YAML: {e}") from None
    unknown = sorted(set(raw) - TOP)
    if unknown:
        raise ConfigError(f"sweep file {path}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(TOP))})")
    for key in ("name", "config", "space", "objective", "trials"):
        if key not in raw:
            raise ConfigError(f"sweep file {path} needs '{key}'")
    objective = raw["objective"] if isinstance(raw["objective"], dict) else {}
    sweep = Sweep(
        path=path, name=str(raw["name"]), config=str(raw["config"]), overrides=list(raw.get("overrides") or []),
        space=[_param(k, v) for k, v in (raw["space"] or {}).items()], metric=str(objective.get("metric", "")),
        direction=str(objective.get("direction", "minimize")), at=str(objective.get("at", "last")),
        trials=raw["trials"], sampler=str(raw.get("sampler", "tpe")), seed=raw.get("seed", 0),
        pruner=str(raw.get("pruner", "none")), warmup_evals=raw.get("warmup_evals", 1),
        stale_minutes=float(raw.get("stale_minutes", 10)), retries=raw.get("retries", 1),
        dir=Path(raw.get("dir") or f"runs/{raw['name']}"))
    _check(sweep)
    return sweep


def load_kept(sweep_dir: Path) -> Sweep:
    """The sweep a sweep folder keeps (its copy of the sweep file), with the folder as its directory, wherever the
    folder has moved since."""
    s = load_sweep(sweep_dir / SWEEP_FILE)
    s.dir = sweep_dir
    return s


def _param(key: str, spec: Any) -> Param:
    if not isinstance(spec, dict) or spec.get("type") not in KINDS:
        raise ConfigError(f"sweep space '{key}' must be a mapping with type: {' | '.join(KINDS)}, got {spec!r}")
    extra = set(spec) - {"type", "low", "high", "log", "step", "choices"}
    if extra:
        raise ConfigError(f"sweep space '{key}': unknown field(s) {', '.join(sorted(extra))}")
    p = Param(key, spec["type"], spec.get("low"), spec.get("high"), bool(spec.get("log", False)), spec.get("step"),
              list(spec.get("choices") or []))
    if p.kind == "categorical":
        if not p.choices:
            raise ConfigError(f"sweep space '{key}': categorical needs a non-empty list of choices")
        return p
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (p.low, p.high)):
        raise ConfigError(f"sweep space '{key}': {p.kind} needs numeric low and high, got {p.low!r}, {p.high!r}")
    if not p.low < p.high:
        raise ConfigError(f"sweep space '{key}': low {p.low} must be below high {p.high}")
    if p.log and p.low <= 0:
        raise ConfigError(f"sweep space '{key}': a log range needs low > 0, got {p.low}")
    if p.log and p.step is not None:
        raise ConfigError(f"sweep space '{key}': a log range takes no step")
    return p


def _check(s: Sweep) -> None:
    if not isinstance(s.trials, int) or s.trials < 1:
        raise ConfigError(f"sweep 'trials' must be an integer >= 1, got {s.trials!r}")
    if not s.space:
        raise ConfigError("sweep 'space' must name at least one config key")
    for key, value, allowed in (("objective.direction", s.direction, ("minimize", "maximize")),
                                ("objective.at", s.at, ("last", "best")), ("sampler", s.sampler, SAMPLERS),
                                ("pruner", s.pruner, PRUNERS)):
        if value not in allowed:
            raise ConfigError(f"sweep '{key}' must be one of {', '.join(allowed)}, got {value!r}")
    if s.sampler == "grid" and any(p.kind != "categorical" and p.step is None for p in s.space):
        raise ConfigError("sampler: grid needs every key of the space categorical or with a step")
    base = load_config(s.config, s.overrides)  # the config file and fixed overrides on their own
    for p in s.space:
        for value in p.probe_values():
            try:
                load_config(s.config, [*s.overrides, f"{p.key}={json.dumps(value)}"])
            except ConfigError as e:
                raise ConfigError(f"sweep space '{p.key}' = {value!r}: {e}") from None
    if s.pruner != "none" and not base.eval.every:
        raise ConfigError("a sweep pruner is driven by the in-training evaluation: set eval.every > 0 in the config "
                          "or the sweep's overrides")
    _check_metric(s, base)


def _check_metric(s: Sweep, cfg: RunConfig) -> None:
    if not s.metric:
        raise ConfigError("sweep 'objective.metric' must name a logged metric (e.g. eval/inception/fid1k)")
    if s.metric.startswith("eval/"):
        known = eval_metric_keys(cfg, family(cfg.task).task.reconstructs)
        if not cfg.eval.every or s.metric not in known:
            raise ConfigError(f"sweep objective {s.metric} is not a metric the trials' in-training evaluation logs "
                              f"(eval.every={cfg.eval.every}; it logs {', '.join(known) or 'nothing'})")
    elif s.pruner != "none":
        raise ConfigError("a sweep pruner needs an eval/ objective metric (it is fed by the in-training evaluation)")
