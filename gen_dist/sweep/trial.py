"""A sweep trial as its trainer sees it: the supervisor that reports each evaluation to the study and asks its
pruner."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from gen_dist.monitor import halt_marker
from gen_dist.sweep.spec import load_kept
from gen_dist.sweep.study import open_study

if TYPE_CHECKING:
    pass

TRIAL_ENV = "GEN_DIST_TRIAL"
"""Set for a trial's processes: SWEEP_DIR#NUMBER, so that the trainer can report to the study and be pruned."""


PRUNED = halt_marker("pruned")
"""The marker of a trial its pruner stopped (written by the trainer)."""


class TrialLink:
    """The trainer's side of a sweep trial (GEN_DIST_TRIAL set): the main rank reports each in-training
    evaluation to the study and asks its pruner; every rank then takes the same decision. It is the trainer's
    `Supervisor` of the run."""

    status = "pruned"

    def __init__(self, sweep_dir: Path, number: int) -> None:
        self.sweep = load_kept(sweep_dir)
        self.number = number

    @classmethod
    def from_env(cls) -> TrialLink | None:
        value = os.environ.get(TRIAL_ENV, "")
        if not value:
            return None
        where, number = value.rsplit("#", 1)
        return cls(Path(where), int(number))

    def should_stop(self, step: int, scores: dict[str, float]) -> bool:
        """Main rank only: whether the pruner stops the trial after this evaluation."""
        import optuna

        if self.sweep.pruner == "none" or self.sweep.metric not in scores:
            return False
        study = open_study(self.sweep)
        trial = optuna.trial.Trial(study, study.trials[self.number]._trial_id)
        trial.report(scores[self.sweep.metric], step)
        evals = len(study.trials[self.number].intermediate_values)
        return evals > self.sweep.warmup_evals and trial.should_prune()
