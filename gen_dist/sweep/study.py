"""The Optuna study of a sweep, kept in a journal file in the sweep folder, and its trials' run directories."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gen_dist.schema import ConfigError, write_atomic
from gen_dist.sweep.spec import SWEEP_FILE, Param, Sweep, load_kept

if TYPE_CHECKING:
    import optuna

JOURNAL = "study.journal"
TRIALS = "trials"


def storage(sweep_dir: Path) -> Any:
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    path = str(sweep_dir / JOURNAL)
    return JournalStorage(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))


def open_study(s: Sweep) -> optuna.Study:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0) if s.pruner == "median"
              else optuna.pruners.NopPruner())
    return optuna.create_study(study_name=s.name, storage=storage(s.dir), sampler=make_sampler(s, s.seed),
                               pruner=pruner, direction=s.direction, load_if_exists=True)


def make_sampler(s: Sweep, seed: int) -> Any:
    """The sweep's sampler. Each trial is asked with a sampler seeded by (sweep seed + trial count), so workers
    in other processes draw different values, and the same sweep draws the same ones. The grid sampler keeps
    the sweep's seed: it finds the points left in the study itself, in an order its seed fixes."""
    import optuna

    if s.sampler == "grid":
        grid = {p.key: p.choices if p.kind == "categorical" else grid_steps(p) for p in s.space}
        return optuna.samplers.GridSampler(grid, seed=s.seed)
    if s.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def grid_steps(p: Param) -> list[Any]:
    n = int(round((p.high - p.low) / p.step)) + 1
    values = [p.low + i * p.step for i in range(n)]
    return [int(v) for v in values] if p.kind == "int" else values


def suggest(trial: optuna.Trial, space: list[Param]) -> dict[str, Any]:
    out = {}
    for p in space:
        if p.kind == "categorical":
            out[p.key] = trial.suggest_categorical(p.key, p.choices)
        elif p.kind == "int":
            out[p.key] = trial.suggest_int(p.key, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
        else:
            out[p.key] = trial.suggest_float(p.key, p.low, p.high, step=p.step, log=p.log)
    return out


def trial_dir(sweep_dir: Path, number: int) -> Path:
    return sweep_dir / TRIALS / f"trial_{number:04d}"


def trial_overrides(s: Sweep, number: int, params: dict[str, Any]) -> list[str]:
    """The overrides that make trial `number` an ordinary run of the sweep's config."""
    run_dir = trial_dir(s.dir, number).resolve()
    return [*s.overrides, *(f"{k}={json.dumps(v)}" for k, v in params.items()), f"run_dir={run_dir}",
            f"name={s.name}_trial_{number:04d}", f"wandb.group={s.name}"]


def prepare(s: Sweep) -> None:
    """Make the sweep folder, or check that an existing one holds this same sweep."""
    s.dir.mkdir(parents=True, exist_ok=True)
    kept = s.dir / SWEEP_FILE
    text = s.path.read_text()
    if kept.is_file() and kept.read_text() != text:
        raise ConfigError(f"{s.dir} holds another sweep ({kept} differs from {s.path}); give this one another name "
                          f"or dir")
    if not kept.is_file():
        write_atomic(kept, text)


def tell(study: optuna.Study, number: int, **outcome: Any) -> None:
    """Record a trial's outcome. Told through a sampler without after-trial hooks: the grid sampler's calls
    study.stop(), which only an optimize() loop may (and then the outcome would not be stored)."""
    import optuna

    study.sampler = optuna.samplers.RandomSampler()
    study.tell(number, **outcome)


def count_failure(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> int:
    """One more failed attempt of the trial (an exit with an error, or its worker gone silent); the count so far."""
    n = int(study.trials[trial.number].user_attrs.get("failures", 0)) + 1
    study._storage.set_trial_user_attr(trial._trial_id, "failures", n)
    return n


def mark_failed(study: optuna.Study, trial: optuna.trial.FrozenTrial, why: str) -> None:
    study._storage.set_trial_system_attr(trial._trial_id, "fail_reason", why)


def open_existing(sweep_dir: Path) -> tuple[Sweep, optuna.Study]:
    import optuna

    kept = sweep_dir / SWEEP_FILE
    if not kept.is_file() or not (sweep_dir / JOURNAL).is_file():
        raise ConfigError(f"{sweep_dir} is not a sweep folder (no {SWEEP_FILE} and {JOURNAL})")
    s = load_kept(sweep_dir)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return s, optuna.load_study(study_name=s.name, storage=storage(sweep_dir))
