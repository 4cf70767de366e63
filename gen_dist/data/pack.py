"""Packing images into shards: IDX files (MNIST, Fashion-MNIST), image folders, scikit-learn's digits, and latents
encoded by a first stage."""

from __future__ import annotations

import gzip
import io
import json
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image

from gen_dist.data.catalog import open_catalog
from gen_dist.data.reader import read_pieces
from gen_dist.data.shards import IMAGE_EXTS, INDEX, LATENT, DataError, Fields, Piece, decode_image, load_index


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def write_shards(samples: Iterable[tuple[bytes, str, int]], out: Path, split: str, shard_size: int) -> dict:
    """Write (image bytes, extension, label) samples into `split-NNNNNN.tar` shards; return the split entry."""
    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, Any]] = []
    writer, count, total = None, 0, 0
    for i, (data, ext, label) in enumerate(samples):
        if writer is None or count == shard_size:
            if writer is not None:
                writer.close()
                shards[-1]["count"] = count
            name = f"{split}-{len(shards):06d}.tar"
            writer, count = wds.TarWriter(str(out / name), encoder=False), 0
            shards.append({"file": name, "count": 0})
        writer.write({"__key__": f"{split}{i:08d}", ext: data, "cls": str(label).encode()})
        count += 1
        total += 1
    if writer is not None:
        writer.close()
        shards[-1]["count"] = count
    if total == 0:
        raise DataError(f"no samples to write for split '{split}'")
    return {"count": total, "shards": shards}


