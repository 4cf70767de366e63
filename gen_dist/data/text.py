"""Captions, and text-embedding datasets that carry their encodings beside the images.

A caption is a sample's text member (data.caption_key) or, for a class-labelled set, one of
data.caption_templates with the class name put in for `{class}`, drawn per sample from (seed, epoch, key).

A text-embedding dataset (`gen-dist data text-embeddings`) has, for each shard of its source, a shard of the same
file name and the same keys holding what the text encoders made of the caption: each encoder's hidden states of
the caption's tokens with the padding cut off (<key>.text0.npy, <key>.text1.npy ..., float16, tokens x width) and
the pooled vector (<key>.pooled.npy); its index.json names the encoders, and prompts.npz holds the encodings of
the empty prompt and of the prompts of grids given to the command. Training reads it alongside the images,
sample by sample (data.text_embeddings), so the encoders never run there."""

from __future__ import annotations

import io
import itertools
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds

from gen_dist.data.catalog import Catalog
from gen_dist.data.reader import Retry, fields_of, read_pieces, split_pieces
from gen_dist.data.shards import INDEX, DataError, Fields, Piece, caption_of, load_index
from gen_dist.data.sources import Cache, Stat
from gen_dist.schema import RunConfig

POOLED = "pooled.npy"
TEXT_KEYS = ("text", "text_mask", "text_pooled")
"""A batch's text condition (`pad_text`)."""
PROMPTS = "prompts.npz"
Encoded = tuple[list[np.ndarray], np.ndarray]
"""One caption's encoding: each encoder's hidden states of its tokens (tokens x width), and the pooled vector."""


@dataclass(frozen=True)
class TextLayout:
    """How a stream reads a text-embedding dataset: where, and each encoder's maximum tokens and the widest
    encoder's width (the padded condition's shape)."""

    root: str
    lengths: tuple[int, ...]
    width: int


def text_member(encoder: int) -> str:
    return f"text{encoder}.npy"


def caption(sample: dict[str, Any], fields: Fields, label: int, rng: np.random.Generator | None) -> str:
    """The sample's caption: its text member, or a template drawn by `rng` (the first without one) naming its
    class."""
    if fields.caption:
        return caption_of(sample, fields.caption)
    template = fields.templates[int(rng.integers(len(fields.templates))) if rng is not None else 0]
    return template.replace("{class}", fields.class_names[label])


def with_class_names(fields: Fields, catalog: Catalog) -> Fields:
    """Templates name classes by data.class_names, else by the index's class names."""
    if not fields.templates or fields.class_names:
        return fields
    return replace(fields, class_names=tuple(catalog.classes))


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _load(raw: bytes) -> np.ndarray:
    return np.load(io.BytesIO(raw), allow_pickle=False)


def decode_text(sample: dict[str, Any], encoders: int) -> Encoded:
    missing = [m for m in [*map(text_member, range(encoders)), POOLED] if m not in sample]
    if missing:
        raise DataError(f"no text embedding ({', '.join(missing)}) for the sample")
    return [_load(sample[text_member(i)]) for i in range(encoders)], _load(sample[POOLED])


def pad_text(encoded: list[Encoded], lengths: list[int], width: int) -> dict[str, torch.Tensor]:
    """A batch's condition from its captions' encodings: each encoder's tokens zero-padded to its maximum length
    and to the widest encoder's width, the encoders one after another along the sequence; the mask marks the
    tokens; the pooled vectors side by side."""
    n, total = len(encoded), sum(lengths)
    text = torch.zeros(n, total, width)
    mask = torch.zeros(n, total, dtype=torch.long)
    for i, (parts, _) in enumerate(encoded):
        start = 0
        for part, length in zip(parts, lengths, strict=True):
            tokens = torch.as_tensor(part[:length], dtype=torch.float32)
            text[i, start : start + len(tokens), : tokens.shape[1]] = tokens
            mask[i, start : start + len(tokens)] = 1
            start += length
    pooled = torch.stack([torch.as_tensor(p, dtype=torch.float32) for _, p in encoded])
    return {"text": text, "text_mask": mask, "text_pooled": pooled}


def split_captions(cfg: RunConfig, catalog: Catalog, start: int, size: int) -> list[str]:
    """Captions [start, start + size) of a catalog in order."""
    fields = fields_of(cfg)
    return [caption(s, fields, -1, None) for s in read_pieces(split_pieces(catalog.shards, start, size))]


def companion(root: str, url: str) -> str:
    """The shard of the text-embedding dataset at `root` that goes with the source shard `url`."""
    return f"{root.rstrip('/')}/{url.rsplit('/', 1)[-1]}"


