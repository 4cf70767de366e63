"""Reading samples out of shards wherever they live: pieces of shards in order, with reads that fail mid-shard
retried (bounded backoff) from the sample they had reached; the images of a split by position (evaluation,
latent scales); the checks a split must pass to feed the ranks; and `gen-dist data index`."""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from webdataset import tariterators

from gen_dist.data.catalog import Catalog, Shard, open_catalog, shard_urls, write_wids_index
from gen_dist.data.shards import IMAGE_EXTS, INDEX, DataError, Fields, Piece, decode_image, image_size, load_index
from gen_dist.data.sources import Cache, SourceError, Stat, is_remote, kind, open_stream, stat
from gen_dist.schema import ConfigError, RunConfig


@dataclass(frozen=True)
class Retry:
    """How long a shard read that fails keeps being retried: waits of 1, 2, 4 ... up to `longest` seconds, until
    `patience` seconds have passed without a sample (a storage server that restarts is waited for)."""

    patience: float = 120.0
    longest: float = 15.0


def _samples(stream: Any, url: str) -> Iterator[dict[str, Any]]:
    """A tar stream's samples, members grouped by key as webdataset groups them."""
    files = tariterators.tar_file_expander([{"url": url, "stream": stream}])
    return tariterators.group_by_keys(files)


def read_pieces(pieces: list[Piece], problems: list[tuple[str, int]] | None = None, retry: Retry = Retry(),
                stats: dict[str, Stat] | None = None, log: Callable[[str], None] | None = None,
                cache: Cache | None = None) -> Iterator[dict[str, Any]]:
    """Raw (undecoded) samples of each piece in order, each exactly once. A read that fails is retried from the
    sample it had reached; a shard that stays unreadable raises a DataError naming it or, with a `problems` list,
    is reported there as (message, samples lost) and reading goes on. `stats` holds the size and ETag an index
    recorded of each shard, which it must still have. With a `cache`, remote shards are read from local copies."""
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    for piece in pieces:
        reached, error = piece.start, ""  # the shard's next sample to take
        waited, wait = 0.0, 1.0
        expect = (stats or {}).get(piece.file)
        cached = cache is not None and is_remote(piece.file) and kind(piece.file) != "pipe"
        while reached < piece.end:
            try:
                url = cache.local(piece.file, expect) if cached else piece.file
                with open_stream(url, None if cached else expect) as stream:
                    for i, sample in enumerate(itertools.islice(_samples(stream, piece.file), reached, piece.end),
                                               reached):
                        reached, waited, wait = i + 1, 0.0, 1.0
                        if piece.keep is None or i in piece.keep:
                            sample["__index__"] = i  # its place in the shard
                            yield sample
                if reached < piece.end:
                    error = "the shard ends early"
                break
            except Exception as e:  # noqa: BLE001 - any failure of a read: transient ones are retried
                transient = not isinstance(e, DataError) or (isinstance(e, SourceError) and e.transient)
                error = f"{type(e).__name__}: {e.args[0] if e.args else e}"
                if not transient or not is_remote(piece.file) or waited >= retry.patience:
                    break
                log(f"gen_dist data: {piece.file}: read failed at sample {reached} ({error}); retrying in "
                    f"{wait:.0f} s")
                time.sleep(wait)
                waited, wait = waited + wait, min(2 * wait, retry.longest)
        if reached < piece.end:
            lost = sum(1 for i in range(reached, piece.end) if piece.keep is None or i in piece.keep)
            message = (f"{piece.file}: unreadable after {piece.count - lost} of the {piece.count} samples to read "
                       f"({error})")
            if problems is None:
                raise DataError(message)
            problems.append((message, lost))


def probe_remote(catalog: Catalog) -> None:
    """The first remote shard is asked for its size, so that a wrong URL, bucket or credentials fail before
    launch rather than in a loader worker."""
    first = next((s.url for s in catalog.shards if is_remote(s.url) and kind(s.url) != "pipe"), None)
    if first is not None:
        stat(first)


