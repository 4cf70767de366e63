"""Which worker runs which trial: claim files under a lock, and taking over a trial whose worker is gone."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gen_dist.monitor import pid_exists, read_json
from gen_dist.schema import write_atomic
from gen_dist.sweep.spec import Sweep
from gen_dist.sweep.study import count_failure, make_sampler, mark_failed, suggest, tell, trial_dir

if TYPE_CHECKING:
    import optuna

CLAIM = "claim.json"


@contextlib.contextmanager
def locked(sweep_dir: Path) -> Iterator[None]:
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


def read(path: Path) -> dict[str, Any]:
    return read_json(path) or {}


def claim_state(run_dir: Path, stale_s: float, now: float | None = None) -> str:
    """Whether the worker that claimed this trial still runs it: 'alive'; 'gone' when its process is known to
    have ended (on this host, or this same SLURM array task in an earlier run of it); 'stale' when neither the
    trial's heartbeat nor the claim is younger than `stale_s` (a worker on another host, or a requeued task
    that has not come back)."""
    claim = read(run_dir / CLAIM)
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
    beat = read(run_dir / "heartbeat.json")
    limit = max(stale_s, 5 * float(beat.get("log_every_s") or 0))
    return (now or time.time()) - max(since, float(beat.get("time") or 0)) > limit


def stop_group(group: int, sig: int, grace_s: float) -> None:
    """Signal a trial's process group, then SIGKILL whatever is left of it after `grace_s`."""
    import signal

    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, sig)
        deadline = time.time() + grace_s
        while time.time() < deadline:
            os.killpg(group, 0)
            time.sleep(0.2)
        os.killpg(group, signal.SIGKILL)


def stop_leftover(run_dir: Path) -> None:
    """A trial whose worker died may still be training on this host: stop it (it checkpoints) before another
    worker resumes the trial, so that two never write one run directory."""
    import signal

    claim = read(run_dir / CLAIM)
    group = claim.get("trial_pgid")
    if group and claim.get("host") == socket.gethostname():
        stop_group(group, signal.SIGUSR1, 120)  # the agreed stop; the launchers ignore it and outlive their ranks


WAIT = "wait"


def claim_next(s: Sweep, study: optuna.Study) -> tuple[int, dict[str, Any]] | str | None:
    """(number, params) of the trial this worker runs next: one left by a worker that is gone, else a new one
    while the sweep has trials left. WAIT when none is free but other workers still run trials (one of them may
    go quiet and need taking over); None when the sweep is done."""
    import optuna

    with locked(s.dir):
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
            stop_leftover(run_dir)
            claim(run_dir)
            return t.number, t.params
        if len(trials) >= s.trials:
            return WAIT if held else None
        study.sampler = make_sampler(s, s.seed + len(trials))
        trial = study.ask()
        params = suggest(trial, s.space)
        claim(trial_dir(s.dir, trial.number))
        return trial.number, params


def _retry_lost(s: Sweep, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
    """A trial whose worker went silent (no heartbeat for stale_minutes): taken over while it has retries
    left, else recorded as failed."""
    import optuna

    if count_failure(study, trial) <= s.retries:
        return True
    mark_failed(study, trial, f"no heartbeat for {s.stale_minutes:g} min")
    tell(study, trial.number, state=optuna.trial.TrialState.FAIL)
    return False


def claim(run_dir: Path, **extra: Any) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(run_dir / CLAIM, json.dumps({**worker_id(), **extra}))
