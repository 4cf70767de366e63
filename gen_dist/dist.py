"""All rank logic lives here: who prints, how stats are reduced, and how the process group ends."""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist
from accelerate import Accelerator
from accelerate.state import PartialState


def is_main() -> bool:
    """True on global rank 0 (and before any process group exists)."""
    return PartialState().process_index == 0 if PartialState._shared_state else True


def print0(*args: Any, file: Any = None) -> None:
    if is_main():
        print(*args, file=file, flush=True)


def derive_seed(*parts: int) -> int:
    """A seed derived from integers such as (seed, step, micro-batch): a resumed run, or one that splits the
    global batch differently over ranks and accumulation, draws the same randomness as the original."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def mean_across_ranks(acc: Accelerator, stats: dict[str, float]) -> dict[str, float]:
    """Average scalar stats over ranks (one all-reduce for all keys)."""
    return _reduce_stats(acc, stats, torch_dist.ReduceOp.SUM, divisor=acc.num_processes)


def max_across_ranks(acc: Accelerator, stats: dict[str, float]) -> dict[str, float]:
    """The largest value of each scalar stat over ranks (e.g. peak memory: the rank closest to running out)."""
    return _reduce_stats(acc, stats, torch_dist.ReduceOp.MAX)


def _reduce_stats(acc: Accelerator, stats: dict[str, float], op: Any, divisor: int = 1) -> dict[str, float]:
    """One all-reduce of every stat (in sorted key order, the same on every rank), divided by `divisor`."""
    if acc.num_processes == 1 or not stats:
        return dict(stats)
    keys = sorted(stats)
    t = torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64, device=acc.device)
    torch_dist.all_reduce(t, op=op)
    return dict(zip(keys, (t / divisor).tolist(), strict=True))


def sum_across_ranks(acc: Accelerator, t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over ranks in place (and return it)."""
    if acc.num_processes > 1:
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.SUM)
    return t


def gather_cat(acc: Accelerator, t: torch.Tensor) -> torch.Tensor:
    """Concatenate a same-shaped tensor from every rank, in rank order."""
    return acc.gather(t.contiguous()) if acc.num_processes > 1 else t


class StopRequest:
    """SIGUSR1/SIGTERM (preemption, a time limit ahead, scancel --signal) set a flag on the rank that gets them;
    `agreed` makes it every rank's decision at the same step boundary, so all ranks stop after the same step."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum = 0
        self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def agreed(self, acc: Accelerator) -> int:
        """The signal number if any rank got one (0 otherwise), on every rank: one small all-reduce."""
        if acc.num_processes == 1:
            return self.signum
        flag = torch.tensor([float(self.signum)], device=acc.device)
        torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MAX)
        return int(flag.item())

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def all_objects(acc: Accelerator, obj: Any) -> list[Any]:
    """A picklable object from every rank, in rank order, on every rank."""
    if acc.num_processes == 1:
        return [obj]
    out: list[Any] = [None] * acc.num_processes
    torch_dist.all_gather_object(out, obj)
    return out


def first_error(acc: Accelerator, error: str) -> str:
    """The first non-empty error message of any rank, on every rank (all ranks then take the same branch)."""
    return next((e for e in all_objects(acc, error) if e), "")


def shutdown(acc: Accelerator | None) -> None:
    """End trackers and the process group in an orderly way, on every rank.

    Letting the interpreter tear gloo down at exit occasionally aborts the process after training succeeded."""
    if acc is not None:
        acc.wait_for_everyone()
        acc.end_training()
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.barrier()
        torch_dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()


def hard_exit(code: int) -> None:
    """Exit without running interpreter teardown (atexit handlers of libraries that hold threads)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
