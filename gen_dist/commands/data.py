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
    elif args.source == "text-embeddings":
        text_embeddings(args, out)
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


def text_embeddings(args: argparse.Namespace, out: Path) -> None:
    """Encode in this process (as one rank of a launch when RANK is set), or start --nproc of them."""
    import os
    import subprocess
    import sys

    if not args.path or not args.encoder:
        fail("gen-dist data text-embeddings SOURCE --encoder ENCODER [--encoder ...] --out DIR")
    lengths = args.max_length or [77]
    if len(lengths) not in (1, len(args.encoder)):
        fail(f"--max-length: give one for all encoders or one per encoder ({len(args.encoder)})")
    if args.nproc > 1 and "RANK" not in os.environ:
        from gen_dist.dist import free_port

        argv = sys.argv[1:]
        at = next(i for i, a in enumerate(argv) if a.startswith("--nproc"))
        del argv[at : at + (1 if "=" in argv[at] else 2)]
        # Each process sees RANK and takes its share of the shards.
        code = subprocess.call([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc),
                                "--master-port", str(free_port()), "-m", "gen_dist", *argv])
        if code:
            fail(f"text-embeddings: a process failed (exit code {code})")
        return
    from gen_dist.tasks.text import write_text_embeddings

    lengths = lengths * len(args.encoder) if len(lengths) == 1 else lengths
    entry = write_text_embeddings(args.path, args.split, out, args.encoder, lengths, args.caption_key, args.index,
                                  args.prompt)
    if entry is not None:
        print(f"{args.split}: {entry['count']} captions in {len(entry['shards'])} shards -> {out} "
              f"(data.text_embeddings={out})")
