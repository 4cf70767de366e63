"""Text conditioning: the frozen text encoders diffusion.text_encoder names (transformers' CLIP text models, T5
encoders or any AutoModel encoder), what they make of captions and prompts, caption dropout's null condition, and
the text-embedding datasets `gen-dist data text-embeddings` writes for them."""

from __future__ import annotations

import os
import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gen_dist.artifact import weights_digest
from gen_dist.data import DataError, open_catalog
from gen_dist.data.text import (
    TEXT_KEYS,
    Encoded,
    load_prompts,
    pad_text,
    text_about,
    write_text_index,
    write_text_shards,
)
from gen_dist.dist import whole_pretrained_loads
from gen_dist.pipelines import Pipeline, is_pipeline, open_pipeline
from gen_dist.schema import ConfigError, RunConfig

Cond = dict[str, torch.Tensor]
"""A batch's text condition: 'text' (B, tokens, width), 'text_mask' (B, tokens) and 'text_pooled' (B, pooled)."""
MEMO_BYTES = 256 * 2**20
"""The most that the encodings of recent captions and prompts kept for reuse take."""


@dataclass
class TextKeys:
    """The diffusion section's text keys."""

    text_encoder: list[str] = field(default_factory=list)
    """Text-to-image: the frozen text encoders, each a local directory or a Hugging Face hub id holding a
    transformers model and its tokenizer: a CLIP text model (its pooled output), a T5 encoder, or any AutoModel
    encoder such as BERT (pooled: the mean of its tokens). With several, their token sequences follow one another
    (zero-padded to the widest) and their pooled vectors stand side by side. Empty = no text."""
    text_max_length: list[int] = field(default_factory=lambda: [77])
    """Tokens per caption for each encoder (one value serves all): longer captions are cut, with one warning."""
    caption_dropout: float = 0.1
    """The probability that a training caption is replaced by the null condition, which teaches the
    unconditional model that classifier-free guidance needs."""
    null_caption: str = "empty"
    """The null condition: empty (the empty prompt's encoding) or zero (zeros)."""


def text_on(cfg: RunConfig) -> bool:
    return cfg.task == "diffusion" and bool(cfg.diffusion.text_encoder)


def pipeline_source(d: TextKeys) -> Pipeline | None:
    """The pretrained pipeline whose encoders diffusion.text_encoder names (one pipeline directory), if so."""
    return open_pipeline(d.text_encoder[0], "diffusion.text_encoder") if len(d.text_encoder) == 1 and is_pipeline(
        d.text_encoder[0]) else None


def lengths_of(d: TextKeys) -> list[int]:
    """Tokens of each part of the condition: each encoder's, or those of a pipeline's parts."""
    if len(d.text_max_length) == 1 and pipeline_source(d) is None:
        return d.text_max_length * len(d.text_encoder)
    return list(d.text_max_length)


def make_encoders(sources: list[str], lengths: list[int]) -> nn.Module:
    """The frozen encoders of `sources`: a pipeline's, combined as the pipeline combines them, or transformers
    models each with its tokenizer."""
    pipe = pipeline_source(TextKeys(text_encoder=list(sources)))
    return pipe.kind.encoders(pipe, lengths) if pipe is not None else TextEncoders(sources, lengths)


def _source(src: str) -> str:
    return str(Path(src).expanduser()) if Path(src).expanduser().exists() else src


def encoder_config(src: str) -> Any:
    """The transformers config of an encoder (a local directory, or a hub id in the cache or reachable)."""
    from transformers import AutoConfig

    if os.sep in src and not Path(src).expanduser().exists() and src.count("/") != 1:
        raise ConfigError(f"diffusion.text_encoder: {src} does not exist")
    try:
        cfg = AutoConfig.from_pretrained(_source(src))
    except (OSError, ValueError) as e:
        raise ConfigError(f"diffusion.text_encoder: {src} is neither a model directory nor a hub id that can be "
                          f"loaded ({str(e).splitlines()[0]})") from None
    return getattr(cfg, "text_config", None) or cfg if cfg.model_type == "clip" else cfg


def width_of(config: Any) -> int:
    return int(getattr(config, "hidden_size", None) or config.d_model)


def text_shape(d: TextKeys) -> tuple[int, int, int]:
    """(tokens, width, pooled width) of the condition the encoders make."""
    pipe = pipeline_source(d)
    if pipe is not None:
        return pipe.kind.text_shape(pipe, lengths_of(d))
    configs = [encoder_config(s) for s in d.text_encoder]
    for src, config, length in zip(d.text_encoder, configs, lengths_of(d), strict=True):
        most = getattr(config, "max_position_embeddings", None)
        if most is not None and length > most:
            raise ConfigError(f"diffusion.text_max_length {length} is beyond the {most} positions of {src}")
    widths = [width_of(c) for c in configs]
    return sum(lengths_of(d)), max(widths), sum(widths)


