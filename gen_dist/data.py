"""Datasets as sharded WebDataset tar files: packing, and a resumable, rank- and worker-split stream.

Layout of a packed dataset directory::

    index.json                  {"channels", "classes", "splits": {name: {"count", "shards": [{file, count}]}}}
    train-000000.tar ...        WebDataset samples: <key>.png (or .jpg ...) and <key>.cls

A latent dataset (`gen-dist data latents`) has the same shards, keys and labels with <key>.latent.npy (float32
C H W) in place of the image, and a "latents" entry in its index naming the first stage that encoded it.

Each epoch the shard order is permuted (seed, epoch), the concatenated samples are cut into one contiguous
range per (rank, worker) slot, and every rank takes the same number of batches. Ranges may start inside a
shard, so any number of shards works with any number of slots, and no rank ever waits on another for data.
The stream position is (epoch, batches consumed in the epoch): everything else is derived from the seed.
When the layout (ranks, workers, batch size, shuffle buffer) changes mid-epoch, the samples the earlier
layout consumed are found by replaying its split and shuffle, and the rest of the epoch is cut among the
new slots the same way.
"""

from __future__ import annotations

import gzip
import io
import itertools
import json
import struct
import sys
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset import tariterators

INDEX = "index.json"
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp")


class DataError(ValueError):
    """A dataset that cannot be read or packed as asked."""


# ----------------------------------------------------------------------------------------------- packing


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


def pack_idx_dir(src: Path, out: Path, shard_size: int) -> dict[str, dict]:
    """Pack every `<prefix>-images-idx3-ubyte[.gz]` with its `<prefix>-labels-idx1-ubyte[.gz]` in `src`.

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


def load_index(path: Path) -> dict:
    f = Path(path) / INDEX
    if not f.exists():
        raise DataError(f"no {INDEX} in {path}: pack a dataset first with `gen-dist data ...`")
    return json.loads(f.read_text())


# ----------------------------------------------------------------------------------------------- reading


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


@dataclass(frozen=True)
class ReadLayout:
    """How an epoch is read: ranks x loader workers per rank, batch size and shuffle buffer per worker."""

    world: int
    workers: int
    batch: int
    buffer: int

    def to_list(self) -> list[int]:
        return [self.world, self.workers, self.batch, self.buffer]


@dataclass(frozen=True)
class Segment:
    """A finished part of an epoch: `consumed` batches per rank read under `layout`."""

    layout: ReadLayout
    consumed: int


@dataclass
class DataPosition:
    """Where the stream of a run stands: epoch, batches consumed per rank in it since the read layout last
    changed, and the earlier parts of the epoch read under other layouts. A checkpoint carries it."""

    epoch: int = 0
    batch: int = 0
    done: tuple[Segment, ...] = ()

    def state_dict(self, layout: ReadLayout) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch": self.batch, "layout": layout.to_list(),
                "done": [{"layout": d.layout.to_list(), "consumed": d.consumed} for d in self.done]}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], layout: ReadLayout) -> tuple[DataPosition, ReadLayout | None]:
        """The position to continue from under `layout`, and the saved layout where it differs (then the rest
        of the epoch is spread anew over the new ranks and workers)."""
        done = tuple(Segment(ReadLayout(*d["layout"]), d["consumed"]) for d in state["done"])
        saved = ReadLayout(*state["layout"])
        if saved == layout:
            return cls(state["epoch"], state["batch"], done), None
        if state["batch"]:
            done = (*done, Segment(saved, state["batch"]))
        return cls(state["epoch"], 0, done), saved

    def next_epoch(self) -> None:
        self.epoch, self.batch, self.done = self.epoch + 1, 0, ()


class BadSamples:
    """Unusable samples met by this rank since the last log record: reported on stderr as they come, then
    handed to the log record (counted over ranks, listed per rank)."""

    def __init__(self, rank: int) -> None:
        self.rank, self.count, self.reports = rank, 0, []

    def note(self, batch: dict[str, Any]) -> None:
        if batch["bad_count"]:
            self.count += batch["bad_count"]
            self.reports += batch["bad"]
            for message in batch["bad"]:
                print(f"[rank {self.rank}] bad data: {message}", file=sys.stderr, flush=True)

    def take(self) -> tuple[int, list[str]]:
        out = self.count, self.reports
        self.count, self.reports = 0, []
        return out


def batch_sizes(total: int, world: int, workers: int, batch: int) -> list[list[list[int]]]:
    """sizes[rank][worker] = the batch sizes that worker delivers in an epoch, using every sample once.

    Every rank takes the same number of steps and, step by step, the same batch size up to one sample (so no
    rank waits in a collective and gradients are weighted alike): full batches, then one partial batch per
    worker; a remainder smaller than the worker count is folded into last batches one sample each."""
    n, extra = divmod(total, world)
    if n < workers:
        raise DataError(f"{total} samples cannot give each of {world} ranks x {workers} workers a sample")
    full, rest = divmod(n, workers * batch)
    sizes = [[batch] * full for _ in range(workers)]
    if rest >= workers:
        for w in range(workers):
            sizes[w].append(rest // workers + (w < rest % workers))
    else:
        for w in range(rest):
            sizes[w][-1] += 1
    out = [[list(s) for s in sizes] for _ in range(world)]
    for r in range(extra):
        out[r][-1][-1] += 1
    return out


def delivered(worker: int, workers: int, batches: int) -> int:
    """Batches that a rank's worker has delivered when the rank has consumed `batches` (round-robin order)."""
    return len(range(worker, batches, workers))


