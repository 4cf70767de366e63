"""Aspect-ratio buckets: the named tables of (height, width) per base resolution, and each image's bucket.

- `sdxl`: the 40 buckets SDXL was trained on at 1024 (sides multiples of 64, ratios 1:4 to 4:1);
- `pixart`: PixArt-alpha's ratio tables at 256, 512 and 1024 and PixArt-Sigma's at 2048 (read from diffusers);
- `ladder`: generated at the base resolution's pixel count, sides multiples of `multiple`, ratios up to
  `max_ratio` (kohya's and SimpleTuner's construction).

An image belongs to the bucket nearest to its aspect ratio (in log ratio), is resized to cover it and cropped
to it; its original size and the crop's offsets travel with it (SDXL's micro-conditioning)."""

from __future__ import annotations

import numpy as np

from gen_dist.data.shards import DataError

# SDXL (Podell et al. 2023, appendix): (height, width) at 1024.
SDXL_1024 = [(512, 2048), (512, 1984), (512, 1920), (512, 1856), (576, 1792), (576, 1728), (576, 1664), (640, 1600),
             (640, 1536), (704, 1472), (704, 1408), (704, 1344), (768, 1344), (768, 1280), (832, 1216), (832, 1152),
             (896, 1152), (896, 1088), (960, 1088), (960, 1024), (1024, 1024)]
SDXL_1024 += [(w, h) for h, w in reversed(SDXL_1024[:-1])]

TABLES = ("sdxl", "pixart", "ladder")


def _pixart(resolution: int) -> list[tuple[int, int]]:
    from diffusers.pipelines.pixart_alpha import pipeline_pixart_alpha as alpha
    from diffusers.pipelines.pixart_alpha import pipeline_pixart_sigma as sigma

    found = getattr(sigma if resolution == 2048 else alpha, f"ASPECT_RATIO_{resolution}_BIN", None)
    if found is None:
        raise DataError(f"data.buckets=pixart has tables at 256, 512, 1024 and 2048, not at data.resolution "
                        f"{resolution}")
    return [(int(h), int(w)) for h, w in found.values()]


def ladder(resolution: int, multiple: int, max_ratio: float) -> list[tuple[int, int]]:
    """Every (height, width) with sides multiples of `multiple`, at most resolution^2 pixels and as close to it
    as the multiple allows, their ratio within 1:max_ratio .. max_ratio:1."""
    if multiple <= 0 or resolution % multiple:
        raise DataError(f"data.bucket_multiple {multiple} must divide data.resolution {resolution}")
    if max_ratio < 1:
        raise DataError(f"data.bucket_max_ratio {max_ratio} must be at least 1")
    area, out = resolution * resolution, set()
    for w in range(multiple, int(resolution * max_ratio**0.5) + multiple, multiple):
        h = area // w // multiple * multiple
        if h >= multiple and max(h / w, w / h) <= max_ratio:
            out |= {(h, w), (w, h)}
    return sorted(out, key=lambda s: s[0] / s[1])


def bucket_table(name: str, resolution: int, multiple: int = 64, max_ratio: float = 4.0) -> list[tuple[int, int]]:
    """The (height, width) buckets of table `name` at base `resolution`, ordered by aspect ratio h/w."""
    if name == "sdxl":
        if resolution != 1024:
            raise DataError(f"data.buckets=sdxl is SDXL's table at 1024, not at data.resolution {resolution} "
                            f"(data.buckets=ladder makes one at any resolution)")
        table = SDXL_1024
    elif name == "pixart":
        table = _pixart(resolution)
    elif name == "ladder":
        table = ladder(resolution, multiple, max_ratio)
    else:
        raise DataError(f"data.buckets: unknown table '{name}' (known: {', '.join(TABLES)})")
    return sorted(set(table), key=lambda s: s[0] / s[1])


def assign(sizes: np.ndarray, table: list[tuple[int, int]]) -> np.ndarray:
    """The bucket of each image from its (width, height): nearest aspect ratio in log space. An image whose size
    is unknown (0) goes to the bucket nearest to square; it is reported as bad when read."""
    ratios = np.log(np.array([h / w for h, w in table]))
    w, h = sizes[:, 0].astype(np.float64), sizes[:, 1].astype(np.float64)
    known = (w > 0) & (h > 0)
    log_r = np.where(known, np.log(np.where(known, h, 1) / np.where(known, w, 1)), 0.0)
    return np.abs(log_r[:, None] - ratios[None, :]).argmin(axis=1).astype(np.int32)