def check_text(cfg: RunConfig) -> None:
    d, data = cfg.diffusion, cfg.data
    if not text_on(cfg):
        if data.text_embeddings:
            raise ConfigError("data.text_embeddings needs diffusion.text_encoder (the encoders that wrote them)")
        return
    if (len(d.text_max_length) not in (1, len(d.text_encoder)) and pipeline_source(d) is None) or min(
            d.text_max_length) < 1:
        raise ConfigError(f"diffusion.text_max_length must be one positive count for all encoders or one per "
                          f"encoder ({len(d.text_encoder)}), got {d.text_max_length}")
    if not 0 <= d.caption_dropout < 1:
        raise ConfigError(f"config key 'diffusion.caption_dropout' must be in [0, 1), got {d.caption_dropout}")
    if not (data.caption_key or data.caption_templates or data.text_embeddings):
        raise ConfigError("diffusion.text_encoder needs captions: data.caption_key (a text member such as txt, or "
                          "json:FIELD), data.caption_templates (captions made from class labels) or "
                          "data.text_embeddings")
    if data.caption_templates and not d.num_classes:
        raise ConfigError("data.caption_templates make captions from class labels: set diffusion.num_classes")
    if any("{class}" not in t for t in data.caption_templates):
        raise ConfigError(f"data.caption_templates: every template names the class with {{class}}, got "
                          f"{data.caption_templates}")
    if data.class_names and len(data.class_names) != d.num_classes:
        raise ConfigError(f"data.class_names has {len(data.class_names)} names for diffusion.num_classes="
                          f"{d.num_classes}")
    shape = text_shape(d)
    if data.text_embeddings:
        _check_embeddings(cfg, shape)


def _check_embeddings(cfg: RunConfig, shape: tuple[int, int, int]) -> None:
    d, root = cfg.diffusion, cfg.data.text_embeddings
    try:
        about = text_about(root)
    except DataError as e:
        raise ConfigError(str(e)) from None
    if cfg.data.caption_templates:
        raise ConfigError(f"data.text_embeddings holds one encoding per sample; captions drawn from templates "
                          f"({cfg.data.caption_templates[0]!r} ...) change every epoch: leave data.text_embeddings "
                          f"empty")
    made = (about["tokens"], about["width"], about["pooled"])
    if about["sources"] != list(d.text_encoder) or made != shape or about["lengths"] != lengths_of(d):
        raise ConfigError(f"data.text_embeddings: {root} was encoded by {about['sources']} (max lengths "
                          f"{about['lengths']}, width {about['width']}); this run's diffusion.text_encoder is "
                          f"{list(d.text_encoder)} (max lengths {lengths_of(d)}, width {shape[1]}): encode them "
                          f"again or name the same encoders")


def class_prompts(cfg: RunConfig) -> list[str]:
    """The prompt of each class (the first caption template), which evaluation's samples and class-ordered grids
    use; none without templates or class names."""
    d = cfg.data
    if not d.caption_templates:
        return []
    names = d.class_names
    if not names:
        try:
            names = open_catalog(d.path, d.split, d.index).classes
        except DataError:
            return []
    return [d.caption_templates[0].replace("{class}", n) for n in names]


# ---------------------------------------------------------------------------------------------- encoders


