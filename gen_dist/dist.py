"""All rank logic lives here: who prints, how stats are reduced, and how the process group ends."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist
from accelerate import Accelerator
from accelerate.state import PartialState


def whole_pretrained_loads() -> None:
    """While Accelerate has a ZeRO-3 DeepSpeed config registered, transformers' from_pretrained builds every
    model partitioned over the ranks (deepspeed.zero.Init); the frozen models gen_dist loads (text encoders, CLIP)
    must load whole on each rank, outside the engine. Called before each such load: Accelerate may register its
    config again."""
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


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


def from_main(acc: Accelerator, make: Callable[[], Any]) -> Any:
    """`make()` run by the main rank alone (resolving a data source once, say): its result on every rank, or its
    exception raised on every rank."""
    result: tuple[Any, Exception | None] = (None, None)
    if is_main():
        try:
            result = (make(), None)
        except Exception as e:  # noqa: BLE001 - handed to every rank below
            result = (None, e)
    value, error = all_objects(acc, result)[0]
    if error is not None:
        raise error
    return value


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


class Watchdog:
    """Where this rank is in the loop (step and part), and a thread that says so on stderr when the rank has
    stayed there for nearly the process group's timeout: NCCL's own watchdog then aborts the process without a
    Python error, so this is the one report of where each rank was stuck."""

    def __init__(self, timeout_s: float, rank: int) -> None:
        self.timeout_s, self.rank = timeout_s, rank
        self.step, self.part, self.since = 0, "start-up", time.monotonic()
        self.warned = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True, name="gen_dist-watchdog")
        self._thread.start()

    def mark(self, step: int, part: str) -> None:
        self.step, self.part, self.since, self.warned = step, part, time.monotonic(), False

    @property
    def where(self) -> str:
        return f"step {self.step}, {self.part}"

    def _watch(self) -> None:
        while not self._stop.wait(min(30.0, self.timeout_s / 10)):
            stuck = time.monotonic() - self.since
            if stuck > 0.75 * self.timeout_s and not self.warned:
                self.warned = True
                print(f"gen_dist rank {self.rank}: no progress for {stuck / 60:.1f} min at {self.where} (the process "
                      f"group gives up after parallel.timeout_minutes={self.timeout_s / 60:g}); another rank may be "
                      f"stuck or dead", file=sys.stderr, flush=True)

    def failure(self, error: BaseException) -> str:
        """The message of an error raised in the loop, with the rank and where it happened."""
        hint = ""
        if "timed out" in str(error).lower() or "timeout" in type(error).__name__.lower():
            hint = (f" (a collective waited parallel.timeout_minutes={self.timeout_s / 60:g} for another rank; see "
                    f"the README's troubleshooting section)")
        return f"rank {self.rank} failed at {self.where}{hint}: {type(error).__name__}: {error}"

    def close(self) -> None:
        self._stop.set()


def free_port() -> int:
    """A TCP port free on this host now (for a rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
