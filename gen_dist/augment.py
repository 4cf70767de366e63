"""Differentiable augmentation of the images a GAN's discriminator sees, applied per sample with probability p as
in adaptive augmentation: DiffAugment's ops (translation with zero fill, cutout, color) and ADA's geometric ones
(x-flip, 90-degree rotations, integer translation with reflection, isotropic and anisotropic scaling, rotation).

Each op draws its parameters and its per-sample decision for every sample from torch's global RNG whatever p
is, so the draws are fixed by the engine's seed of the loss call. Every op is indexing, masking, an affine map
of pixel values or a bilinear resampling (which is linear in the pixels): gradients reach G through it, and R1
and R2 differentiate through it twice. Consecutive scaling and rotation ops are composed into one matrix and
resampled once (reflection at the borders), so chaining them does not blur twice."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

TRANSLATE = 1 / 8
"""Largest shift, as a fraction of the image side (translation and xint)."""
SCALE_STD = 0.2
"""Std of log2 of the scale factor (scale, aniso), as ADA draws it."""
CUTOUT = 1 / 2
"""Side of the cut-out square, as a fraction of the image side."""


def _uniform(n: int, x: torch.Tensor) -> torch.Tensor:
    """One U[0, 1) draw per sample, shaped to broadcast over an image batch."""
    return torch.rand(n, 1, 1, 1, device=x.device, dtype=x.dtype)


def _coords(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column indices of the output pixels, shaped (1, h, 1) and (1, 1, w)."""
    h, w = x.shape[-2:]
    return torch.arange(h, device=x.device).view(1, h, 1), torch.arange(w, device=x.device).view(1, 1, w)


def _gather(x: torch.Tensor, src_y: torch.Tensor, src_x: torch.Tensor) -> torch.Tensor:
    """Output pixel (i, j) of each sample taken from input pixel (src_y, src_x) (in range; (n, h, w) maps)."""
    n, c, h, w = x.shape
    index = (src_y * w + src_x).expand(n, h, w).reshape(n, 1, h * w).expand(n, c, h * w)
    return torch.gather(x.flatten(2), 2, index).view(n, c, h, w)


def _shifts(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole-pixel shifts of up to TRANSLATE of each side, each way, per sample."""
    n, _, h, w = x.shape
    sy, sx = max(1, round(h * TRANSLATE)), max(1, round(w * TRANSLATE))
    return (torch.randint(-sy, sy + 1, (n, 1, 1), device=x.device),
            torch.randint(-sx, sx + 1, (n, 1, 1), device=x.device))


def translation(x: torch.Tensor) -> torch.Tensor:
    """Shift each image by whole pixels (up to TRANSLATE of its side each way), zero-filling what comes in."""
    h, w = x.shape[-2:]
    ty, tx = _shifts(x)
    ys, xs = _coords(x)
    src_y, src_x = ys - ty, xs - tx
    inside = (src_y >= 0) & (src_y < h) & (src_x >= 0) & (src_x < w)
    moved = _gather(x, src_y.clamp(0, h - 1), src_x.clamp(0, w - 1))
    return moved * inside.unsqueeze(1).to(x.dtype)


def _reflect(i: torch.Tensor, size: int) -> torch.Tensor:
    """Indices mirrored back into [0, size) (shifts are smaller than the side)."""
    return (size - 1) - ((size - 1) - i.abs()).abs()


def xint(x: torch.Tensor) -> torch.Tensor:
    """ADA's integer translation: whole-pixel shifts of up to TRANSLATE of each side, reflected at the borders."""
    h, w = x.shape[-2:]
    ty, tx = _shifts(x)
    ys, xs = _coords(x)
    return _gather(x, _reflect(ys - ty, h), _reflect(xs - tx, w))


def xflip(x: torch.Tensor) -> torch.Tensor:
    """Mirror left-right (drawn per sample: half of the chosen samples flip)."""
    flip = torch.rand(x.shape[0], 1, 1, 1, device=x.device) < 0.5
    return torch.where(flip, x.flip(-1), x)


def rotate90(x: torch.Tensor) -> torch.Tensor:
    """Rotate by 0, 90, 180 or 270 degrees (square images)."""
    n, _, h, w = x.shape
    if h != w:
        raise ValueError(f"rotate90 needs square images, got {h}x{w}")
    k = torch.randint(0, 4, (n, 1, 1), device=x.device)
    ys, xs = _coords(x)
    ys, xs = ys.expand(n, h, w), xs.expand(n, h, w)
    last = h - 1
    src_y = torch.where(k == 0, ys, torch.where(k == 1, xs, torch.where(k == 2, last - ys, last - xs)))
    src_x = torch.where(k == 0, xs, torch.where(k == 1, last - ys, torch.where(k == 2, last - xs, ys)))
    return _gather(x, src_y, src_x)


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


def scale(n: int, device: torch.device) -> torch.Tensor:
    """Isotropic scaling matrices, log2 of the factor ~ N(0, SCALE_STD)."""
    s = torch.exp2(torch.randn(n, device=device) * SCALE_STD)
    return torch.diag_embed(torch.stack([s, s], dim=1))


def aniso(n: int, device: torch.device) -> torch.Tensor:
    """Anisotropic scaling: x by s and y by 1/s, log2 s ~ N(0, SCALE_STD)."""
    s = torch.exp2(torch.randn(n, device=device) * SCALE_STD)
    return torch.diag_embed(torch.stack([s, 1 / s], dim=1))


def rotate(n: int, device: torch.device) -> torch.Tensor:
    """Rotation by an angle uniform in [-180, 180) degrees."""
    a = (torch.rand(n, device=device) * 2 - 1) * math.pi
    cos, sin = a.cos(), a.sin()
    return torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)


