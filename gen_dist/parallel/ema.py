"""The EMA of a trained module, held in the strategy's weight layout."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from gen_dist.parallel.layouts import WeightLayout, saved_buffers
from gen_dist.parallel.trained import trained_named_parameters


def warmed_decay(decay: float) -> Callable[[int], float]:
    """train.ema_decay with warm-up, min(decay, (1 + n) / (10 + n)) after n updates: early averages are not
    dominated by the initial weights."""
    return lambda n: min(decay, (1 + n) / (10 + n))


class EMA:
    """Exponential moving average of a module's parameters, held in fp32 in the layout the strategy stores them
    in (this rank's partition under ZeRO-3 and FSDP), so it costs no more memory per rank than the weights. `beta`
    gives the decay of the update after n earlier ones."""

    def __init__(self, module: nn.Module, beta: Callable[[int], float], layout: WeightLayout) -> None:
        self.module, self.beta, self.layout = module, beta, layout
        self.names = [n for n, _ in trained_named_parameters(module)]  # a frozen base has no average
        self.params = [p for _, p in trained_named_parameters(module)]
        self.shadow = [layout.local(p).detach().float().clone() for p in self.params]
        self.buffers = {n: b.detach().clone() for n, b in saved_buffers(module).items()}
        self.updates = 0

    @torch.no_grad()
    def update(self, decay: float | None = None) -> None:
        """One update, with `beta`'s decay or the one given (a half-life the task schedules)."""
        d = self.beta(self.updates) if decay is None else decay
        torch._foreach_lerp_(self.shadow, [self.layout.local(p).float() for p in self.params], 1 - d)
        for n, b in saved_buffers(self.module).items():
            self.buffers[n].copy_(b)
        self.updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Consolidated EMA weights, keyed like the module's own state dict (a collective under sharding)."""
        full = self.layout.gather(self.params, self.shadow)
        out = {n: t.cpu() for n, t in zip(self.names, full, strict=True)}
        out.update({n: b.cpu().clone() for n, b in self.buffers.items()})
        return out

    def meta_state(self) -> dict[str, int]:
        """What a checkpoint's meta file keeps of the EMA (its weights go to their own file)."""
        return {"updates": self.updates}

    def load(self, weights_file: Path, meta_state: dict[str, int]) -> None:
        from safetensors.torch import load_file

        self.load_state_dict(load_file(str(weights_file)), meta_state["updates"])

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor], updates: int) -> None:
        missing = [n for n in [*self.names, *self.buffers] if n not in state]
        if missing:
            raise ValueError(f"EMA state lacks {missing[:5]}")
        parts = self.layout.scatter(self.params, [state[n] for n in self.names])
        for s, part in zip(self.shadow, parts, strict=True):
            s.copy_(part.to(s.device))
        for n, b in self.buffers.items():
            b.copy_(state[n].to(b.device))
        self.updates = updates

