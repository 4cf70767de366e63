"""Image grids and arrays with PIL/numpy only."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> floats in [-1, 1], the range models train and sample in (the inverse of `quantize`)."""
    return images.float() / 127.5 - 1


def quantize(images: torch.Tensor) -> torch.Tensor:
    """(N,C,H,W) floats in [-1, 1] -> uint8 of the same shape, on the same device."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_hwc(images: torch.Tensor) -> np.ndarray:
    """(N,C,H,W) uint8 tensor (from `quantize`) -> (N,H,W,C) uint8 array, as grids and .npz files hold them."""
    return images.cpu().permute(0, 2, 3, 1).numpy()


def grid(images: np.ndarray, nrow: int = 0, pad: int = 2) -> Image.Image:
    """Tile (N,H,W,C) uint8 images into one image, `nrow` per row (default: square-ish)."""
    n, h, w, c = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    canvas = np.zeros((ncol * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.uint8)
    for i, img in enumerate(images):
        r, k = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + k * (w + pad)
        canvas[y : y + h, x : x + w] = img
    return Image.fromarray(canvas[..., 0] if c == 1 else canvas)


def save_images(images: np.ndarray, out: Path, nrow: int = 0) -> None:
    """Write a grid PNG, or with a .npz suffix the raw uint8 array under the key 'images'."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npz":
        np.savez_compressed(out, images=images)
    else:
        grid(images, nrow).save(out)