def _warp(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Each image resampled (bilinear, reflected at the borders) through its 2x2 matrix about the centre."""
    theta = torch.cat([matrix, torch.zeros(x.shape[0], 2, 1, device=x.device)], dim=2).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


OPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "translation": translation, "cutout": cutout, "color": color, "xflip": xflip, "rotate90": rotate90,
    "xint": xint}
AFFINE: dict[str, Callable[[int, torch.device], torch.Tensor]] = {"scale": scale, "aniso": aniso, "rotate": rotate}
"""Ops given as a matrix per sample: consecutive ones are composed and resampled once."""


def parse(spec: str) -> tuple[str, ...]:
    """The op names of a comma list ('' = none), in order; unknown names raise ValueError."""
    names = tuple(s.strip() for s in spec.split(",") if s.strip())
    unknown = [s for s in names if s not in OPS and s not in AFFINE]
    if unknown:
        raise ValueError(f"unknown augmentation {unknown[0]!r} (choose from {', '.join([*OPS, *AFFINE])})")
    return names


def augment(x: torch.Tensor, ops: tuple[str, ...], p: float | torch.Tensor) -> torch.Tensor:
    """Apply each op in turn to each sample with probability `p` (a number or a 0-dim tensor, which may live
    on another device than `x`: no host sync). At p = 0 the images come back unchanged, at p = 1 every op
    applies to every sample."""
    n = x.shape[0]
    pending: list[torch.Tensor] = []  # (matrices, chosen) of the affine ops since the last resampling
    for name in ops:
        if name in AFFINE:
            pending.append(AFFINE[name](n, x.device))
            pending.append(torch.rand(n, device=x.device) < p)
            continue
        x, pending = _resample(x, pending), []
        changed = OPS[name](x)
        chosen = torch.rand(n, device=x.device) < p
        x = torch.where(chosen.view(-1, 1, 1, 1), changed, x)
    return _resample(x, pending)


def _resample(x: torch.Tensor, pending: list[torch.Tensor]) -> torch.Tensor:
    """`x` through the composed matrices of the chosen affine ops; samples none of them chose stay as they are."""
    if not pending:
        return x
    n = x.shape[0]
    matrix, chosen_any = torch.eye(2, device=x.device).expand(n, 2, 2), torch.zeros(n, dtype=torch.bool,
                                                                                   device=x.device)
    for drawn, chosen in zip(pending[::2], pending[1::2], strict=True):
        matrix = torch.where(chosen.view(-1, 1, 1), drawn, torch.eye(2, device=x.device)) @ matrix
        chosen_any |= chosen
    return torch.where(chosen_any.view(-1, 1, 1, 1), _warp(x, matrix), x)
