"""Hyperparameter sweeps: `gen-dist sweep SWEEP.yaml --workers K` on one machine, `gen-dist slurm sweep` as a job
array. Optuna decides the trials (TPE, random or grid; an optional pruner fed by the in-training evaluations)
and keeps the study in a journal file, which needs no database server and works on a shared filesystem.

A sweep is a folder (runs/<name> by default): the sweep file as given (sweep.yaml), the study
(study.journal), and one ordinary run directory per trial (trials/trial_NNNN: its resolved config, checkpoints,
logs and W&B run). A worker takes trials one after another: first one whose worker is gone (it resumes from the
trial's own checkpoint), else a new one while the sweep has trials left. A claim file in each trial directory
says which worker runs it; a claim whose process is gone, or whose trial has not beaten its heartbeat for
`stale_minutes`, is taken over. So rerunning the sweep after a kill, or requeueing an array task, finishes every
trial exactly once."""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from gen_dist.config import ConfigError, RunConfig, eval_metric_keys, load_config, write_atomic
from gen_dist.monitor import PREEMPTED, pid_exists, read_json

if TYPE_CHECKING:
    import optuna

SWEEP_FILE = "sweep.yaml"
JOURNAL = "study.journal"
TRIALS = "trials"
CLAIM = "claim.json"
PRUNED = "pruned.json"
REQUEUE_EXIT = 75
"""A SLURM sweep worker's exit code after stopping its trial at a checkpoint: the job script requeues the task."""
HUNG = 124
"""The outcome code of a trial stopped by its worker because its heartbeat went stale while it ran."""
POLL_S = 2.0
TRIAL_ENV = "GEN_DIST_TRIAL"
"""Set for a trial's processes: SWEEP_DIR#NUMBER, so that the trainer can report to the study and be pruned."""
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
    from gen_dist.tasks import family

    if not s.metric:
        raise ConfigError("sweep 'objective.metric' must name a logged metric (e.g. eval/inception/fid1k)")
    if s.metric.startswith("eval/"):
        known = eval_metric_keys(cfg, family(cfg.task).task.reconstructs)
        if not cfg.eval.every or s.metric not in known:
            raise ConfigError(f"sweep objective {s.metric} is not a metric the trials' in-training evaluation logs "
                              f"(eval.every={cfg.eval.every}; it logs {', '.join(known) or 'nothing'})")
    elif s.pruner != "none":
        raise ConfigError("a sweep pruner needs an eval/ objective metric (it is fed by the in-training evaluation)")


# ---------------------------------------------------------------------------------------------- the study


def _storage(sweep_dir: Path) -> Any:
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    path = str(sweep_dir / JOURNAL)
    return JournalStorage(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))


def open_study(s: Sweep) -> optuna.Study:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0) if s.pruner == "median"
              else optuna.pruners.NopPruner())
    return optuna.create_study(study_name=s.name, storage=_storage(s.dir), sampler=make_sampler(s, s.seed),
                               pruner=pruner, direction=s.direction, load_if_exists=True)


def make_sampler(s: Sweep, seed: int) -> Any:
    """The sweep's sampler. Each trial is asked with a sampler seeded by (sweep seed + trial count), so workers
    in other processes draw different values, and the same sweep draws the same ones. The grid sampler keeps
    the sweep's seed: it finds the points left in the study itself, in an order its seed fixes."""
    import optuna

    if s.sampler == "grid":
        grid = {p.key: p.choices if p.kind == "categorical" else _steps(p) for p in s.space}
        return optuna.samplers.GridSampler(grid, seed=s.seed)
    if s.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def _steps(p: Param) -> list[Any]:
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


# ---------------------------------------------------------------------------------------------- claims


@contextlib.contextmanager
def _locked(sweep_dir: Path) -> Iterator[None]:
    """One worker at a time decides which trial to run next (all workers, on any host of a shared filesystem)."""
    with open(sweep_dir / "sweep.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def worker_id() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "thread": threading.get_ident(),
            "slurm_job": os.environ.get("SLURM_ARRAY_JOB_ID", os.environ.get("SLURM_JOB_ID", "")),
            "slurm_task": os.environ.get("SLURM_ARRAY_TASK_ID", ""), "time": time.time()}