def check_catalog(catalog: Catalog, world_size: int, workers: int, batch_size: int) -> None:
    """The split can feed `world_size` ranks x `workers` readers (a DataError naming the fix otherwise); local
    shards must exist."""
    where = catalog.describe()
    missing = [s.url for s in catalog.shards if not is_remote(s.url) and not Path(s.url).is_file()]
    if missing:
        raise DataError(f"{len(missing)} shard(s) of {where} are missing: {', '.join(missing[:5])}")
    shards, total = len(catalog.shards), catalog.total
    if shards < world_size * workers:
        # Readers would start inside shards that others read too, each re-reading the skipped part.
        raise DataError(f"{where} has {shards} shards for {world_size} ranks x {workers} workers "
                        f"= {world_size * workers} readers; repack with more shards (gen-dist data ... "
                        f"--shard-size N) or lower data.num_workers")
    if total // world_size < batch_size:
        raise DataError(f"{total} samples in {where} cannot fill one batch of {batch_size} on each of "
                        f"{world_size} ranks: lower data.batch_size")


def first_sample(catalog: Catalog) -> dict[str, Any]:
    """The first sample of a source, raw (what its members are)."""
    return next(read_pieces([Piece(catalog.shards[0].url, 0, 1)]))


def split_pieces(shards: list[Shard], start: int, size: int) -> list[Piece]:
    """Samples [start, start + size) of a split, in catalog order."""
    pieces, offset = [], 0
    for shard in shards:
        lo, hi = max(start, offset), min(start + size, offset + shard.count)
        if lo < hi:
            pieces.append(Piece(shard.url, lo - offset, hi - offset))
        offset += shard.count
    return pieces


def fields_of(cfg: RunConfig) -> Fields:
    d = cfg.data
    return Fields(d.channels, d.resolution, tuple(d.image_keys), d.label_key, d.caption_key, d.crop, d.min_size,
                  tuple(d.caption_templates), tuple(d.class_names))


def split_images(cfg: RunConfig, catalog: Catalog, start: int, size: int) -> torch.Tensor:
    """Images [start, start + size) of a catalog in order (uint8, N C H W; center crops, no augmentation)."""
    fields = fields_of(cfg)
    raw = read_pieces(split_pieces(catalog.shards, start, size))
    return torch.from_numpy(np.stack([decode_image(s, fields) for s in raw]))


def reference_catalog(cfg: RunConfig) -> Catalog:
    """The images evaluation compares with: eval.reference_path, else eval.reference_split of data.path."""
    e = cfg.eval
    if e.reference_path:
        return open_catalog(e.reference_path, e.reference_split)
    if not is_remote(cfg.data.path) and (Path(cfg.data.path) / INDEX).is_file():
        try:
            return open_catalog(cfg.data.path, e.reference_split)
        except DataError:
            splits = load_index(Path(cfg.data.path))["splits"]
            raise ConfigError(f"eval.reference_split '{e.reference_split}' is not in {cfg.data.path} "
                              f"(splits: {', '.join(sorted(splits))})") from None
    raise ConfigError(f"evaluation compares with a split of a packed dataset or eval.reference_path; data.path "
                      f"{cfg.data.path} is neither packed nor is eval.reference_path set")


def reference_images(cfg: RunConfig, start: int, size: int) -> torch.Tensor:
    """Images [start, start + size) of the evaluation reference."""
    return split_images(cfg, reference_catalog(cfg), start, size)


# ---------------------------------------------------------------------------------------------- indexing


def count_samples(url: str, fields: Fields) -> tuple[str, int, Stat, list[tuple[int, int]]]:
    """One streaming read of a shard: its samples, size and ETag, and each image's (width, height) read from its
    header (what aspect-ratio buckets need)."""
    found = stat(url)
    with open_stream(url) as f:
        sizes = [image_size(s, fields) for s in _samples(f, url)]
    return url, len(sizes), found, sizes


def index_source(source: str, out: Path, workers: int = 8, image_keys: tuple[str, ...] = IMAGE_EXTS) -> dict:
    """`gen-dist data index`: every shard of `source` counted (in parallel) into a wids shard index at `out`,
    with each image's size."""
    # Local shards by absolute path: a wids index's relative URLs are relative to the index itself.
    urls = [u if is_remote(u) else str(Path(u).resolve()) for u in shard_urls(source)]
    fields = Fields(3, 0, image_keys)
    with ThreadPoolExecutor(workers) as pool:
        counts = list(pool.map(lambda u: count_samples(u, fields), urls))
    return write_wids_index(source, out, counts, name=Path(out).stem)
