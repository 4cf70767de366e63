"""The epoch plan of a bucketed stream, and its split among ranks and loader workers.

The plan is a pure function of the epoch's sample sequence (the seeded shard order), each sample's bucket and
the global batch G: each bucket's samples, in sequence order, are cut into chunks of G (the last one short), and
the chunks are ordered by where their last sample lies in the sequence. Step k trains chunk k: one bucket, with
`real[k]` samples; the short chunks are filled with repeats that carry no loss weight. The plan does not depend on
the number of ranks or loader workers, so every rank is in the same bucket at every step and the global batch
is the same on any world size.

The split: every rank takes an equal part of each step (up to one sample), in micro-batches of the per-rank batch
(`grad_accum` of them per step). A rank's samples of a bucket are one contiguous part of the bucket's sequence,
cut again among its workers, so that each reader walks one region of the shards, in order, holding only the
samples it has read ahead of their step."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gen_dist.data.shards import DataError


@dataclass(frozen=True)
class EpochPlan:
    bucket: np.ndarray
    """Step -> its bucket."""
    real: np.ndarray
    """Step -> the samples it trains (G but for each bucket's last step)."""
    members: list[np.ndarray]
    """Bucket -> the positions of its samples in the epoch's sequence, in order."""
    global_batch: int

    @property
    def steps(self) -> int:
        return len(self.bucket)

    @property
    def padding(self) -> float:
        """The share of the epoch's batch places filled by repeats."""
        return 1.0 - float(self.real.sum()) / max(1, self.steps * self.global_batch)


def epoch_plan(buckets: np.ndarray, n_buckets: int, global_batch: int) -> EpochPlan:
    """The plan of an epoch whose sequence position i holds a sample of bucket `buckets[i]`."""
    members = [np.flatnonzero(buckets == b) for b in range(n_buckets)]
    ends, bucket, real = [], [], []
    for b, pos in enumerate(members):
        n = len(pos)
        for c in range(0, n, global_batch):
            ends.append(pos[min(c + global_batch, n) - 1])
            bucket.append(b)
            real.append(min(global_batch, n - c))
    order = np.argsort(np.asarray(ends, dtype=np.int64), kind="stable")
    return EpochPlan(np.asarray(bucket, dtype=np.int32)[order], np.asarray(real, dtype=np.int64)[order], members,
                     global_batch)


@dataclass(frozen=True)
class Micro:
    """One micro-batch of a rank: its bucket, the positions of its real samples and their loss weight (G over
    the real samples of its step, so that a mean over the global batch averages the real samples)."""

    bucket: int
    positions: np.ndarray
    weight: float
    filler: int = -1
    """Where the micro-batch has no real sample (a bucket's last step on many ranks): a sample of its step to
    repeat with zero weight, so that the batch still has real content."""


def _shares(real: np.ndarray, world: int, rank: int, accum: int, batch: int) -> np.ndarray:
    """(steps, accum): the real samples of each micro-batch of `rank`: its share of each step, filling its
    micro-batches in order."""
    share = real // world + (rank < real % world)
    return np.clip(share[:, None] - batch * np.arange(accum)[None, :], 0, batch)


def split(plan: EpochPlan, start: int, avail: list[np.ndarray], world: int, workers: int, batch: int,
          accum: int) -> list[list[list[Micro]]]:
    """[rank][worker] -> the micro-batches that worker delivers, in order, for steps `start` on, from the
    positions `avail[b]` still unread of each bucket. Micro-batch m of a rank (counted from `start`) comes from
    worker m % workers, as DataLoader takes them round-robin."""
    steps = np.arange(start, plan.steps)
    real = plan.real[start:]
    counts = np.stack([_shares(real, world, r, accum, batch) for r in range(world)])  # rank, step, micro
    micro_index = np.arange(len(steps) * accum).reshape(len(steps), accum)
    worker_of = micro_index % workers
    out: list[list[list[Micro]]] = [[[] for _ in range(workers)] for _ in range(world)]
    cuts: dict[tuple[int, int, int], np.ndarray] = {}
    for b in np.unique(plan.bucket[start:]):
        at = np.flatnonzero(plan.bucket[start:] == b)
        # The bucket's places in (rank, worker, micro) order: consecutive slices of its unread positions.
        rank, step, j = np.meshgrid(np.arange(world), at, np.arange(accum), indexing="ij")
        n = counts[rank, step, j]
        w = worker_of[step, j]
        order = np.lexsort((micro_index[step, j].ravel(), w.ravel(), rank.ravel()))
        ends = np.cumsum(n.ravel()[order])
        if ends[-1] != len(avail[b]):
            raise DataError(f"bucket {b}: {len(avail[b])} samples left for the plan's {ends[-1]} (the sizes or "
                            f"the bucket table changed since the checkpoint was written?)")
        for (r, s, jj), e, k in zip(np.stack([rank.ravel(), step.ravel(), j.ravel()], 1)[order], ends,
                                    n.ravel()[order], strict=True):
            cuts[(int(r), int(s), int(jj))] = avail[b][e - k:e]
    for r in range(world):
        for s, k in enumerate(steps):
            weight = plan.global_batch / float(plan.real[k])
            for jj in range(accum):
                cut = cuts[(r, s, jj)]
                filler = -1 if len(cut) else int(cuts[(0, s, 0)][0])
                out[r][int(worker_of[s, jj])].append(Micro(int(plan.bucket[k]), cut, weight, filler))
    return out


def consumed(plan: EpochPlan, start: int, avail: list[np.ndarray], world: int, workers: int, batch: int,
             accum: int, micro_batches: int) -> np.ndarray:
    """The positions that `micro_batches` micro-batches per rank, read under this layout from step `start`,
    consumed."""
    parts = split(plan, start, avail, world, workers, batch, accum)
    used = [m.positions for rank in parts for w, mine in enumerate(rank)
            for m in mine[: len(range(w, micro_batches, workers))]]
    return np.concatenate(used) if used else np.zeros(0, dtype=np.int64)


def lookahead(micros: list[Micro]) -> int:
    """The most samples a reader of `micros` holds at once: it reads their positions in order and keeps each
    until its micro-batch is due."""
    need = np.concatenate([m.positions if len(m.positions) else [m.filler] for m in micros]) if micros else \
        np.zeros(0, dtype=np.int64)
    if len(need) == 0:
        return 0
    read = np.searchsorted(np.sort(need), need)
    return int((np.maximum.accumulate(read) + 1 - np.arange(1, len(need) + 1)).max())