def _read(path: Path) -> dict[str, Any]:
    return read_json(path) or {}


def claim_state(run_dir: Path, stale_s: float, now: float | None = None) -> str:
    """Whether the worker that claimed this trial still runs it: 'alive'; 'gone' when its process is known to
    have ended (on this host, or this same SLURM array task in an earlier run of it); 'stale' when neither the
    trial's heartbeat nor the claim is younger than `stale_s` (a worker on another host, or a requeued task
    that has not come back)."""
    claim = _read(run_dir / CLAIM)
    if not claim:
        return "gone"
    me = worker_id()
    if claim.get("slurm_job") and (claim["slurm_job"], claim["slurm_task"]) == (me["slurm_job"], me["slurm_task"]):
        return "alive" if (claim["pid"], claim["host"]) == (me["pid"], me["host"]) else "gone"
    if claim["host"] == me["host"] and not claim.get("requeued"):
        return "alive" if pid_exists(claim["pid"]) else "gone"
    return "stale" if silent(run_dir, claim["time"], stale_s, now) else "alive"


def silent(run_dir: Path, since: float, stale_s: float, now: float | None = None) -> bool:
    """No heartbeat from the trial since max(`since`, its last one) for longer than its limit: `stale_s`, or
    five of its own intervals between beats where those are longer (as `gen-dist status` judges a run)."""
    beat = _read(run_dir / "heartbeat.json")
    limit = max(stale_s, 5 * float(beat.get("log_every_s") or 0))
    return (now or time.time()) - max(since, float(beat.get("time") or 0)) > limit


def _stop_group(group: int, sig: int, grace_s: float) -> None:
    """Signal a trial's process group, then SIGKILL whatever is left of it after `grace_s`."""
    import signal

    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, sig)
        deadline = time.time() + grace_s
        while time.time() < deadline:
            os.killpg(group, 0)
            time.sleep(0.2)
        os.killpg(group, signal.SIGKILL)


def _stop_leftover(run_dir: Path) -> None:
    """A trial whose worker died may still be training on this host: stop it (it checkpoints) before another
    worker resumes the trial, so that two never write one run directory."""
    import signal

    claim = _read(run_dir / CLAIM)
    group = claim.get("trial_pgid")
    if group and claim.get("host") == socket.gethostname():
        _stop_group(group, signal.SIGUSR1, 120)  # the agreed stop; the launchers ignore it and outlive their ranks


WAIT = "wait"


def claim_next(s: Sweep, study: optuna.Study) -> tuple[int, dict[str, Any]] | str | None:
    """(number, params) of the trial this worker runs next: one left by a worker that is gone, else a new one
    while the sweep has trials left. WAIT when none is free but other workers still run trials (one of them may
    go quiet and need taking over); None when the sweep is done."""
    import optuna

    with _locked(s.dir):
        trials = study.get_trials(deepcopy=False)
        held = False
        for t in trials:
            if t.state != optuna.trial.TrialState.RUNNING:
                continue
            run_dir = trial_dir(s.dir, t.number)
            state = claim_state(run_dir, s.stale_minutes * 60)
            held |= state == "alive"
            if state == "alive" or (state == "stale" and not _retry_lost(s, study, t)):
                continue
            _stop_leftover(run_dir)
            _claim(run_dir)
            return t.number, t.params
        if len(trials) >= s.trials:
            return WAIT if held else None
        study.sampler = make_sampler(s, s.seed + len(trials))
        trial = study.ask()
        params = suggest(trial, s.space)
        _claim(trial_dir(s.dir, trial.number))
        return trial.number, params


