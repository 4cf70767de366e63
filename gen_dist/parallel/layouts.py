"""Where a rank's part of each weight lives under each strategy, and how whole weights are gathered."""

from __future__ import annotations

import torch
import torch.distributed as torch_dist
from torch import nn

from gen_dist.parallel.trained import trained_named_parameters


class Replicated:
    """Every rank holds whole parameters (DDP, ZeRO 1/2)."""

    def local(self, p: torch.Tensor) -> torch.Tensor:
        return p

    def gather(self, params: list[torch.Tensor], parts: list[torch.Tensor]) -> list[torch.Tensor]:
        return [t.detach().clone() for t in parts]

    def scatter(self, params: list[torch.Tensor], full: list[torch.Tensor]) -> list[torch.Tensor]:
        return full


class Zero3Partitions:
    """ZeRO-3: each rank holds a flat, end-padded 1/world slice of every parameter (`p.ds_tensor`)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.rank, self.world = torch_dist.get_rank(), torch_dist.get_world_size()

    def local(self, p: torch.Tensor) -> torch.Tensor:
        return p.ds_tensor

    def gather(self, params: list[torch.Tensor], parts: list[torch.Tensor]) -> list[torch.Tensor]:
        sizes = [t.numel() for t in parts]
        flat = torch.cat([t.detach().reshape(-1).float() for t in parts]).to(self.device)
        out = [torch.empty_like(flat) for _ in range(self.world)]
        torch_dist.all_gather(out, flat)  # one collective for the whole module
        pieces = [o.split(sizes) for o in out]
        return [torch.cat([r[i] for r in pieces])[: p.ds_numel].view(p.ds_shape).cpu()
                for i, p in enumerate(params)]

    def scatter(self, params: list[torch.Tensor], full: list[torch.Tensor]) -> list[torch.Tensor]:
        parts = []
        for p, f in zip(params, full, strict=True):
            n = p.ds_tensor.numel()
            part = torch.zeros(n, dtype=torch.float32)
            piece = f.reshape(-1)[self.rank * n : (self.rank + 1) * n]
            part[: piece.numel()] = piece
            parts.append(part)
        return parts


class FSDP2Shards:
    """FSDP2: parameters are DTensors sharded on dim 0; this rank's shard is `to_local()`."""

    def local(self, p: torch.Tensor) -> torch.Tensor:
        return p.to_local()

    def gather(self, params: list[torch.Tensor], parts: list[torch.Tensor]) -> list[torch.Tensor]:
        from torch.distributed.tensor import DTensor

        return [DTensor.from_local(t.detach().to(p.dtype), p.device_mesh, p.placements, shape=p.shape,
                                   stride=p.stride()).full_tensor().cpu() for p, t in zip(params, parts, strict=True)]

    def scatter(self, params: list[torch.Tensor], full: list[torch.Tensor]) -> list[torch.Tensor]:
        from torch.distributed.tensor import distribute_tensor

        return [distribute_tensor(f.to(p.device, p.dtype), p.device_mesh, p.placements).to_local()
                for p, f in zip(params, full, strict=True)]


WeightLayout = Replicated | Zero3Partitions | FSDP2Shards
"""Where a rank's part of each weight lives, and how the whole weights are gathered from the parts."""


def saved_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    """The buffers a state dict holds (not the non-persistent ones, which the module computes itself, such as
    a DiT's position embedding)."""
    return {f"{prefix}.{name}".lstrip("."): b for prefix, m in module.named_modules() for name, b in m._buffers.items()
            if b is not None and name not in m._non_persistent_buffers_set}


def full_state_dict(module: nn.Module, layout: WeightLayout) -> dict[str, torch.Tensor]:
    """Whole fp32 weights and buffers of `module` on every rank (a collective under sharding); of a module that
    trains some of its parameters, those."""
    names, params = zip(*trained_named_parameters(module), strict=True)
    full = layout.gather(list(params), [layout.local(p) for p in params])
    out = {n: t.detach().float().cpu() for n, t in zip(names, full, strict=True)}
    out.update({n: b.detach().cpu().clone() for n, b in saved_buffers(module).items()})
    return out

