"""The shard format and reading it: the index of a packed dataset, raw samples of shard pieces, decoding."""

from __future__ import annotations

import io
import itertools
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from webdataset import tariterators

from gen_dist.schema import ConfigError, RunConfig

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
    """Samples [start, end) of one shard; only the offsets in `keep` when it is given."""

    file: str
    start: int
    end: int
    keep: frozenset[int] | None = None

    @property
    def count(self) -> int:
        return self.end - self.start if self.keep is None else len(self.keep)


def _group_key(fname: str) -> tuple[str, str]:
    base, _, ext = fname.partition(".")
    return base, ext


def read_pieces(root: Path, pieces: list[Piece], problems: list[tuple[str, int]] | None = None
                ) -> Iterator[dict[str, Any]]:
    """Raw (undecoded) samples of each piece in order. An unreadable or short shard raises a DataError or,
    with a `problems` list, is reported there as (message, samples lost) and reading goes on."""
    for piece in pieces:
        path, n = root / piece.file, 0
        try:
            with open(path, "rb") as f:
                files = tariterators.tar_file_expander([{"url": str(path), "stream": f}])
                samples = tariterators.group_by_keys(files, keys=_group_key)
                for i, sample in enumerate(itertools.islice(samples, piece.start, piece.end), piece.start):
                    if piece.keep is None or i in piece.keep:
                        n += 1
                        yield sample
            error = "" if n == piece.count else "the shard ends early"
        except (OSError, tarfile.TarError, ValueError) as e:
            error = f"{type(e).__name__}: {e.args[0] if e.args else e}"
        if error:
            message = f"{path}: unreadable after {n} of the {piece.count} samples to read ({error})"
            if problems is None:
                raise DataError(message)
            problems.append((message, piece.count - n))


LATENT = "latent.npy"


def decode_latent(sample: dict[str, Any]) -> np.ndarray:
    if LATENT not in sample:
        raise DataError(f"no {LATENT} in the sample")
    return np.load(io.BytesIO(sample[LATENT]), allow_pickle=False).astype(np.float32, copy=False)


def decode_image(sample: dict[str, Any], channels: int, resolution: int) -> np.ndarray:
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        raise DataError(f"no image ({', '.join(IMAGE_EXTS)}) in the sample")
    img = Image.open(io.BytesIO(sample[ext])).convert("L" if channels == 1 else "RGB")
    if img.size != (resolution, resolution):
        img = img.resize((resolution, resolution), Image.BICUBIC)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


def label_of(sample: dict[str, Any], classes: int) -> int:
    raw = sample.get("cls")
    if raw is None:
        if classes:
            raise DataError("no class label (.cls) in a dataset with classes")
        return -1
    label = int(raw)
    if classes and not 0 <= label < classes:
        raise DataError(f"class label {label} outside 0..{classes - 1}")
    return label


def check_split(root: Path, split: str, world_size: int, workers: int, batch_size: int) -> dict:
    """The index, once checked that its split can feed `world_size` ranks x `workers` readers (a DataError
    naming the fix otherwise)."""
    index = load_index(root)
    if split not in index["splits"]:
        raise DataError(f"split '{split}' not in {root / INDEX} (has: {', '.join(index['splits'])})")
    entry = index["splits"][split]
    missing = [s["file"] for s in entry["shards"] if not (root / s["file"]).is_file()]
    if missing:
        raise DataError(f"{len(missing)} shard(s) of '{split}' listed in {root / INDEX} are missing: "
                        f"{', '.join(missing[:5])}")
    shards, total = len(entry["shards"]), int(entry["count"])
    if shards < world_size * workers:
        # Readers would start inside shards that others read too, each re-reading the skipped part.
        raise DataError(f"'{split}' of {root} has {shards} shards for {world_size} ranks x {workers} workers "
                        f"= {world_size * workers} readers; repack with more shards (gen-dist data ... "
                        f"--shard-size N) or lower data.num_workers")
    if total // world_size < batch_size:
        raise DataError(f"{total} samples in '{split}' cannot fill one batch of {batch_size} on each of "
                        f"{world_size} ranks: lower data.batch_size")
    return index


def split_pieces(shards: list[dict], start: int, size: int) -> list[Piece]:
    """Samples [start, start + size) of a split (its index entry's shards), in index order."""
    pieces, offset = [], 0
    for shard in shards:
        lo, hi = max(start, offset), min(start + size, offset + shard["count"])
        if lo < hi:
            pieces.append(Piece(shard["file"], lo - offset, hi - offset))
        offset += shard["count"]
    return pieces


def split_images(cfg: RunConfig, split: dict, start: int, size: int) -> torch.Tensor:
    """Images [start, start + size) of a split of data.path in index order (uint8, N C H W, no augmentation);
    `split` is its index entry."""
    d = cfg.data
    raw = read_pieces(Path(d.path), split_pieces(split["shards"], start, size))
    return torch.from_numpy(np.stack([decode_image(s, d.channels, d.resolution) for s in raw]))


def reference_images(cfg: RunConfig, start: int, size: int) -> torch.Tensor:
    """Images [start, start + size) of `eval.reference_split`."""
    return split_images(cfg, reference_split(cfg), start, size)


def reference_split(cfg: RunConfig) -> dict:
    """The index entry of `eval.reference_split`, which must exist."""
    e, root = cfg.eval, Path(cfg.data.path)
    splits = load_index(root)["splits"]
    if e.reference_split not in splits:
        raise ConfigError(f"eval.reference_split '{e.reference_split}' is not in {root} "
                          f"(splits: {', '.join(sorted(splits))})")
    return splits[e.reference_split]
