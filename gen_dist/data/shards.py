"""The shard format: the index of a packed dataset, a piece of a shard, and a sample's fields decoded (the image
resized and cropped, the label, the caption)."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

INDEX = "index.json"
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp")


class DataError(ValueError):
    """A dataset that cannot be read or packed as asked."""


def load_index(path: Path) -> dict:
    f = Path(path) / INDEX
    if not f.exists():
        raise DataError(f"no {INDEX} in {path}: pack a dataset first with `gen-dist data ...`")
    return json.loads(f.read_text())


@dataclass(frozen=True)
class Piece:
    """Samples [start, end) of one shard (a path or URL); only the offsets in `keep` when it is given."""

    file: str
    start: int
    end: int
    keep: frozenset[int] | None = None

    @property
    def count(self) -> int:
        return self.end - self.start if self.keep is None else len(self.keep)


LATENT = "latent.npy"


def decode_latent(sample: dict[str, Any]) -> np.ndarray:
    if LATENT not in sample:
        raise DataError(f"no {LATENT} in the sample")
    return np.load(io.BytesIO(sample[LATENT]), allow_pickle=False).astype(np.float32, copy=False)


@dataclass(frozen=True)
class Fields:
    """Which members of a sample hold what, and how its image becomes the model's input."""

    channels: int
    resolution: int
    image: tuple[str, ...] = IMAGE_EXTS
    """The image is the first of these members found."""
    label: str = "cls"
    """The class label: a member holding an integer (cls), `json:KEY` (a field of the sample's .json), or empty."""
    caption: str = ""
    """The caption: a text member (txt), `json:KEY`, or empty (none read)."""
    crop: str = "center"
    """After resizing the shorter side to the resolution: center or random."""
    min_size: int = 0
    """Images whose shorter side is below this are skipped (counted with the bad samples)."""
    templates: tuple[str, ...] = ()
    """Without a caption member: captions made from the class, one of these drawn per sample (`{class}`)."""
    class_names: tuple[str, ...] = ()
    """What `{class}` becomes for each class."""


class SmallImage(DataError):
    """An image below data.min_size: skipped, not broken."""


def decode_image(sample: dict[str, Any], fields: Fields, rng: np.random.Generator | None = None) -> np.ndarray:
    """uint8 C x H x W: the shorter side resized to the resolution, then a center crop (a random one with `rng`
    and crop=random)."""
    return fit_image(sample, fields, (fields.resolution, fields.resolution), rng)[0]


def fit_image(sample: dict[str, Any], fields: Fields, size: tuple[int, int],
              rng: np.random.Generator | None = None) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """(uint8 C x H x W of `size` (height, width), (original height, original width, crop top, crop left)): the
    image resized to cover `size`, then cropped to it at the center (at random with `rng` and crop=random); the
    crop's offsets are in the resized image, as SDXL's micro-conditioning takes them."""
    ext = next((e for e in fields.image if e in sample), None)
    if ext is None:
        raise DataError(f"no image ({', '.join(fields.image)}) in the sample")
    th, tw = size
    img = Image.open(io.BytesIO(sample[ext]))
    w, h = original = img.size
    if fields.min_size and min(w, h) < fields.min_size:
        raise SmallImage(f"{w}x{h} image is below data.min_size {fields.min_size}")
    scale = max(th / h, tw / w)
    if img.format == "JPEG" and scale <= 0.5:
        img.draft(img.mode, (tw, th))  # JPEG decodes at a power-of-two fraction of its size, still covering
    img = img.convert("L" if fields.channels == 1 else "RGB")
    top = left = 0
    if img.size != (tw, th):
        scale = max(th / img.size[1], tw / img.size[0])
        w, h = max(tw, round(img.size[0] * scale)), max(th, round(img.size[1] * scale))
        img = img.resize((w, h), Image.BICUBIC)
        if (w, h) != (tw, th):
            random = fields.crop == "random" and rng is not None
            left = int(rng.integers(w - tw + 1)) if random else (w - tw) // 2
            top = int(rng.integers(h - th + 1)) if random else (h - th) // 2
            img = img.crop((left, top, left + tw, top + th))
    arr = np.asarray(img, dtype=np.uint8)
    return (arr[None] if fields.channels == 1 else arr.transpose(2, 0, 1)), (original[1], original[0], top, left)


def image_size(sample: dict[str, Any], fields: Fields) -> tuple[int, int]:
    """(width, height) of a sample's image from its header alone; (0, 0) where there is none or it does not
    parse (the sample is reported as bad when it is trained on)."""
    ext = next((e for e in fields.image if e in sample), None)
    try:
        return Image.open(io.BytesIO(sample[ext])).size if ext else (0, 0)
    except Exception:  # noqa: BLE001 - any header that does not parse
        return (0, 0)


def _member(sample: dict[str, Any], key: str) -> Any:
    """A member's value, or a field of the sample's .json for `json:FIELD`; None where it is missing."""
    if key.startswith("json:"):
        raw = sample.get("json")
        return None if raw is None else json.loads(raw).get(key.removeprefix("json:"))
    return sample.get(key)


def label_of(sample: dict[str, Any], classes: int, key: str = "cls") -> int:
    raw = _member(sample, key) if key else None
    if raw is None:
        if classes:
            raise DataError(f"no class label ({key or 'data.label_key is empty'}) in a dataset with classes")
        return -1
    label = int(raw)
    if classes and not 0 <= label < classes:
        raise DataError(f"class label {label} outside 0..{classes - 1}")
    return label


def caption_of(sample: dict[str, Any], key: str) -> str:
    raw = _member(sample, key)
    if raw is None:
        raise DataError(f"no caption ({key}) in the sample")
    return (raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)).strip()
