"""A trained module as a strategy wraps it: backward, gradient sync and the optimizer step under DDP, DeepSpeed
and FSDP."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as torch_dist
from torch import nn

if TYPE_CHECKING:
    from accelerate import Accelerator


class NonFiniteError(RuntimeError):
    """Training cannot go on: non-finite losses or gradients that could not be skipped."""



@contextmanager
def swapped(obj: Any, attr: str, value: Any) -> Iterator[None]:
    old = getattr(obj, attr)
    setattr(obj, attr, value)
    try:
        yield
    finally:
        setattr(obj, attr, old)


class TrainedModule:
    """A trained module with its optimizer and LR schedule, as the strategy wraps it: `wrapper` is what the
    loss calls (DDP, an FSDP root, a DeepSpeed engine), `module` the plain module inside."""

    def __init__(self, acc: Accelerator, wrapper: nn.Module, opt: Any, sched: Any) -> None:
        self.acc, self.wrapper, self.opt, self.sched = acc, wrapper, opt, sched
        self.uncompiled: Callable[[], AbstractContextManager] = nullcontext
        """Runs the module eagerly within it (set by Strategy.compile)."""
        # keep_fp32_wrapper=False drops the autocast that prepare() patches into forward: autocast is applied
        # per phase instead, so that an fp32 regulariser can opt out.
        self.module: nn.Module = acc.unwrap_model(wrapper, keep_fp32_wrapper=False)

    def set_hyperparameters(self, lr: float | None, betas: tuple[float, float] | None) -> None:
        """Values a task schedules, set in every parameter group of the optimizer before the step (under
        DeepSpeed, the groups of the optimizer its engine steps)."""
        for group in self.opt.param_groups:
            if lr is not None:
                group["lr"] = lr
            if betas is not None:
                group["betas"] = tuple(betas)

    def hyperparameters(self) -> dict[str, float]:
        """The learning rate and Adam's beta2 the next step uses."""
        group = self.opt.param_groups[0]
        return {"lr": group["lr"], "beta2": group["betas"][1]}

    def sync(self, last: bool) -> AbstractContextManager:
        """Gradient all-reduce only on the last micro-batch of an accumulation."""
        return nullcontext() if last else self.acc.no_sync(self.wrapper)

    def backward(self, loss: torch.Tensor, n_micro: int) -> None:
        self.acc.backward(loss / n_micro)

    def double_backward(self) -> AbstractContextManager:
        """Around a phase that differentiates through a gradient (R1). It runs eagerly: AOTAutograd refuses the
        double backward of many compiled graphs."""
        return self.uncompiled()

    def clip_grads(self, max_norm: float) -> torch.Tensor:
        """The gradients' total norm, after which they are clipped to `max_norm`."""
        return self.acc.clip_grad_norm_(self.wrapper.parameters(), max_norm)

    def step(self, clip: float) -> tuple[torch.Tensor, bool]:
        """Clip, step, zero; returns the gradient norm before clipping and whether the optimizer stepped.

        The norm is of the reduced gradients, so a non-finite loss or gradient on any rank makes it non-finite
        on every rank: all ranks skip the same step without another collective."""
        norm = self.clip_grads(clip or float("inf")).detach().float()
        finite = bool(torch.isfinite(norm))
        if finite or (self.acc.scaler is not None and self.acc.scaler.is_enabled()):
            self.opt.step()  # under fp16 loss scaling the scaler skips a non-finite step and lowers its scale
        self.opt.zero_grad(set_to_none=True)
        return norm, finite


class DeepSpeedTrainedModule(TrainedModule):
    """A DeepSpeed engine: it reduces, clips and steps by itself at the accumulation boundary."""

    skipped = False

    def sync(self, last: bool) -> AbstractContextManager:
        return nullcontext()

    def backward(self, loss: torch.Tensor, n_micro: int) -> None:
        # The engine steps inside its own step() and cannot take a step back, so a non-finite loss on any rank
        # is caught before backward (one all-reduce of a flag) and all ranks skip the phase together.
        bad = torch.tensor(0.0 if bool(torch.isfinite(loss)) else 1.0, device=loss.device)
        if self.acc.num_processes > 1:
            torch_dist.all_reduce(bad, op=torch_dist.ReduceOp.MAX)
        if bad.item() or self.skipped:
            if n_micro > 1:
                raise NonFiniteError("non-finite loss during gradient accumulation under DeepSpeed, whose engine "
                                     "cannot drop the micro-batches it has taken; resume from the last checkpoint")
            self.skipped = True
            return
        self.wrapper.backward(loss)  # scaled by 1/gradient_accumulation_steps inside
        self.wrapper.step()  # a no-op until the last micro-batch

    def step(self, clip: float) -> tuple[torch.Tensor, bool]:
        if self.skipped:
            self.skipped = False
            return torch.tensor(float("nan")), False
        norm = torch.as_tensor(self.wrapper.get_global_grad_norm() or 0.0, dtype=torch.float32).detach()
        if not bool(torch.isfinite(norm)):
            raise NonFiniteError("non-finite gradient norm under DeepSpeed after the engine stepped (the weights "
                                 "are no longer usable); resume from the last checkpoint")
        return norm, True


class FSDPTrainedModule(TrainedModule):
    def clip_grads(self, max_norm: float) -> torch.Tensor:
        # accelerate finds the FSDP module of the parameters by comparing parameter lists with `==`, which
        # compares tensors (and fails) when two trained modules have as many parameters; the norm is taken here.
        from torch.distributed.tensor import DTensor
        from torch.nn.utils import clip_grads_with_norm_, get_total_norm

        self.acc.unscale_gradients()
        params = [p for p in self.wrapper.parameters() if p.grad is not None]
        norm = get_total_norm([p.grad for p in params])
        norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
        if max_norm != float("inf"):
            clip_grads_with_norm_(params, max_norm, norm)
        return norm

    @contextmanager
    def double_backward(self) -> Iterator[None]:
        # FSDP2 frees the unsharded weights after the first backward; the second needs them again.
        from torch.distributed.fsdp import FSDPModule

        shards = [m for m in self.wrapper.modules() if isinstance(m, FSDPModule)]
        for m in shards:
            m.set_reshard_after_backward(False)
        try:
            with self.uncompiled():
                yield
        finally:
            for m in shards:
                m.reshard()
                m.set_reshard_after_backward(True)