def read_with_text(pieces: list[Piece], root: str, problems: list[tuple[str, int]] | None, retry: Retry,
                   stats: dict[str, Stat], cache: Cache | None) -> Iterator[dict[str, Any]]:
    """read_pieces's samples, each with the members of its key in the text-embedding shard beside its own (a
    sample whose key that shard lacks is left without them, and decoding reports it)."""
    for piece in pieces:
        extra = read_pieces([replace(piece, file=companion(root, piece.file))], problems, retry, cache=cache)
        pending: dict[str, dict[str, Any]] = {}
        for sample in read_pieces([piece], problems, retry, stats, cache=cache):
            key = sample["__key__"]
            while key not in pending:
                found = next(extra, None)
                if found is None:
                    break
                pending[found["__key__"]] = found
            more = pending.pop(key, {})
            yield {**{k: v for k, v in more.items() if not k.startswith("__")}, **sample}


def text_about(root: str) -> dict[str, Any]:
    """What the index of a text-embedding dataset says of its encoders."""
    try:
        about = load_index(Path(root)).get("text_embeddings")
    except DataError as e:
        raise DataError(f"data.text_embeddings: {e}") from None
    if about is None:
        raise DataError(f"data.text_embeddings: {root} holds no text embeddings: write them with "
                        f"`gen-dist data text-embeddings SOURCE --out {root} --encoder ...`")
    return about


def text_layout(cfg: RunConfig) -> TextLayout | None:
    """How the stream reads data.text_embeddings, if set."""
    if not cfg.data.text_embeddings:
        return None
    about = text_about(cfg.data.text_embeddings)
    return TextLayout(cfg.data.text_embeddings, tuple(about["lengths"]), about["width"])


def load_prompts(root: str) -> dict[str, Encoded]:
    """The encodings of the prompts a text-embedding dataset keeps (the empty prompt first)."""
    prompts = text_about(root)["prompts"]
    with np.load(Path(root) / PROMPTS) as f:
        encoders = sum(1 for k in f.files if k.startswith("p0_text"))
        return {p: ([f[f"p{j}_text{i}"] for i in range(encoders)], f[f"p{j}_pooled"]) for j, p in enumerate(prompts)}


def write_text_shards(catalog: Catalog, fields: Fields, out: Path, encode: Callable[[list[str]], list[Encoded]],
                      mine: list[int], chunk: int = 256) -> None:
    """Encode the captions of shards `mine` (indices into the catalog) into text-embedding shards under `out`,
    `chunk` captions at a time: a shard is written as it is read, and appears under its name only when whole."""
    out.mkdir(parents=True, exist_ok=True)
    for i in mine:
        shard = catalog.shards[i]
        name = shard.url.rsplit("/", 1)[-1]
        tmp = out / f".{name}.tmp"
        samples = read_pieces([Piece(shard.url, 0, shard.count)])
        with wds.TarWriter(str(tmp), encoder=False) as writer:
            while batch := list(itertools.islice(samples, chunk)):
                captions = [caption(s, fields, -1, None) for s in batch]
                for s, (parts, pooled) in zip(batch, encode(captions), strict=True):
                    writer.write({"__key__": s["__key__"], POOLED: _npy(pooled.astype(np.float16)),
                                  **{text_member(j): _npy(p.astype(np.float16)) for j, p in enumerate(parts)}})
        tmp.replace(out / name)


def write_text_index(catalog: Catalog, split: str, out: Path, about: dict[str, Any],
                     prompts: dict[str, Encoded]) -> dict:
    """The index of a text-embedding dataset, once every shard is written: the split's shards in catalog order,
    what encoded them, and the encodings of `prompts` (the empty prompt's and those of grids)."""
    names = [s.url.rsplit("/", 1)[-1] for s in catalog.shards]
    if len(set(names)) != len(names):
        raise DataError(f"{catalog.describe()} has shards of the same file name in different places; a "
                        f"text-embedding dataset names its shards after theirs")
    missing = [n for n in names if not (out / n).is_file()]
    if missing:
        raise DataError(f"text embeddings of {len(missing)} shard(s) were not written: {', '.join(missing[:5])}")
    arrays = {}
    for j, (parts, pooled) in enumerate(prompts.values()):
        arrays[f"p{j}_pooled"] = pooled
        arrays.update({f"p{j}_text{i}": p for i, p in enumerate(parts)})
    np.savez(out / PROMPTS, **arrays)
    entry = {"count": catalog.total, "shards": [{"file": n, "count": s.count} for n, s in
                                                zip(names, catalog.shards, strict=True)]}
    path = out / INDEX
    index = json.loads(path.read_text()) if path.exists() else {"format": "gen_dist.shards.v1", "splits": {}}
    index.update(classes=catalog.classes, text_embeddings={**about, "prompts": list(prompts)}, source=catalog.source)
    index["splits"][split] = entry
    path.write_text(json.dumps(index, indent=1))
    return entry
