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
        done = data.pack_idx_dir(src, out, args.shard_size, args.classes)
    elif args.source == "idx":
        done = data.pack_idx_dir(Path(args.path), out, args.shard_size, args.classes)
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
        done = {args.split: encode_split(Path(args.path), Path(args.data), args.split, out, args.resolution)}
    else:
        done = data.pack_digits(out, args.shard_size)
    for split, entry in done.items():
        print(f"{split}: {entry['count']} samples in {len(entry['shards'])} shards -> {out}")


def text_embeddings(args: argparse.Namespace, out: Path) -> None:
    """Encode in this process (as one rank of a launch when RANK is set), or launch --nproc of them."""
    import os

    from gen_dist.tasks.text import TextKeys, lengths_of, pipeline_source, write_text_embeddings

    if not args.path or not args.encoder:
        fail("gen-dist data text-embeddings SOURCE --encoder ENCODER [--encoder ...] --out DIR")
    keys = TextKeys(text_encoder=args.encoder, text_max_length=args.max_length or [77])
    pipe = pipeline_source(keys)
    if pipe is not None:  # a pipeline's encoders: one length per token sequence it makes
        keys.text_encoder = [str(pipe.path)]
    elif len(keys.text_max_length) not in (1, len(args.encoder)):
        fail(f"--max-length: give one for all encoders or one per encoder ({len(args.encoder)})")
    if args.nproc > 1 and "RANK" not in os.environ:
        from gen_dist.dist import free_port
        from gen_dist.launch import LaunchSpec, run

        # Each process sees RANK and takes its share of the shards.
        same = [args.path, "--out", str(out), "--split", args.split, "--caption-key", args.caption_key,
                "--index", args.index, *(f"--encoder={e}" for e in args.encoder),
                *(f"--max-length={n}" for n in keys.text_max_length), *(f"--prompt={p}" for p in args.prompt)]
        code = run(LaunchSpec(nproc=args.nproc, port=free_port()), ["text-embeddings", *same], command="data")
        if code:
            fail(f"text-embeddings: a process failed (exit code {code})")
        return
    entry = write_text_embeddings(args.path, args.split, out, keys.text_encoder, lengths_of(keys), args.caption_key,
                                  args.index, args.prompt)
    if entry is not None:
        print(f"{args.split}: {entry['count']} captions in {len(entry['shards'])} shards -> {out} "
              f"(data.text_embeddings={out})")
