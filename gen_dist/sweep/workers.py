"""Running trials: a worker takes trials one after another and runs each as an ordinary run in its own process
group, recording the outcome in the study; `run_local` runs K workers."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gen_dist.dist import free_port
from gen_dist.launch import ROOT
from gen_dist.monitor import PREEMPTED
from gen_dist.sweep.claims import CLAIM, WAIT, claim, claim_next, silent, stop_group
from gen_dist.sweep.spec import Sweep
from gen_dist.sweep.study import count_failure, mark_failed, open_study, prepare, tell, trial_dir, trial_overrides
from gen_dist.sweep.trial import PRUNED, TRIAL_ENV

if TYPE_CHECKING:
    import optuna

REQUEUE_EXIT = 75
"""A SLURM sweep worker's exit code after stopping its trial at a checkpoint: the job script requeues the task."""
HUNG = 124
"""The outcome code of a trial stopped by its worker because its heartbeat went stale while it ran."""
POLL_S = 2.0


@dataclass
class Launch:
    nproc: int = 1
    cpu: bool = False
    threads: int = 0
    """CPU threads of each trial process (OMP_NUM_THREADS, unless set); 0 = torch's default (every core)."""
    slurm: bool = False
    """A worker of a SLURM job array: each trial runs on every node of the task's allocation (slurm/ranks.sh)."""


def trial_command(s: Sweep, number: int, params: dict[str, Any], launch: Launch) -> list[str]:
    args = [s.config, *trial_overrides(s, number, params)]
    if launch.slurm:
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
        claim(run_dir, trial_pgid=proc.pid)
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
            stop_group(proc.pid, signal.SIGTERM, 10)
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
        tell(study, number, state=optuna.trial.TrialState.PRUNED)
        return "pruned"
    value = objective_value(s, run_dir) if code == 0 else None
    if value is not None:
        tell(study, number, values=value)
        _hparams(s, number, params, value)
        return "complete"
    why = (f"no heartbeat for {s.stale_minutes:g} min while it ran" if code == HUNG
           else f"exit code {code}" if code else f"{s.metric} was not logged")
    failures = count_failure(study, trial) if code else s.retries + 1
    if failures <= s.retries:
        log(f"trial {number}: {why}; resuming it from its checkpoint ({failures}/{s.retries})")
        return "retry"
    mark_failed(study, trial, why)
    tell(study, number, state=optuna.trial.TrialState.FAIL)
    log(f"trial {number}: failed ({why}); see {run_dir / 'trial.log'}")
    return "fail"


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
                claim(run_dir, requeued=True)
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
