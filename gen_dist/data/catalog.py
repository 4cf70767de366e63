"""What a data source holds: its shards in order, each with its sample count (and size and ETag where known),
and the classes. `data.path` may name

- a directory that `gen-dist data` packed (its `index.json` lists the splits and their shards),
- a directory or an S3 prefix of shards written by others, a brace pattern or a `::`-separated list of shard
  URLs (local, http(s), s3, pipe:), with the counts from, in order: `data.index` (a wids shard index, as
  `gen-dist data index` writes), a wids index beside the shards (`shardindex.json`), or img2dataset's
  `NNNNN_stats.json` beside each shard (`successes`).

The main rank resolves a source once and hands the catalog to the others."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gen_dist.data.shards import INDEX, DataError, load_index
from gen_dist.data.sources import (
    SourceError,
    Stat,
    exists,
    expand,
    is_remote,
    is_shard,
    join,
    list_shards,
    read_bytes,
    stat,
)

WIDS_KIND = "wids-shard-index-v1"
WIDS_NAME = "shardindex.json"
"""The name a wids index beside the shards is found by."""
STATS_SUFFIX = "_stats.json"


@dataclass(frozen=True)
class Shard:
    url: str
    count: int
    size: int = -1
    etag: str = ""

    @property
    def stat(self) -> Stat | None:
        return Stat(self.size, self.etag) if self.size >= 0 else None


@dataclass
class Catalog:
    """One split of a source: its shards in order."""

    source: str
    split: str
    shards: list[Shard]
    classes: list[str] = field(default_factory=list)
    latents: dict[str, Any] | None = None
    """A latent dataset's first stage (`gen-dist data latents`)."""
    packed: bool = False
    """Written by `gen-dist data` (an index.json with splits)."""
    sizes: np.ndarray | None = None
    """Each sample's image (width, height) in catalog order, where a bucketed stream needs them (`image_sizes`)."""

    @property
    def total(self) -> int:
        return sum(s.count for s in self.shards)

    def describe(self) -> str:
        return f"'{self.split}' of {self.source}" if self.packed else self.source


def open_catalog(source: str, split: str = "train", index: str = "") -> Catalog:
    """The shards of `split` of `source` (a packed dataset) or of all of `source` (shards written by others)."""
    if not source:
        raise DataError("data.path is empty")
    if not is_remote(source) and (Path(source) / INDEX).is_file():
        return _packed(Path(source), split, index)
    if index:
        return _from_wids(source, index)
    urls = shard_urls(source)
    if not urls:
        raise DataError(f"no shards ({', '.join(('.tar', '.tar.gz'))}) in {source}")
    beside = join(source, WIDS_NAME) if _is_container(source) else ""
    if beside and exists(beside):
        return _from_wids(source, beside, only=urls)
    return Catalog(source, split, _counts_from_stats(source, urls))


def _packed(root: Path, split: str, index: str) -> Catalog:
    found = load_index(root)
    if "splits" not in found:  # not ours: a wids index under the same name, say
        return _from_wids(str(root), index or str(root / INDEX))
    if split not in found["splits"]:
        raise DataError(f"split '{split}' not in {root / INDEX} (has: {', '.join(found['splits'])})")
    entry = found["splits"][split]
    shards = [Shard(str(root / s["file"]), int(s["count"])) for s in entry["shards"]]
    return Catalog(str(root), split, shards, found.get("classes", []), found.get("latents"), packed=True)


def _is_container(source: str) -> bool:
    """A directory or prefix (listed) rather than a pattern or list of shards."""
    return "::" not in source and "{" not in source and not is_shard(source)


def shard_urls(source: str) -> list[str]:
    """The shard URLs of a directory, an S3 prefix, a brace pattern or a `::`-separated list, in order."""
    if _is_container(source):
        if not is_remote(source) and not Path(source).is_dir():
            raise DataError(f"data.path {source} does not exist")
        return list_shards(source)
    return expand(source)