def _seed(seed: int, epoch: int, slot: int, segment: int, *more: int) -> list[int]:
    return [seed, epoch, slot, *more] + ([segment] if segment else [])


def epoch_shards(shards: list[tuple[str, int]], seed: int, epoch: int) -> tuple[list[tuple[str, int]], np.ndarray]:
    """The epoch's shard order and the position of each shard's first sample in the concatenated sequence."""
    order = np.random.default_rng([seed, epoch, 0x5EED]).permutation(len(shards))
    ordered = [shards[i] for i in order]
    return ordered, np.cumsum([0] + [n for _, n in ordered[:-1]])


def to_pieces(positions: np.ndarray, ordered: list[tuple[str, int]], starts: np.ndarray) -> list[Piece]:
    """Sorted positions of the epoch's sample sequence as runs inside shards."""
    if len(positions) == 0:
        return []
    shard = np.searchsorted(starts, positions, side="right") - 1
    cuts = np.flatnonzero(np.diff(shard)) + 1
    pieces = []
    for part, i in zip(np.split(positions, cuts), shard[np.concatenate([[0], cuts])], strict=True):
        offsets = part - starts[i]
        lo, hi = int(offsets[0]), int(offsets[-1]) + 1
        pieces.append(Piece(ordered[i][0], lo, hi, None if hi - lo == len(offsets) else frozenset(offsets.tolist())))
    return pieces


def split_slots(avail: np.ndarray, layout: ReadLayout) -> tuple[list[list[list[int]]], list[np.ndarray]]:
    """(batch sizes [rank][worker], positions per (rank, worker) slot): `avail` cut into consecutive ranges."""
    sizes = batch_sizes(len(avail), layout.world, layout.workers, layout.batch)
    bounds = np.cumsum([0] + [sum(w) for r in sizes for w in r])
    return sizes, [avail[a:b] for a, b in itertools.pairwise(bounds)]


def remaining(total: int, done: list[Segment], seed: int, epoch: int) -> np.ndarray:
    """Positions of the epoch's sample sequence that the finished segments `done` did not consume.

    Replays each segment's split and shuffle on positions alone (no shard is read)."""
    avail = np.arange(total)
    for s, seg in enumerate(done):
        sizes, slots = split_slots(avail, seg.layout)
        used: list[int] = []
        for j, pos in enumerate(slots):
            r, w = divmod(j, seg.layout.workers)
            n = sum(sizes[r][w][: delivered(w, seg.layout.workers, seg.consumed)])
            rng = np.random.default_rng(_seed(seed, epoch, j, s))
            used += itertools.islice(shuffled(pos.tolist(), seg.layout.buffer, rng), n)
        avail = np.setdiff1d(avail, np.asarray(used, dtype=np.int64))
    return avail


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


