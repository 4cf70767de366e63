"""A resumable stream of a split, cut by sample among ranks and loader workers (see `gen_dist.data`)."""

from __future__ import annotations

import itertools
import sys
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from gen_dist.data.catalog import Catalog, open_catalog
from gen_dist.data.reader import Retry, check_catalog, read_pieces
from gen_dist.data.shards import (
    DataError,
    Fields,
    Piece,
    SmallImage,
    decode_image,
    decode_latent,
    fit_image,
    label_of,
)
from gen_dist.data.sources import Cache
from gen_dist.data.text import TextLayout, caption, decode_text, pad_text, read_with_text, with_class_names


@dataclass(frozen=True)
class ReadLayout:
    """How an epoch is read: ranks x loader workers per rank, batch size and shuffle buffer per worker, and the
    micro-batches per step (a bucketed stream's steps span them)."""

    world: int
    workers: int
    batch: int
    buffer: int
    accum: int = 1

    def to_list(self) -> list[int]:
        return [self.world, self.workers, self.batch, self.buffer, self.accum]


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


def slot_seed(seed: int, epoch: int, slot: int, segment: int, *more: int) -> list[int]:
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
            rng = np.random.default_rng(slot_seed(seed, epoch, j, s))
            used += itertools.islice(shuffled(pos.tolist(), seg.layout.buffer, rng), n)
        avail = np.setdiff1d(avail, np.asarray(used, dtype=np.int64))
    return avail


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


class ShardStream(IterableDataset):
    """Batches of {'image': uint8 (B,C,H,W), 'label': int64 (B,), 'key': list[str], 'bad': list[str],
    'bad_count': int} for one rank; from a latent dataset, 'image' holds the float latents. With captions
    (data.caption_key or data.caption_templates) also 'caption': list[str]; with a text-embedding dataset also
    'text', 'text_mask' and 'text_pooled' (`pad_text`).

    A sample that cannot be used (unreadable shard, undecodable image, no image or label) is reported in
    'bad' and counted in 'bad_count', and its place in the batch is taken by a good sample of the batch, so
    every rank still takes the planned number of equal batches; with `strict` it raises a DataError."""

    def __init__(self, source: Catalog | str | Path, split: str, batch_size: int, rank: int, world_size: int,
                 num_workers: int, seed: int, shuffle_buffer: int, resolution: int, channels: int,
                 hflip: bool, strict: bool = False, fields: Fields | None = None, retry: Retry | None = None,
                 cache: Cache | None = None, text: TextLayout | None = None) -> None:
        catalog = source if isinstance(source, Catalog) else open_catalog(str(source), split)
        self.workers = max(1, num_workers)
        check_catalog(catalog, world_size, self.workers, batch_size)
        self.shards = [(s.url, s.count) for s in catalog.shards]
        self.stats = {s.url: s.stat for s in catalog.shards if s.stat is not None}
        self.total = catalog.total
        self.num_classes = len(catalog.classes)
        self.layout = ReadLayout(world_size, self.workers, batch_size, shuffle_buffer)
        self.rank, self.seed, self.hflip, self.strict, self.retry = rank, seed, hflip, strict, retry or Retry()
        self.fields = with_class_names(fields or Fields(channels, resolution), catalog)
        self.cache, self.text = cache, text
        self.latents = catalog.latents is not None
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
        rng = np.random.default_rng(slot_seed(self.seed, self.epoch, slot, self.segment))
        found = None if self.strict else problems
        raw = (read_with_text(pieces, self.text.root, found, self.retry, self.stats, self.cache) if self.text
               else read_pieces(pieces, found, self.retry, self.stats, cache=self.cache))
        stream = shuffled(raw, self.layout.buffer, rng)
        skip = delivered(worker, self.workers, self.start_batch)
        spare: dict[str, Any] | None = None
        for b, size in enumerate(self.sizes[worker]):
            raw = list(itertools.islice(stream, size))
            if b < skip:
                problems.clear()  # reported when that batch was first read
                continue
            decoded = self._decode(raw, problems)
            problems.clear()
            yield _fill(decoded, size, spare, pieces, self.text)
            spare = decoded if decoded["image"] else spare

    def _decode(self, raw: list[dict[str, Any]], problems: list[tuple[str, int]],
                size: tuple[int, int] | None = None) -> dict[str, Any]:
        """The usable samples of `raw` decoded; with a `size` (height, width), images fitted to it, each with its
        geometry (original height and width, crop top and left)."""
        f = self.fields
        captioned = bool(f.caption or f.templates)
        out: dict[str, list[Any]] = {"image": [], "label": [], "key": [], **({"caption": []} if captioned else {}),
                                     **({"text": []} if self.text else {}), **({"geometry": []} if size else {})}
        for s in raw:
            # Crop, flip and template are drawn per sample from (seed, epoch, key): the same on any layout or
            # resume.
            rng = (np.random.default_rng([self.seed, self.epoch, zlib.crc32(str(s.get("__key__")).encode()), 0xC409])
                   if self.hflip or f.crop == "random" or f.templates else None)
            try:
                geometry = None
                if self.latents:
                    image = decode_latent(s)
                elif size:
                    image, geometry = fit_image(s, f, size, rng)
                else:
                    image = decode_image(s, f, rng)
                label = label_of(s, self.num_classes, f.label)
                text = decode_text(s, len(self.text.lengths)) if self.text else None
                cap = caption(s, f, label, rng) if captioned else None
            except Exception as e:  # noqa: BLE001 - any decoder failure on any bytes is a bad sample
                message = f"{s.get('__url__')}: sample {s.get('__key__')}: {type(e).__name__}: {e}"
                if self.strict and not isinstance(e, SmallImage):
                    raise DataError(message + " (data.strict=true)") from e
                problems.append((message, 1))
                continue
            if rng is not None and self.hflip and rng.random() < 0.5:
                image = image[:, :, ::-1]
            out["image"].append(image)
            out["label"].append(label)
            out["key"].append(s["__key__"])
            if captioned:
                out["caption"].append(cap)
            if text is not None:
                out["text"].append(text)
            if geometry is not None:
                out["geometry"].append(geometry)
        return {**out, "bad": [m for m, _ in problems], "bad_count": sum(n for _, n in problems)}


