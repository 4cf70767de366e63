"""What the loop keeps between steps, and what it is told from outside: the counters a checkpoint carries, the
metrics window between log records, the LR schedule, and the supervisor a run may have."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

BEST = "best.json"
"""train.keep_best: the best value of the metric, its step and the checkpoint kept for it."""


class Supervisor(Protocol):
    """Something outside the run that follows its evaluations and may end it early, as a sweep's pruner does.
    The main rank asks it after each in-training evaluation; every rank takes its answer. A run it ends stops
    like a preempted one (a checkpoint, the marker `<status>.json` naming it, the tracker closed with `status`)."""

    status: str
    """The status of a run it ended (e.g. pruned)."""

    def should_stop(self, step: int, scores: dict[str, float]) -> bool:
        """Main rank only: whether the run ends after this evaluation."""
        ...


def lr_factor(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    """Multiplier of the base LR at a step: linear warmup from 0, then constant, linear decay to 0 or a half
    cosine to 0 at `total` (the schedules of diffusers' get_scheduler, without importing diffusers)."""

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == "linear":
            return max(0.0, 1 - progress)
        if schedule == "cosine":
            return max(0.0, 0.5 * (1 + math.cos(math.pi * progress)))
        return 1.0

    return factor


class MetricWindow:
    """Stats accumulated between two log records; stays on device until logged (no per-step sync)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.totals: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = defaultdict(int)
        self.wait = self.elapsed = 0.0
        self.steps = 0

    def add(self, stats: dict[str, torch.Tensor], wait: float, elapsed: float) -> None:
        for k, v in stats.items():
            self.totals[k] = self.totals[k] + v if k in self.totals else v.clone()
            self.counts[k] += 1
        self.wait, self.elapsed, self.steps = self.wait + wait, self.elapsed + elapsed, self.steps + 1

    def summary(self, global_batch: int) -> dict[str, float]:
        out = {k: (self.totals[k] / self.counts[k]).item() for k in sorted(self.totals)}
        out["images_per_s"] = global_batch * self.steps / self.elapsed
        out["data_wait_frac"] = self.wait / self.elapsed
        return out



@dataclass
class TrainState:
    """Counters of a run that a checkpoint carries (the data position is its own part)."""

    step: int = 0
    images: int = 0
    """Training images consumed over all ranks."""
    nonfinite: int = 0
    """Consecutive steps with a phase skipped for a non-finite loss or gradient."""
    best: dict[str, Any] | None = None
    """train.keep_best: the best value so far, its step and checkpoint."""

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "images": self.images, "nonfinite": self.nonfinite, "best": self.best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.images, self.nonfinite = state["step"], state["images"], state["nonfinite"]
        self.best = state.get("best")
