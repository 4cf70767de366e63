"""What a task declares to the engine: its modules, its phases, and how to sample."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

Batch = Mapping[str, torch.Tensor]
Nets = Mapping[str, nn.Module]
LossFn = Callable[[Nets, Batch, int], tuple[torch.Tensor, dict[str, torch.Tensor]]]
"""(nets, batch, step) -> (loss to minimise, detached stats). `nets[phase.module]` is the wrapped trained module."""


@dataclass
class Phase:
    name: str
    """Name used in metrics (e.g. 'D', 'G', 'D_r1')."""
    module: str
    """The module this phase trains; its optimizer steps and it alone has requires_grad."""
    loss: LossFn
    every: int = 1
    """Run at steps where step % every == 0 (lazy regularisation)."""
    autocast: bool = True
    """Run under mixed-precision autocast; regularisers with double backward run in fp32."""
    double_backward: bool = False
    """The loss differentiates through a gradient (create_graph=True), e.g. R1."""


class Task:
    """A model family. Subclasses fill `modules`, `phases` and `ema_module`, and implement `sample`."""

    modules: dict[str, nn.Module]
    phases: list[Phase]
    ema_module: str
    num_classes: int = 0
    generates: bool = True
    """False for the classifier that evaluation uses: nothing to sample."""

    @torch.no_grad()
    def sample(self, net: nn.Module, labels: torch.Tensor | None, n: int,
               generator: torch.Generator) -> torch.Tensor:
        """`n` images in [-1, 1] from `net` (the EMA or raw copy of `ema_module`)."""
        raise NotImplementedError

    def sample_labels(self, n: int, device: torch.device) -> torch.Tensor | None:
        """Grid labels: one class per row of ten when conditional."""
        if not self.num_classes:
            return None
        return torch.arange(n, device=device) % self.num_classes