def _load(src: str) -> tuple[nn.Module, Any, set[str]]:
    import transformers

    transformers.logging.set_verbosity_error()  # its load report lists the unused pooler of every BERT
    transformers.logging.disable_progress_bar()
    whole_pretrained_loads()
    config = encoder_config(src)
    kind = {"clip_text_model": "CLIPTextModel", "t5": "T5EncoderModel", "mt5": "MT5EncoderModel",
            "umt5": "UMT5EncoderModel"}.get(config.model_type, "AutoModel")
    net, info = getattr(transformers, kind).from_pretrained(_source(src), output_loading_info=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(_source(src))
    vocab = net.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab:
        raise ConfigError(f"diffusion.text_encoder: {src}'s tokenizer has {len(tokenizer)} tokens for the model's "
                          f"{vocab} embeddings")
    # Weights the files lack (BERT's pooler, which gen_dist does not use) are drawn anew at each load.
    return net.eval().requires_grad_(False), tokenizer, set(info.get("missing_keys", ()))


class TextEncoders(nn.Module):
    """The frozen encoders with their tokenizers: captions in, each encoder's hidden states (zero where padding)
    and mask, and the pooled vectors, out."""

    def __init__(self, sources: list[str], lengths: list[int]) -> None:
        super().__init__()
        loaded = [_load(s) for s in sources]
        self.sources, self.lengths = list(sources), lengths
        self.nets = nn.ModuleList(n for n, _, _ in loaded)
        self.tokenizers = [t for _, t, _ in loaded]
        self.drawn = [m for _, _, m in loaded]
        self.clip = [n.config.model_type == "clip_text_model" for n in self.nets]
        self.warned = False
        self._record = [{"source": s, "digest": weights_digest({k: v for k, v in n.state_dict().items()
                                                                if k not in drawn})[:16]}
                        for s, n, drawn in zip(self.sources, self.nets, self.drawn, strict=True)]
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            self.nets.to(torch.bfloat16)  # GPUs run them in bf16; CPUs, where bf16 may be emulated, in fp32

    def record(self) -> list[dict[str, str]]:
        """Each encoder's source and a checksum of its weights as stored: what a run or its text embeddings were
        made with."""
        return self._record

    def _tokens(self, tokenizer: Any, prompts: list[str], length: int) -> Any:
        tokens = tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        if not self.warned:
            longest = max(len(ids) for ids in tokenizer(prompts)["input_ids"])
            if longest > length:
                self.warned = True
                print(f"gen_dist text: a caption of {longest} tokens is cut to diffusion.text_max_length {length} "
                      f"(this is said once)", file=sys.stderr, flush=True)
        return tokens

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        device = next(self.parameters()).device
        with torch.autocast(device.type, enabled=False):  # the same encodings in training, sampling and caches
            return self._encode(prompts, device)

    def _encode(self, prompts: list[str], device: torch.device
                ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        hidden, masks, pooled = [], [], []
        for net, tokenizer, length, clip in zip(self.nets, self.tokenizers, self.lengths, self.clip, strict=True):
            tokens = self._tokens(tokenizer, prompts, length)
            ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
            out = net(input_ids=ids, attention_mask=mask)
            h = out.last_hidden_state.float() * mask[..., None]
            hidden.append(h)
            masks.append(mask)
            pooled.append(out.pooler_output.float() if clip else h.sum(1) / mask.sum(1, keepdim=True).clamp(min=1))
        return hidden, masks, torch.cat(pooled, dim=1)


def per_caption(hidden: list[torch.Tensor], masks: list[torch.Tensor], pooled: torch.Tensor) -> list[Encoded]:
    """Each caption's encoding with its padding cut off (what a text-embedding dataset stores)."""
    rows = []
    for i in range(len(pooled)):
        parts = [h[i, : int(m[i].sum())].cpu().numpy() for h, m in zip(hidden, masks, strict=True)]
        rows.append((parts, pooled[i].cpu().numpy()))
    return rows


class Conditioner:
    """The text condition of captions and prompts for a diffusion task: from a batch's cached encodings, or
    made by the encoders (on the fly during training when there are none cached; for prompts of grids, evaluation
    and `gen-dist sample`, loaded then); the null condition; caption dropout."""

    def __init__(self, cfg: RunConfig, on_the_fly: bool) -> None:
        d = cfg.diffusion
        self.sources, self.lengths, self.null_kind = list(d.text_encoder), lengths_of(d), d.null_caption
        self.tokens, self.width, self.pooled = text_shape(d)
        self.dropout = d.caption_dropout
        self.root = cfg.data.text_embeddings
        self.encoders = make_encoders(self.sources, self.lengths) if on_the_fly else None
        self.made_by: list[dict[str, str]] | None = text_about(self.root)["encoders"] if self.root else None
        self.memo: OrderedDict[str, tuple[torch.Tensor, ...]] = OrderedDict()
        self.memo_rows = max(16, MEMO_BYTES // (4 * (self.tokens * (self.width + 1) + self.pooled)))
        self._null: Cond | None = None
        if self.root:  # the prompts written with the embeddings: grids need no encoder for them
            for prompt, encoded in load_prompts(self.root).items():
                row = pad_text([encoded], self.lengths, self.width)
                self.memo[prompt] = tuple(row[k][0] for k in TEXT_KEYS)

    def record(self) -> list[dict[str, str]]:
        """The encoders the model is conditioned by (source, weights checksum), as its checkpoints keep them."""
        return self.encoders.record() if self.encoders is not None else list(self.made_by or [])

    def trained_with(self, record: list[dict[str, str]]) -> None:
        """A checkpoint's record of the encoders: the ones loaded must have the same weights."""
        self.made_by = record
        if self.encoders is not None:
            self._same_weights()

    def _same_weights(self) -> None:
        found = [e["digest"] for e in self.encoders.record()]
        if self.made_by and found != [e["digest"] for e in self.made_by]:
            raise ConfigError(f"diffusion.text_encoder {self.sources} (weights {found}) is not what this model was "
                              f"trained with: {self.made_by}")

    def encoders_on(self, device: torch.device) -> nn.Module:
        if self.encoders is None:
            self.encoders = make_encoders(self.sources, self.lengths)
            self._same_weights()
        return self.encoders.to(device)

    def encode(self, prompts: list[str], device: torch.device) -> Cond:
        """The condition of `prompts`, reusing the encodings of recent ones."""
        todo = list(dict.fromkeys(p for p in prompts if p not in self.memo))
        if todo:
            # With cached embeddings the encoders load only for prompts, and on the CPU: never on an accelerator
            # that the denoiser needs.
            hidden, masks, pooled = self.encoders_on(torch.device("cpu") if self.root else device)(todo)
            made = {"text": torch.cat([F.pad(h, (0, self.width - h.shape[2])) for h in hidden], dim=1).to(device),
                    "text_mask": torch.cat(masks, dim=1).to(device), "text_pooled": pooled.to(device)}
            for i, p in enumerate(todo):
                self.memo[p] = tuple(made[k][i].to(device) for k in TEXT_KEYS)
        for p in prompts:
            self.memo.move_to_end(p)
        rows = [self.memo[p] for p in prompts]
        while len(self.memo) > self.memo_rows:
            self.memo.popitem(last=False)
        return {k: torch.stack([r[i] for r in rows]).to(device) for i, k in
                enumerate(TEXT_KEYS)}

    def null(self, n: int, device: torch.device) -> Cond:
        if self._null is None:
            if self.null_kind == "zero":
                mask = torch.zeros(1, self.tokens, dtype=torch.long)
                mask[:, 0] = 1  # attention needs a key; it sees a zero one
                self._null = {"text": torch.zeros(1, self.tokens, self.width), "text_mask": mask,
                              "text_pooled": torch.zeros(1, self.pooled)}
            else:
                self._null = self.encode([""], device)
        return {k: v.to(device).expand(n, *v.shape[1:]) for k, v in self._null.items()}

    def of_batch(self, batch: Any, device: torch.device) -> Cond:
        if "text" in batch:
            return {k: batch[k] for k in TEXT_KEYS}
        if "caption" not in batch:  # the FLOP count's batch
            return self.null(len(batch["key"]), device)
        return self.encode(list(batch["caption"]), device)

    def dropped(self, cond: Cond) -> Cond:
        """Caption dropout: each caption replaced by the null condition with probability caption_dropout."""
        if self.dropout <= 0:
            return cond
        n = cond["text"].shape[0]
        device = cond["text"].device
        drop = torch.rand(n, device=device) < self.dropout
        null = self.null(n, device)
        return {k: torch.where(drop.view(-1, *[1] * (v.dim() - 1)), null[k].to(v.dtype), v) for k, v in cond.items()}


# ---------------------------------------------------------------------------------------------- datasets


def write_text_embeddings(source: str, split: str, out: Path, sources: list[str], lengths: list[int],
                          caption_key: str, index: str = "", prompts: list[str] = (), chunk: int = 256) -> dict | None:
    """`gen-dist data text-embeddings`: every caption of `split` of `source` encoded into a text-embedding
    dataset at `out`, the shards shared among the ranks of the launch (RANK, WORLD_SIZE); rank 0 writes the
    index once all are done, with the encodings of the empty prompt and `prompts`. Returns the split's entry on
    rank 0."""
    from gen_dist.data import Fields

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        torch.distributed.init_process_group("gloo")
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    catalog = open_catalog(source, split, index)
    encoders = make_encoders(sources, lengths).to(device)

    def encode(captions: list[str]) -> list[Encoded]:
        return per_caption(*encoders(captions))

    write_text_shards(catalog, Fields(1, 1, caption=caption_key), out, encode, list(range(rank, len(catalog.shards),
                                                                                         world)), chunk)
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if rank:
        return None
    tokens, width, pooled = text_shape(TextKeys(text_encoder=list(sources), text_max_length=list(lengths)))
    about = {"sources": list(sources), "encoders": encoders.record(), "lengths": lengths, "tokens": tokens,
             "width": width, "pooled": pooled, "caption_key": caption_key}
    kept = list(dict.fromkeys(["", *prompts]))
    return write_text_index(catalog, split, out, about, dict(zip(kept, per_caption(*encoders(kept)), strict=True)))