def shuffled(samples: Iterable[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    """Reservoir-style shuffle buffer driven by `rng` (deterministic for a given seed)."""
    buf: list[Any] = []
    for s in samples:
        if len(buf) < size:
            buf.append(s)
            continue
        j = int(rng.integers(size))
        buf[j], s = s, buf[j]
        yield s
    order = rng.permutation(len(buf))
    for j in order:
        yield buf[j]


LATENT = "latent.npy"


def decode_latent(sample: dict[str, Any]) -> np.ndarray:
    if LATENT not in sample:
        raise DataError(f"no {LATENT} in the sample")
    return np.load(io.BytesIO(sample[LATENT]), allow_pickle=False).astype(np.float32, copy=False)


def write_latent_shards(root: Path, split: str, out: Path, encode: Any, about: dict[str, Any]) -> dict:
    """Encode every image of `split` of `root` with `encode` (uint8 N C H W -> float N C h w, in chunks) into
    shards of the same names, sizes and keys under `out`, so that a stream over them yields the same samples
    in the same order; `about` (the first stage) goes into the index."""
    index = load_index(root)
    entry = index["splits"][split]
    out.mkdir(parents=True, exist_ok=True)
    for shard in entry["shards"]:
        samples = list(read_pieces(root, [Piece(shard["file"], 0, shard["count"])]))
        channels = index.get("channels", 1)
        images = np.stack([decode_image(s, channels, about["resolution"]) for s in samples])
        latents = np.concatenate([encode(images[i : i + 256]) for i in range(0, len(images), 256)])
        tmp = out / (shard["file"] + ".tmp")
        with wds.TarWriter(str(tmp), encoder=False) as writer:
            for sample, z in zip(samples, latents, strict=True):
                buf = io.BytesIO()
                np.save(buf, z.astype(np.float32))
                writer.write({"__key__": sample["__key__"], LATENT: buf.getvalue(),
                              **({"cls": sample["cls"]} if "cls" in sample else {})})
        tmp.replace(out / shard["file"])
    path = out / INDEX
    found = json.loads(path.read_text()) if path.exists() else {"format": "gen_dist.shards.v1", "splits": {}}
    found.update(channels=index.get("channels", 1), classes=index.get("classes", []), latents=about)
    found["splits"][split] = entry
    path.write_text(json.dumps(found, indent=1))
    return entry


def decode_image(sample: dict[str, Any], channels: int, resolution: int) -> np.ndarray:
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        raise DataError(f"no image ({', '.join(IMAGE_EXTS)}) in the sample")
    img = Image.open(io.BytesIO(sample[ext])).convert("L" if channels == 1 else "RGB")
    if img.size != (resolution, resolution):
        img = img.resize((resolution, resolution), Image.BICUBIC)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


def _label(sample: dict[str, Any], classes: int) -> int:
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


class ShardStream(IterableDataset):
    """Batches of {'image': uint8 (B,C,H,W), 'label': int64 (B,), 'key': list[str], 'bad': list[str],
    'bad_count': int} for one rank; from a latent dataset, 'image' holds the float latents.

    A sample that cannot be used (unreadable shard, undecodable image, no image or label) is reported in
    'bad' and counted in 'bad_count', and its place in the batch is taken by a good sample of the batch, so
    every rank still takes the planned number of equal batches; with `strict` it raises a DataError."""

    def __init__(self, root: str | Path, split: str, batch_size: int, rank: int, world_size: int,
                 num_workers: int, seed: int, shuffle_buffer: int, resolution: int, channels: int,
                 hflip: bool, strict: bool = False) -> None:
        self.root = Path(root)
        self.workers = max(1, num_workers)
        index = check_split(self.root, split, world_size, self.workers, batch_size)
        entry = index["splits"][split]
        self.shards = [(s["file"], int(s["count"])) for s in entry["shards"]]
        self.total = int(entry["count"])
        self.num_classes = len(index.get("classes", []))
        self.layout = ReadLayout(world_size, self.workers, batch_size, shuffle_buffer)
        self.rank, self.seed, self.hflip, self.strict = rank, seed, hflip, strict
        self.resolution, self.channels = resolution, channels
        self.latents = "latents" in index
        self.set_position(0, 0)

    @property
    def batches_per_epoch(self) -> int:
        """Batches each rank receives in the current epoch (the same on every rank)."""
        return sum(len(w) for w in self.sizes)

    def set_position(self, epoch: int, batch: int, done: tuple[Segment, ...] = ()) -> None:
        """Start the next iteration at batch `batch` (as counted on this rank) of what is left of epoch `epoch`
        after the finished segments `done` (earlier parts of the epoch read under other layouts)."""
        self.epoch, self.start_batch, self.segment = epoch, batch, len(done)
        self.ordered, self.starts = epoch_shards(self.shards, self.seed, epoch)
        avail = remaining(self.total, list(done), self.seed, epoch) if done else np.arange(self.total)
        k = self.workers
        self.dropped = 0
        if len(avail) < self.layout.world * k:  # too few left to give every reader one: they wait an epoch
            self.sizes, self.slots, self.dropped = [[] for _ in range(k)], [avail[:0]] * k, len(avail)
            return
        sizes, slots = split_slots(avail, self.layout)
        self.sizes, self.slots = sizes[self.rank], slots[self.rank * k : (self.rank + 1) * k]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        # DataLoader takes batches from workers round-robin starting at worker 0; on a restart at batch
        # `start_batch` the batch due next belongs to slot start_batch % K, so the physical workers rotate.
        worker = ((info.id if info is not None else 0) + self.start_batch) % self.workers
        slot = self.rank * self.workers + worker
        problems: list[tuple[str, int]] = []
        pieces = to_pieces(self.slots[worker], self.ordered, self.starts)
        rng = np.random.default_rng(_seed(self.seed, self.epoch, slot, self.segment))
        stream = shuffled(read_pieces(self.root, pieces, None if self.strict else problems),
                          self.layout.buffer, rng)
        skip = delivered(worker, self.workers, self.start_batch)
        spare: dict[str, Any] | None = None
        for b, size in enumerate(self.sizes[worker]):
            raw = list(itertools.islice(stream, size))
            if b < skip:
                problems.clear()  # reported when that batch was first read
                continue
            decoded = self._decode(raw, problems, slot, b)
            problems.clear()
            yield _fill(decoded, size, spare, pieces)
            spare = decoded if decoded["image"] else spare

    def _decode(self, raw: list[dict[str, Any]], problems: list[tuple[str, int]], slot: int, b: int
                ) -> dict[str, Any]:
        images, labels, keys = [], [], []
        for s in raw:
            try:
                image = decode_latent(s) if self.latents else decode_image(s, self.channels, self.resolution)
                label = _label(s, self.num_classes)
            except Exception as e:  # noqa: BLE001 - any decoder failure on any bytes is a bad sample
                message = f"{s.get('__url__')}: sample {s.get('__key__')}: {type(e).__name__}: {e}"
                if self.strict:
                    raise DataError(message + " (data.strict=true)") from e
                problems.append((message, 1))
                continue
            images.append(image)
            labels.append(label)
            keys.append(s["__key__"])
        if images and self.hflip:
            seed = _seed(self.seed, self.epoch, slot, self.segment, b, 0xF11D)
            flip = np.random.default_rng(seed).random(len(images)) < 0.5
            images = [im[:, :, ::-1] if f else im for im, f in zip(images, flip, strict=True)]
        return {"image": images, "label": labels, "key": keys, "bad": [m for m, _ in problems],
                "bad_count": sum(n for _, n in problems)}


def _fill(batch: dict[str, Any], size: int, spare: dict[str, Any] | None, pieces: list[Piece]) -> dict[str, Any]:
    """Collate `size` samples: the good ones of the batch repeated in the places of bad ones (those of the
    worker's previous batch when none of this batch is good)."""
    good = batch if batch["image"] else spare
    if good is None:
        files = sorted({p.file for p in pieces})
        raise DataError(f"no readable sample to fill a batch from {', '.join(files)}: " + "; ".join(batch["bad"][:3]))
    take = [i % len(good["image"]) for i in range(size)]
    return {
        "image": torch.from_numpy(np.stack([good["image"][i] for i in take])),
        "label": torch.tensor([good["label"][i] for i in take], dtype=torch.long),
        "key": [good["key"][i] for i in take],
        "bad": batch["bad"],
        "bad_count": batch["bad_count"],
    }


def make_loader(stream: ShardStream, num_workers: int, prefetch: int = 4, pin_memory: bool = False) -> DataLoader:
    """Batches of `stream`, read by `num_workers` processes each `prefetch` batches ahead; `pin_memory` puts
    them in page-locked memory so that their copy to the GPU does not block the training process."""
    return DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                      prefetch_factor=prefetch if num_workers > 0 else None)
