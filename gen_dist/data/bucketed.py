"""A stream in aspect-ratio buckets: every step one bucket on every rank, each sample once per epoch, resumable at
its step on any world size with the same global batch (the plan: `gen_dist.data.plan`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import get_worker_info

from gen_dist.data.buckets import assign, bucket_table
from gen_dist.data.catalog import Catalog
from gen_dist.data.plan import EpochPlan, Micro, consumed, epoch_plan, lookahead, split
from gen_dist.data.reader import Retry, fields_of, read_pieces
from gen_dist.data.shards import DataError
from gen_dist.data.sources import Cache
from gen_dist.data.stream import (
    ReadLayout,
    Segment,
    ShardStream,
    collate,
    delivered,
    epoch_shards,
    slot_seed,
    to_pieces,
)
from gen_dist.data.text import read_with_text, text_layout
from gen_dist.schema import RunConfig

BUCKET_KEYS = ("weight", "geometry")
"""What a bucketed batch carries besides ShardStream's."""


class BucketStream(ShardStream):
    """ShardStream's batches in buckets: 'image' is (B, C, h, w) of the step's bucket, and each batch also has
    'weight' (B,) (a sample's share of the step's loss; 0 for the repeats that fill a bucket's last step) and
    'geometry' (B, 4): each image's original height and width and the offsets (top, left) of its crop."""

    def __init__(self, buckets: np.ndarray, table: list[tuple[int, int]], accum: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        source = kwargs["source"]
        if len(buckets) != self.total:
            raise DataError(f"{len(buckets)} image sizes for the {self.total} samples of {source.describe()}")
        self.buckets, self.table = buckets, table
        self.layout = ReadLayout(self.layout.world, self.workers, self.layout.batch, 0, accum)
        self.offsets = dict(zip((u for u, _ in self.shards), np.cumsum([0] + [n for _, n in self.shards[:-1]]),
                                strict=True))
        self.set_position(0, 0)

    @property
    def global_batch(self) -> int:
        return self.layout.world * self.layout.batch * self.layout.accum

    @property
    def batches_per_epoch(self) -> int:
        return sum(len(w) for w in self.micros)

    def plan_of(self, epoch: int, ordered: list[tuple[str, int]] | None = None) -> EpochPlan:
        """The epoch's plan: each sample's bucket in the epoch's shard order (`ordered` where known), cut into
        steps."""
        ordered = ordered if ordered is not None else epoch_shards(self.shards, self.seed, epoch)[0]
        seq = np.concatenate([self.buckets[self.offsets[u]:self.offsets[u] + n] for u, n in ordered])
        return epoch_plan(seq, len(self.table), self.global_batch)

    def set_position(self, epoch: int, batch: int, done: tuple[Segment, ...] = ()) -> None:
        if not hasattr(self, "buckets"):  # ShardStream's constructor, before the buckets are known
            return super().set_position(epoch, batch, done)
        self.epoch, self.start_batch, self.segment = epoch, batch, len(done)
        self.ordered, self.starts = epoch_shards(self.shards, self.seed, epoch)
        self.epoch_offsets = {u: int(s) for (u, _), s in zip(self.ordered, self.starts, strict=True)}
        self.plan = plan = self.plan_of(epoch, self.ordered)
        avail, start = list(plan.members), 0
        for seg in done:
            lay = seg.layout
            if lay.world * lay.batch * lay.accum != self.global_batch:
                raise DataError(f"a bucketed stream resumes mid-epoch with the global batch it was planned for "
                                f"({lay.world * lay.batch * lay.accum}, now {self.global_batch}): keep "
                                f"ranks x data.batch_size x train.grad_accum, or resume at an epoch's start")
            used = consumed(plan, start, avail, lay.world, lay.workers, lay.batch, lay.accum, seg.consumed)
            avail = [a[~np.isin(a, used)] for a in avail]
            start += seg.consumed // lay.accum
        lay = self.layout
        self.first_step, self.dropped = start, 0
        self.micros = split(plan, start, avail, lay.world, lay.workers, lay.batch, lay.accum)[self.rank]
        self.held_at_most = max((lookahead(m) for m in self.micros), default=0)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = ((info.id if info is not None else 0) + self.start_batch) % self.workers
        slot = self.rank * self.workers + worker
        micros = self.micros[worker][delivered(worker, self.workers, self.start_batch):]
        need = [m.positions if len(m.positions) else np.array([m.filler]) for m in micros]
        wanted = np.unique(np.concatenate(need)) if need else np.zeros(0, dtype=np.int64)
        pieces = to_pieces(wanted, self.ordered, self.starts)
        problems: list[tuple[str, int]] = []
        found = None if self.strict else problems
        raw = iter(read_with_text(pieces, self.text.root, found, self.retry, self.stats, self.cache) if self.text
                   else read_pieces(pieces, found, self.retry, self.stats, cache=self.cache))
        held: dict[int, dict[str, Any]] = {}
        reached = [-1]
        fillers = {m.filler for m in micros if m.filler >= 0}
        rng = np.random.default_rng(slot_seed(self.seed, self.epoch, slot, self.segment, 0xB0C))
        for micro, positions in zip(micros, need, strict=True):
            samples = [s for s in (self._take(p, raw, held, reached, fillers) for p in positions) if s is not None]
            decoded = self._decode(samples, problems, self.table[micro.bucket])
            problems.clear()
            yield self._collate(decoded, micro, rng)

    def _take(self, position: int, raw: Iterator[dict[str, Any]], held: dict[int, dict[str, Any]],
              reached: list[int], fillers: set[int]) -> dict[str, Any] | None:
        """The sample at `position`, reading on (and holding what is read before its turn); None where it was
        lost (its shard could not be read there). A filler is held for as long as the stream runs: it may be
        wanted again."""
        while reached[0] < position:
            sample = next(raw, None)
            if sample is None:
                reached[0] = np.iinfo(np.int64).max
                break
            at = self.epoch_offsets[sample["__url__"]] + sample["__index__"]
            held[at] = sample
            reached[0] = at
        return held.get(position) if position in fillers else held.pop(position, None)

    def _collate(self, batch: dict[str, Any], micro: Micro, rng: np.random.Generator) -> dict[str, Any]:
        """The micro-batch at the per-rank batch size: its good samples (repeated in the places of bad ones, with
        their weight), then repeats with zero weight."""
        good = len(batch["image"])
        if not good:
            raise DataError(f"no readable sample for a batch of bucket {self.table[micro.bucket]}: "
                            + "; ".join(batch["bad"][:3]))
        real = len(micro.positions)
        take = [i % good for i in range(self.layout.batch)]
        weight = [micro.weight if i < real else 0.0 for i in range(self.layout.batch)]
        if real < self.layout.batch and good > 1:
            take[real:] = rng.integers(good, size=self.layout.batch - real).tolist()
        return {
            **collate(batch, take, self.text),
            "weight": torch.tensor(weight, dtype=torch.float32),
            "geometry": torch.tensor([batch["geometry"][i] for i in take], dtype=torch.long),
            "bad": batch["bad"],
            "bad_count": batch["bad_count"],
        }


def make_stream(cfg: RunConfig, catalog: Catalog, rank: int, world: int) -> ShardStream:
    """The run's stream of rank `rank`: in data.buckets where set (the catalog carries the image sizes)."""
    d = cfg.data
    common = dict(source=catalog, split=d.split, batch_size=d.batch_size, rank=rank, world_size=world,
                  num_workers=d.num_workers, seed=cfg.train.seed, shuffle_buffer=d.shuffle_buffer,
                  resolution=d.resolution, channels=d.channels, hflip=d.hflip, strict=d.strict, fields=fields_of(cfg),
                  retry=Retry(patience=d.retry_seconds),
                  cache=Cache(d.cache_dir, int(d.cache_gb * 1e9)) if d.cache_dir else None, text=text_layout(cfg))
    if not d.buckets:
        return ShardStream(**common)
    if catalog.sizes is None:
        raise DataError("data.buckets: the catalog carries no image sizes (preflight attaches them)")
    table = bucket_table(d.buckets, d.resolution, d.bucket_multiple, d.bucket_max_ratio)
    return BucketStream(buckets=assign(catalog.sizes, table), table=table, accum=cfg.train.grad_accum, **common)