def _fill(batch: dict[str, Any], size: int, spare: dict[str, Any] | None, pieces: list[Piece],
          text: TextLayout | None) -> dict[str, Any]:
    """Collate `size` samples: the good ones of the batch repeated in the places of bad ones (those of the
    worker's previous batch when none of this batch is good)."""
    good = batch if batch["image"] else spare
    if good is None:
        files = sorted({p.file for p in pieces})
        raise DataError(f"no readable sample to fill a batch from {', '.join(files)}: " + "; ".join(batch["bad"][:3]))
    return {**collate(good, [i % len(good["image"]) for i in range(size)], text), "bad": batch["bad"],
            "bad_count": batch["bad_count"]}


def collate(decoded: dict[str, Any], take: list[int], text: TextLayout | None) -> dict[str, Any]:
    """The decoded samples at the indices `take` (repeats allowed) as one batch."""
    return {
        "image": torch.from_numpy(np.stack([decoded["image"][i] for i in take])),
        "label": torch.tensor([decoded["label"][i] for i in take], dtype=torch.long),
        "key": [decoded["key"][i] for i in take],
        **({"caption": [decoded["caption"][i] for i in take]} if "caption" in decoded else {}),
        **(pad_text([decoded["text"][i] for i in take], list(text.lengths), text.width) if text else {}),
    }


def make_loader(stream: ShardStream, num_workers: int, prefetch: int = 4, pin_memory: bool = False) -> DataLoader:
    """Batches of `stream`, read by `num_workers` processes each `prefetch` batches ahead; `pin_memory` puts
    them in page-locked memory so that their copy to the GPU does not block the training process."""
    return DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                      prefetch_factor=prefetch if num_workers > 0 else None)
