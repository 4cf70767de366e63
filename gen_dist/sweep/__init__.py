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

from gen_dist.sweep.claims import CLAIM, WAIT, claim_next, worker_id
from gen_dist.sweep.report import best_command, format_status, plot, rows
from gen_dist.sweep.spec import SWEEP_FILE, Param, Sweep, load_kept, load_sweep
from gen_dist.sweep.study import open_study, prepare, trial_dir
from gen_dist.sweep.trial import PRUNED, TrialLink
from gen_dist.sweep.workers import REQUEUE_EXIT, Launch, run_local

__all__ = ["CLAIM", "PRUNED", "REQUEUE_EXIT", "SWEEP_FILE", "WAIT", "Launch", "Param", "Sweep", "TrialLink",
           "best_command", "claim_next", "format_status", "load_kept", "load_sweep", "open_study", "plot", "prepare",
           "rows", "run_local", "trial_dir", "worker_id"]