def _failures(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> int:
    """One more failed attempt of the trial (an exit with an error, or its worker gone silent); the count so far."""
    n = int(study.trials[trial.number].user_attrs.get("failures", 0)) + 1
    study._storage.set_trial_user_attr(trial._trial_id, "failures", n)
    return n


def _retry_lost(s: Sweep, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
    """A trial whose worker went silent (no heartbeat for stale_minutes): taken over while it has retries
    left, else recorded as failed."""
    import optuna

    if _failures(study, trial) <= s.retries:
        return True
    _fail(study, trial, f"no heartbeat for {s.stale_minutes:g} min")
    _tell(study, trial.number, state=optuna.trial.TrialState.FAIL)
    return False


def _fail(study: optuna.Study, trial: optuna.trial.FrozenTrial, why: str) -> None:
    study._storage.set_trial_system_attr(trial._trial_id, "fail_reason", why)


def _claim(run_dir: Path, **extra: Any) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(run_dir / CLAIM, json.dumps({**worker_id(), **extra}))


# ---------------------------------------------------------------------------------------------- running trials


@dataclass
class Launch:
    nproc: int = 1
    cpu: bool = False
    threads: int = 0
    """CPU threads of each trial process (OMP_NUM_THREADS, unless set); 0 = torch's default (every core)."""
    slurm: bool = False
    """A worker of a SLURM job array: each trial runs on every node of the task's allocation (slurm/ranks.sh)."""


def trial_command(s: Sweep, number: int, params: dict[str, Any], launch: Launch) -> list[str]:
    from gen_dist.launch import free_port

    args = [s.config, *trial_overrides(s, number, params)]
    if launch.slurm:
        from gen_dist.slurm import ROOT

        return ["bash", str(ROOT / "slurm" / "ranks.sh"), *args, *(["train.cpu=true"] if launch.cpu else [])]
    if launch.nproc > 1:
        args = ["launch", *args, "--nproc", str(launch.nproc), "--port", str(free_port())]
    else:
        args = ["train", *args]
    return [sys.executable, "-m", "gen_dist", *args, *(["--cpu"] if launch.cpu and launch.nproc > 1 else [])]


def objective_value(s: Sweep, run_dir: Path) -> float | None:
    """The metric's last (or best) logged value in the trial's metrics.jsonl (the last record of a step wins)."""
    by_step: dict[int, float] = {}
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            rec = json.loads(line)
            if "event" not in rec and s.metric in rec:
                by_step[rec["step"]] = float(rec[s.metric])
    if not by_step:
        return None
    if s.at == "last":
        return by_step[max(by_step)]
    return (min if s.lower_is_better else max)(by_step.values())


def run_trial(s: Sweep, study: optuna.Study, number: int, params: dict[str, Any], launch: Launch,
              log: Any = print) -> str:
    """Run (or resume) one trial to its end and record the outcome in the study; returns the state recorded
    (complete, pruned, fail) or 'interrupted' when the sweep itself is stopped (the trial stays running for the
    next worker). A trial that exits with an error is resumed from its checkpoint up to `retries` times."""
    run_dir = trial_dir(s.dir, number)
    log(f"trial {number}: {' '.join(f'{k}={v}' for k, v in params.items())} -> {run_dir}")
    while True:
        code = _launch_trial(s, number, params, launch)
        ended = time.perf_counter()
        state = _record(s, study, number, params, code, log)
        BOOKKEEPING[number] = BOOKKEEPING.get(number, 0.0) + time.perf_counter() - ended
        if state != "retry":
            return state


def _launch_trial(s: Sweep, number: int, params: dict[str, Any], launch: Launch) -> int:
    run_dir = trial_dir(s.dir, number)
    env = {**os.environ, TRIAL_ENV: f"{s.dir.resolve()}#{number}"}
    if launch.threads:
        env.setdefault("OMP_NUM_THREADS", str(launch.threads))
    if launch.slurm:
        env.update(NPROC=str(launch.nproc), RDZV_ID=f"{s.name}_trial_{number}_{os.getpid()}_{time.time_ns()}")
    (run_dir / PREEMPTED).unlink(missing_ok=True)  # an earlier stop's marker, not this run's
    with open(run_dir / "trial.log", "a") as out:
        # Its own process group: the sweep stops a trial as a whole with SIGUSR1 (the agreed stop: all ranks
        # checkpoint at the same step).
        proc = subprocess.Popen(trial_command(s, number, params, launch), stdout=out, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
        _claim(run_dir, trial_pgid=proc.pid)
        RUNNING.add(proc)
        try:
            return _wait_beating(proc, run_dir, s.stale_minutes * 60)
        finally:
            RUNNING.discard(proc)


def _wait_beating(proc: subprocess.Popen, run_dir: Path, stale_s: float) -> int:
    """The trial's exit code; HUNG after stopping a trial that stopped beating its heartbeat while it ran (a
    hung collective, a stalled file system), which would otherwise hold its worker forever."""
    import signal

    started = time.time()
    while True:
        with contextlib.suppress(subprocess.TimeoutExpired):
            return proc.wait(timeout=POLL_S)
        if silent(run_dir, started, stale_s):
            _stop_group(proc.pid, signal.SIGTERM, 10)
            proc.wait()
            return HUNG


BOOKKEEPING: dict[int, float] = {}
"""Seconds the sweep spent on each trial outside the trial's own processes (claimed, recorded)."""


def _record(s: Sweep, study: optuna.Study, number: int, params: dict[str, Any], code: int, log: Any) -> str:
    """The outcome of a trial's processes in the study; 'retry' when it should run again."""
    import optuna

    run_dir = trial_dir(s.dir, number)
    trial = study.trials[number]
    if code != HUNG and (code < 0 or _was_stopped(run_dir) or (code and STOP.is_set())):
        return "interrupted"  # stopped on a signal: by the sweep, its job, or a launcher that took it first
    if (run_dir / PRUNED).is_file():
        _tell(study, number, state=optuna.trial.TrialState.PRUNED)
        return "pruned"
    value = objective_value(s, run_dir) if code == 0 else None
    if value is not None:
        _tell(study, number, values=value)
        _hparams(s, number, params, value)
        return "complete"
    why = (f"no heartbeat for {s.stale_minutes:g} min while it ran" if code == HUNG
           else f"exit code {code}" if code else f"{s.metric} was not logged")
    failures = _failures(study, trial) if code else s.retries + 1
    if failures <= s.retries:
        log(f"trial {number}: {why}; resuming it from its checkpoint ({failures}/{s.retries})")
        return "retry"
    _fail(study, trial, why)
    _tell(study, number, state=optuna.trial.TrialState.FAIL)
    log(f"trial {number}: failed ({why}); see {run_dir / 'trial.log'}")
    return "fail"


def _tell(study: optuna.Study, number: int, **outcome: Any) -> None:
    """Record a trial's outcome. Told through a sampler without after-trial hooks: the grid sampler's calls
    study.stop(), which only an optimize() loop may (and then the outcome would not be stored)."""
    import optuna

    study.sampler = optuna.samplers.RandomSampler()
    study.tell(number, **outcome)


RUNNING: set[subprocess.Popen] = set()
"""The trials this process runs now, which a stopped sweep stops first."""


def _was_stopped(run_dir: Path) -> bool:
    """The trial checkpointed and stopped on a signal (the sweep or its job is being stopped)."""
    return (run_dir / PREEMPTED).is_file()


def _hparams(s: Sweep, number: int, params: dict[str, Any], value: float) -> None:
    """The trial in TensorBoard's HParams view (SWEEP_DIR/tensorboard)."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(s.dir / "tensorboard")) as w:
        w.add_hparams({k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in params.items()},
                      {s.metric: value}, run_name=f"trial_{number:04d}")


def work(s: Sweep, launch: Launch, log: Any = print) -> bool:
    """One worker: trials until none is left to take, or until the sweep is stopped; returns whether it stopped
    a trial at a checkpoint. A worker of a SLURM array keeps its claim on that trial, so that its requeued task
    resumes it; a local one frees it at once for the next worker."""
    study = open_study(s)
    while not STOP.is_set():
        t0 = time.perf_counter()
        nxt = claim_next(s, study)
        if nxt is None:
            return False
        if nxt == WAIT:
            STOP.wait(POLL_S)
            continue
        number, params = nxt
        claimed = time.perf_counter() - t0
        state = run_trial(s, study, number, params, launch, log)
        log(f"trial {number}: {state} (sweep bookkeeping {claimed + BOOKKEEPING.pop(number, 0.0):.2f} s: claim, "
            f"outcome, records)")
        if state == "interrupted":
            run_dir = trial_dir(s.dir, number)
            if launch.slurm:
                _claim(run_dir, requeued=True)
            else:
                (run_dir / CLAIM).unlink(missing_ok=True)
            STOP.set()  # the whole worker is being stopped (or preempted): it takes no other trial
            return True
    return False


STOP = threading.Event()
"""Set when the sweep (or its job) is being stopped: its workers take no further trial."""


def run_local(s: Sweep, workers: int, launch: Launch) -> bool:
    """`gen-dist sweep SWEEP.yaml --workers K` (and each task of a SLURM array, with K = 1): K workers in this
    process, each running one trial at a time. SIGINT, SIGTERM or SIGUSR1 stops the running trials with a
    checkpoint each; the same command resumes them. Returns whether a trial was stopped so."""
    import signal

    prepare(s)
    lock = threading.Lock()

    def log(msg: str) -> None:
        with lock:
            print(f"sweep {s.name}: {msg}", flush=True)

    def stop(signum: int, frame: Any) -> None:
        log(f"{signal.Signals(signum).name}: stopping {len(RUNNING)} running trial(s) at a checkpoint")
        STOP.set()
        for proc in list(RUNNING):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGUSR1)  # the agreed stop; the launchers ignore it

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, stop)
    stopped: list[bool] = []
    threads = [threading.Thread(target=lambda: stopped.append(work(s, launch, log)), daemon=True)
               for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive():  # a join with a timeout lets the signal handlers run
            t.join(timeout=1.0)
    return any(stopped)


# ---------------------------------------------------------------------------------------------- inside a trial


class TrialLink:
    """The trainer's side of a sweep trial (GEN_DIST_TRIAL set): the main rank reports each in-training
    evaluation to the study and asks its pruner; every rank then takes the same decision."""

    def __init__(self, sweep_dir: Path, number: int) -> None:
        self.sweep = load_sweep(sweep_dir / SWEEP_FILE)
        self.sweep.dir = sweep_dir
        self.number = number

    @classmethod
    def from_env(cls) -> TrialLink | None:
        value = os.environ.get(TRIAL_ENV, "")
        if not value:
            return None
        where, number = value.rsplit("#", 1)
        return cls(Path(where), int(number))

    def should_prune(self, step: int, scores: dict[str, float]) -> bool:
        """Main rank only."""
        import optuna

        if self.sweep.pruner == "none" or self.sweep.metric not in scores:
            return False
        study = open_study(self.sweep)
        trial = optuna.trial.Trial(study, study.trials[self.number]._trial_id)
        trial.report(scores[self.sweep.metric], step)
        evals = len(study.trials[self.number].intermediate_values)
        return evals > self.sweep.warmup_evals and trial.should_prune()


# ---------------------------------------------------------------------------------------------- status and plot


def _open_existing(sweep_dir: Path) -> tuple[Sweep, optuna.Study]:
    import optuna

    kept = sweep_dir / SWEEP_FILE
    if not kept.is_file() or not (sweep_dir / JOURNAL).is_file():
        raise ConfigError(f"{sweep_dir} is not a sweep folder (no {SWEEP_FILE} and {JOURNAL})")
    s = load_sweep(kept)
    s.dir = sweep_dir
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return s, optuna.load_study(study_name=s.name, storage=_storage(sweep_dir))


def rows(sweep_dir: Path) -> tuple[Sweep, list[dict[str, Any]], dict[str, Any] | None]:
    """The sweep, one row per trial (number, state, params, value, step, total, run_dir) and the best row."""
    s, study = _open_existing(sweep_dir)
    out = []
    for t in study.get_trials(deepcopy=False):
        run_dir = trial_dir(sweep_dir, t.number)
        beat = _read(run_dir / "heartbeat.json")
        state = t.state.name.lower()
        if state == "running":
            if claim_state(run_dir, s.stale_minutes * 60) != "alive":
                state = "interrupted"
            elif _read(run_dir / CLAIM).get("requeued"):
                state = "requeued"
        out.append({"number": t.number, "state": state, "params": t.params, "value": t.value,
                    "step": beat.get("step"), "total": beat.get("total"), "run_dir": str(run_dir)})
    done = [r for r in out if r["state"] == "complete"]
    best = (min if s.lower_is_better else max)(done, key=lambda r: r["value"]) if done else None
    return s, out, best


def best_command(s: Sweep, best: dict[str, Any]) -> str:
    import shlex

    args = [s.config, *s.overrides, *(f"{k}={json.dumps(v)}" for k, v in best["params"].items())]
    return "gen-dist launch " + " ".join(shlex.quote(a) for a in args) + " --nproc N"


def format_status(sweep_dir: Path) -> str:
    s, table, best = rows(sweep_dir)
    keys = [p.key for p in s.space]
    head = ["trial", "state", *keys, s.metric, "steps", "run directory"]
    lines = []
    for r in table:
        value = "" if r["value"] is None else f"{r['value']:.6g}"
        steps = f"{r['step']}/{r['total']}" if r["step"] is not None else ""
        lines.append([str(r["number"]), r["state"], *(_short(r["params"].get(k)) for k in keys), value, steps,
                      r["run_dir"]])
    widths = [max(len(x) for x in col) for col in zip(head, *lines, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    counts = {st: sum(r["state"] == st for r in table) for st in ("complete", "pruned", "fail", "running",
                                                                  "requeued", "interrupted")}
    out = [f"sweep {s.name}: {len(table)}/{s.trials} trials ({', '.join(f'{n} {k}' for k, n in counts.items() if n)}"
           f"); objective {s.direction} {s.metric} ({s.at})", fmt.format(*head), *(fmt.format(*x) for x in lines)]
    if best is not None:
        out += [f"best: trial {best['number']}, {s.metric} = {best['value']:.6g}, run {best['run_dir']}",
                f"  {best_command(s, best)}"]
    return "\n".join(out)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def plot(sweep_dir: Path, out: Path) -> Path:
    """The objective over trials (with the best so far), and each parameter against the objective."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    s, table, _ = rows(sweep_dir)
    done = [r for r in table if r["value"] is not None]
    if not done:
        raise ConfigError(f"{sweep_dir}: no trial has finished yet, nothing to plot")
    panels = 1 + len(s.space)
    fig, axes = plt.subplots(1, panels, figsize=(4 * panels, 3.4), squeeze=False)
    ax = axes[0][0]
    xs, ys = [r["number"] for r in done], [r["value"] for r in done]
    ax.scatter(xs, ys, s=18)
    pick = min if s.lower_is_better else max
    ax.step(xs, [pick(ys[: i + 1]) for i in range(len(ys))], where="post", color="C1", label="best so far")
    for r in table:
        if r["state"] == "pruned":
            ax.axvline(r["number"], color="0.85", lw=0.8)
    ax.set(xlabel="trial", ylabel=s.metric, title=f"{s.name}: objective")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=7)
    for i, p in enumerate(s.space, start=1):
        ax = axes[0][i]
        values = [r["params"][p.key] for r in done]
        if p.kind == "categorical":
            labels = [str(c) for c in p.choices]
            ax.scatter([labels.index(str(v)) for v in values], ys, s=18)
            ax.set_xticks(range(len(labels)), labels)
        else:  # a log range as log10 on a linear axis: a narrow one has no decade to label
            ax.scatter([math.log10(v) for v in values] if p.log else values, ys, s=18)
        ax.set(xlabel=f"log10 {p.key}" if p.log and p.kind != "categorical" else p.key, ylabel=s.metric)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
