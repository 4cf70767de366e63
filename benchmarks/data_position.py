"""What keeping the data stream's position costs: stream throughput, and the one-time cost of restarting it
mid-epoch (same layout: replay and skip without decoding; another layout: also replay the earlier split).

    python benchmarks/data_position.py data/fashion_mnist --world 2 --workers 1 --batch 32 --at 500
"""

from __future__ import annotations

import argparse
import time

from torch.utils.data import DataLoader

from gen_dist.data import ReadLayout, Segment, ShardStream


def _stream(args: argparse.Namespace, world: int) -> ShardStream:
    return ShardStream(args.data, "train", args.batch, 0, world, args.workers, seed=0, shuffle_buffer=args.buffer,
                       resolution=28, channels=1, hflip=True)


def _time(ds: ShardStream, epoch: int, batch: int, done: tuple[Segment, ...], n: int) -> tuple[float, float, float]:
    """(seconds in set_position, seconds to the first batch, images/s over the next n batches)."""
    t0 = time.perf_counter()
    ds.set_position(epoch, batch, done)
    t1 = time.perf_counter()
    loader = iter(DataLoader(ds, batch_size=None, num_workers=ds.workers))
    next(loader)
    t2 = time.perf_counter()
    images = sum(len(next(loader)["key"]) for _ in range(n))
    return t1 - t0, t2 - t1, images / (time.perf_counter() - t2)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("data")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--buffer", type=int, default=1000)
    p.add_argument("--at", type=int, default=500, help="batch of the epoch at which to restart")
    p.add_argument("--n", type=int, default=200, help="batches timed after the first")
    args = p.parse_args()
    ds = _stream(args, args.world)
    print(f"{args.data}: {ds.total} samples, rank 0 of {args.world}, {args.workers} worker(s), batch {args.batch}, "
          f"{ds.batches_per_epoch} batches per epoch")
    rows = [("epoch start", ds, 0, ())]
    rows.append((f"restart at batch {args.at}, same layout", ds, args.at, ()))
    other = _stream(args, 1 if args.world > 1 else 2)
    then = ReadLayout(args.world, ds.workers, args.batch, args.buffer)
    rows.append((f"restart after batch {args.at} of {args.world} ranks on {other.layout.world}", other, 0,
                 (Segment(then, args.at),)))
    print(f"{'':45} {'set_position s':>14} {'first batch s':>13} {'images/s':>9}")
    for name, stream, batch, done in rows:
        pos, first, rate = _time(stream, 1, batch, done, args.n)
        print(f"{name:45} {pos:14.3f} {first:13.3f} {rate:9.0f}")


if __name__ == "__main__":
    main()