def _from_wids(source: str, index: str, only: list[str] | None = None) -> Catalog:
    """Shards and counts from a wids shard index; relative URLs are relative to the index's location."""
    try:
        spec = json.loads(read_bytes(index))
    except SourceError as e:
        raise DataError(f"data.index: {e}") from None
    except ValueError as e:
        raise DataError(f"data.index {index} is not JSON: {e}") from None
    if spec.get("__kind__") != WIDS_KIND or not isinstance(spec.get("shardlist"), list):
        raise DataError(f"{index} is not a wids shard index (__kind__ {WIDS_KIND} with a shardlist)")
    base = index.rsplit("/", 1)[0] if "/" in index else "."
    shards = []
    for s in spec["shardlist"]:
        url = s["url"] if is_remote(s["url"]) or Path(s["url"]).is_absolute() else join(base, s["url"])
        shards.append(Shard(url, int(s["nsamples"]), int(s.get("filesize", -1)), s.get("etag", "")))
    if only is not None:
        keep = set(only)
        shards = [s for s in shards if s.url in keep]
    return Catalog(source, "", shards, spec.get("classes", []))


def _counts_from_stats(source: str, urls: list[str]) -> list[Shard]:
    """img2dataset writes NNNNN_stats.json beside NNNNN.tar, with the samples written in `successes`."""

    def count(url: str) -> Shard:
        stats = url.rsplit(".tar", 1)[0] + STATS_SUFFIX
        try:
            found = json.loads(read_bytes(stats))
        except SourceError as e:
            if e.transient:
                raise
            stat(url)  # a shard that is not there is named as such
            raise DataError(f"no sample count for {url} (no {Path(stats).name}, and no data.index): count the "
                            f"shards once with `gen-dist data index {source} --out FILE` and set "
                            f"data.index=FILE") from None
        return Shard(url, int(found["successes"]))

    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(count, urls))


def write_wids_index(source: str, out: Path, counts: list[tuple[str, int, Stat, list[tuple[int, int]]]],
                     name: str) -> dict:
    """A wids shard index (`__kind__: wids-shard-index-v1`) with each shard's count, size and ETag, and gen_dist's
    `image_sizes` (each sample's [width, height]; readers of wids ignore the key)."""
    spec = {"__kind__": WIDS_KIND, "wids_version": 1, "name": name, "source": source,
            "shardlist": [{"url": url, "nsamples": n, "filesize": st.size, **({"etag": st.etag} if st.etag else {}),
                           "image_sizes": [list(wh) for wh in sizes]}
                          for url, n, st, sizes in counts]}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(spec, indent=1))
    return spec


def image_sizes(catalog: Catalog, index: str) -> np.ndarray:
    """Each sample's image (width, height), in catalog order, from the wids index `gen-dist data index` wrote."""
    how = (f"index the source once with `gen-dist data index {catalog.source} --out FILE` (it records each "
           f"image's size) and set data.index=FILE")
    if not index:
        raise DataError(f"data.buckets needs each image's size: {how}")
    try:
        spec = json.loads(read_bytes(index))
    except (SourceError, ValueError) as e:
        raise DataError(f"data.index {index}: {e}") from None
    def key(url: str) -> str:
        return url if is_remote(url) else str(Path(url).resolve())

    base = index.rsplit("/", 1)[0] if "/" in index else "."
    found = {key(s["url"] if is_remote(s["url"]) or Path(s["url"]).is_absolute() else join(base, s["url"])):
             s.get("image_sizes") for s in spec.get("shardlist", [])}
    parts = []
    for shard in catalog.shards:
        sizes = found.get(key(shard.url))
        if sizes is None or len(sizes) != shard.count:
            raise DataError(f"data.index {index} has no image sizes for {shard.url}: {how}")
        parts.append(np.asarray(sizes, dtype=np.int32).reshape(-1, 2))
    return np.concatenate(parts)
