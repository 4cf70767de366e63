"""`gen-dist data`: packing datasets, and latents for latent diffusion."""

from __future__ import annotations

import argparse
from pathlib import Path

from gen_dist.commands.options import fail

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def cmd_data(args: argparse.Namespace) -> None:
    from gen_dist import data

    out = Path(args.out)
    if args.source == "fashion-mnist":
        src = Path(args.path) if args.path else FASHION_MNIST
        if not src.is_dir():
            fail(f"{src} not found: install Debian's dataset-fashion-mnist or pass the IDX directory")
        done = data.pack_idx_dir(src, out, args.shard_size)
    elif args.source == "idx":
        done = data.pack_idx_dir(Path(args.path), out, args.shard_size)
    elif args.source == "folder":
        done = {args.split: data.pack_image_folder(Path(args.path), out, args.split, args.shard_size,
                                                   args.channels)}
    elif args.source == "index":
        spec = data.index_source(args.path, out, args.workers)
        shards = spec["shardlist"]
        print(f"{sum(s['nsamples'] for s in shards)} samples in {len(shards)} shards of {args.path} -> {out} "
              f"(data.index={out})")
        return
    elif args.source == "latents":
        from gen_dist.tasks.latents import encode_split

        if not args.path or not args.data:
            fail("gen-dist data latents FIRST_STAGE --data IMAGE_DATASET --out DIR")
        done = {args.split: encode_split(Path(args.path), Path(args.data), args.split, out)}
    else:
        done = data.pack_digits(out, args.shard_size)
    for split, entry in done.items():
        print(f"{split}: {entry['count']} samples in {len(entry['shards'])} shards -> {out}")
