"""Differentiable augmentation of the images a GAN's discriminator sees (DiffAugment's ops, applied per sample
with probability p as in adaptive augmentation).

Each op draws its parameters and its per-sample decision for every sample from torch's global RNG whatever p
is, so the draws are fixed by the engine's seed of the loss call. Every op is indexing, masking or an affine
map of pixel values: gradients reach G through it, and R1 differentiates through it twice."""

from __future__ import annotations

from collections.abc import Callable

import torch

TRANSLATE = 1 / 8
"""Largest shift, as a fraction of the image side."""
CUTOUT = 1 / 2
"""Side of the cut-out square, as a fraction of the image side."""


def _uniform(n: int, x: torch.Tensor) -> torch.Tensor:
    """One U[0, 1) draw per sample, shaped to broadcast over an image batch."""
    return torch.rand(n, 1, 1, 1, device=x.device, dtype=x.dtype)


def translation(x: torch.Tensor) -> torch.Tensor:
    """Shift each image by whole pixels (up to TRANSLATE of its side each way), zero-filling what comes in."""
    n, c, h, w = x.shape
    sy, sx = max(1, round(h * TRANSLATE)), max(1, round(w * TRANSLATE))
    ty = torch.randint(-sy, sy + 1, (n, 1, 1), device=x.device)
    tx = torch.randint(-sx, sx + 1, (n, 1, 1), device=x.device)
    src_y = torch.arange(h, device=x.device).view(1, h, 1) - ty
    src_x = torch.arange(w, device=x.device).view(1, 1, w) - tx
    inside = (src_y >= 0) & (src_y < h) & (src_x >= 0) & (src_x < w)
    index = (src_y.clamp(0, h - 1) * w + src_x.clamp(0, w - 1)).view(n, 1, h * w).expand(n, c, h * w)
    moved = torch.gather(x.flatten(2), 2, index).view(n, c, h, w)
    return moved * inside.unsqueeze(1).to(x.dtype)


def cutout(x: torch.Tensor) -> torch.Tensor:
    """Zero a square of side CUTOUT x the image side at a random place (it may stick out of the image)."""
    n, _, h, w = x.shape
    size_y, size_x = max(1, round(h * CUTOUT)), max(1, round(w * CUTOUT))
    y0 = torch.randint(0, h, (n, 1, 1), device=x.device) - size_y // 2
    x0 = torch.randint(0, w, (n, 1, 1), device=x.device) - size_x // 2
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    hole = (ys >= y0) & (ys < y0 + size_y) & (xs >= x0) & (xs < x0 + size_x)
    return x * (~hole).unsqueeze(1).to(x.dtype)


def color(x: torch.Tensor) -> torch.Tensor:
    """Brightness (+U[-0.5, 0.5)), saturation (x U[0, 2) about the channel mean; a no-op on one channel) and
    contrast (x U[0.5, 1.5) about the image mean), on images in [-1, 1]."""
    n = x.shape[0]
    x = x + (_uniform(n, x) - 0.5)
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (_uniform(n, x) * 2) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_uniform(n, x) + 0.5) + mean


OPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"translation": translation, "cutout": cutout,
                                                           "color": color}


def parse(spec: str) -> tuple[str, ...]:
    """The op names of a comma list ('' = none), in order; unknown names raise ValueError."""
    names = tuple(s.strip() for s in spec.split(",") if s.strip())
    unknown = [s for s in names if s not in OPS]
    if unknown:
        raise ValueError(f"unknown augmentation {unknown[0]!r} (choose from {', '.join(OPS)})")
    return names


def augment(x: torch.Tensor, ops: tuple[str, ...], p: float | torch.Tensor) -> torch.Tensor:
    """Apply each op in turn to each sample with probability `p` (a number or a 0-dim tensor, which may live
    on another device than `x`: no host sync). At p = 0 the images come back unchanged, at p = 1 every op
    applies to every sample."""
    for name in ops:
        changed = OPS[name](x)
        chosen = torch.rand(x.shape[0], device=x.device) < p
        x = torch.where(chosen.view(-1, 1, 1, 1), changed, x)
    return x