def update_index(out: Path, split: str, entry: dict, channels: int, classes: list[str]) -> None:
    path = out / INDEX
    index = json.loads(path.read_text()) if path.exists() else {"format": "gen_dist.shards.v1", "splits": {}}
    index.update(channels=channels, classes=classes)
    index["splits"][split] = entry
    path.write_text(json.dumps(index, indent=1))


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a numpy array."""
    if path.suffix == ".gz":
        with gzip.open(path) as f:
            raw = f.read()
    else:
        raw = path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if raw[2] not in dtypes:
        raise DataError(f"{path}: unknown IDX element type 0x{raw[2]:02x}")
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    arr = np.frombuffer(raw, dtype=dtypes[raw[2]], offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise DataError(f"{path}: IDX header says {shape} but the file holds {arr.size} values")
    return arr.reshape(shape)


def _array_samples(images: np.ndarray, labels: np.ndarray) -> Iterator[tuple[bytes, str, int]]:
    for img, label in zip(images, labels, strict=True):
        yield _png(img), "png", int(label)


def pack_arrays(images: np.ndarray, labels: np.ndarray, out: Path, split: str, shard_size: int,
                classes: list[str]) -> dict:
    """Pack uint8 images (N,H,W) or (N,H,W,C) with integer labels."""
    if images.dtype != np.uint8:
        raise DataError(f"images must be uint8, got {images.dtype}")
    if len(images) != len(labels):
        raise DataError(f"{len(images)} images but {len(labels)} labels")
    channels = 1 if images.ndim == 3 else images.shape[3]
    entry = write_shards(_array_samples(images, labels), out, split, shard_size)
    update_index(out, split, entry, channels, classes)
    return entry


def pack_idx_dir(src: Path, out: Path, shard_size: int, only: list[int] | None = None) -> dict[str, dict]:
    """Pack every `<prefix>-images-idx3-ubyte[.gz]` with its `<prefix>-labels-idx1-ubyte[.gz]` in `src`, of
    the classes `only` where given (labels kept as they are).

    The split is named after the prefix (`t10k` becomes `test`)."""
    found = sorted(src.glob("*-images-idx3-ubyte*"))
    if not found:
        raise DataError(f"no '*-images-idx3-ubyte[.gz]' files in {src}")
    done = {}
    for img_path in found:
        prefix, rest = img_path.name.split("-images-idx3-ubyte", 1)
        lab_path = src / f"{prefix}-labels-idx1-ubyte{rest}"
        if not lab_path.exists():
            raise DataError(f"{img_path} has no labels file {lab_path.name}")
        split = {"t10k": "test"}.get(prefix, prefix)
        images, labels = read_idx(img_path), read_idx(lab_path)
        classes = [str(c) for c in range(int(labels.max()) + 1)]
        if only:
            unknown = sorted(set(only) - set(range(len(classes))))
            if unknown:
                raise DataError(f"--classes {unknown}: {img_path.name} has classes 0..{len(classes) - 1}")
            keep = np.isin(labels, only)
            images, labels = images[keep], labels[keep]
        done[split] = pack_arrays(np.ascontiguousarray(images), labels, out, split, shard_size, classes)
    return done


def pack_image_folder(src: Path, out: Path, split: str, shard_size: int, channels: int) -> dict:
    """Pack a folder of images; with class sub-folders (`src/<class>/*.png`) their names become labels."""
    files = sorted(p for p in src.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTS and p.is_file())
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_EXTS)}) under {src}")
    nested = all(len(p.relative_to(src).parts) > 1 for p in files)
    classes = sorted({p.relative_to(src).parts[0] for p in files}) if nested else []

    def samples() -> Iterator[tuple[bytes, str, int]]:
        for p in files:
            label = classes.index(p.relative_to(src).parts[0]) if nested else -1
            yield p.read_bytes(), p.suffix.lower().lstrip("."), label

    entry = write_shards(samples(), out, split, shard_size)
    update_index(out, split, entry, channels, classes)
    return entry


def pack_digits(out: Path, shard_size: int, test_fraction: float = 0.2) -> dict[str, dict]:
    """Pack scikit-learn's 8x8 digits (1,797 images, shipped inside its wheel)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("the 'digits' source needs scikit-learn: pip install scikit-learn") from None
    d = load_digits()
    images = np.clip(d.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
    n_test = int(len(images) * test_fraction)
    classes = [str(c) for c in range(10)]
    return {
        "train": pack_arrays(images[n_test:], d.target[n_test:], out, "train", shard_size, classes),
        "test": pack_arrays(images[:n_test], d.target[:n_test], out, "test", shard_size, classes),
    }


def write_latent_shards(root: Path, split: str, out: Path, encode: Any, about: dict[str, Any]) -> dict:
    """Encode every image of `split` of `root` with `encode` (uint8 N C H W -> float N C h w, in chunks) into
    shards of the same names, sizes and keys under `out`, so that a stream over them yields the same samples
    in the same order; `about` (the first stage) goes into the index."""
    index = load_index(root)
    entry = index["splits"][split]
    out.mkdir(parents=True, exist_ok=True)
    fields = Fields(about.get("channels", index.get("channels", 1)), about["resolution"])
    for shard, found in zip(entry["shards"], open_catalog(str(root), split).shards, strict=True):
        samples = list(read_pieces([Piece(found.url, 0, found.count)]))
        images = np.stack([decode_image(s, fields) for s in samples])
        latents = np.concatenate([encode(images[i : i + 256]) for i in range(0, len(images), 256)])
        tmp = out / (shard["file"] + ".tmp")
        with wds.TarWriter(str(tmp), encoder=False) as writer:
            for sample, z in zip(samples, latents, strict=True):
                buf = io.BytesIO()
                np.save(buf, z.astype(np.float32))
                kept = {k: v for k, v in sample.items() if not k.startswith("__") and k not in IMAGE_EXTS}
                writer.write({"__key__": sample["__key__"], LATENT: buf.getvalue(), **kept})
        tmp.replace(out / shard["file"])
    path = out / INDEX
    found = json.loads(path.read_text()) if path.exists() else {"format": "gen_dist.shards.v1", "splits": {}}
    found.update(channels=index.get("channels", 1), classes=index.get("classes", []), latents=about)
    found["splits"][split] = entry
    path.write_text(json.dumps(found, indent=1))
    return entry
