"""Checks that need the dataset, the run directory or the machine, run before any process is launched (and
again by every trainer). They import no model library (diffusers, DeepSpeed's engine), so that a bad config
fails in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from gen_dist import checkpoint
from gen_dist.artifact import resolve
from gen_dist.config import check_same_model, load_config
from gen_dist.data import (
    Catalog,
    check_catalog,
    first_sample,
    image_sizes,
    open_catalog,
    probe_remote,
    reference_catalog,
)
from gen_dist.data.mixture import source_configs
from gen_dist.evaluation import check_eval
from gen_dist.family import family
from gen_dist.parallel import STRATEGIES, strategy_for
from gen_dist.schema import ConfigError, RunConfig


def preflight(cfg: RunConfig, world_size: int, catalogs: list[Catalog] | None = None) -> None:
    """Checks that need the dataset or the machine; run before any process is launched. The dataset's are
    skipped where `catalogs` is None and made by `check_data` later (the trainer's main rank resolves the sources
    once, then hands the catalogs to the other ranks)."""
    if catalogs is not None:
        for (_, one), catalog in zip(source_configs(cfg), catalogs, strict=True):
            check_data(one, catalog, world_size)
    saved = cfg.out_dir / "config.yaml"
    found = checkpoint.list_checkpoints(cfg.out_dir)
    if saved.exists() and found:
        check_same_model(load_config(saved), cfg)
        _check_resumable(found[-1], cfg, world_size)
    if cfg.train.mixed_precision == "fp16" and (cfg.train.cpu or not torch.cuda.is_available()):
        raise ConfigError("train.mixed_precision=fp16 needs a GPU (CPU autocast ignores it); use bf16 or no")
    strategy_for(cfg).preflight()
    if cfg.data.latents and cfg.task == "diffusion":  # encoded by this first stage, whose weights say so
        from gen_dist.tasks.latents import check_latents, load_first_stage

        check_latents(cfg, load_first_stage(Path(cfg.diffusion.first_stage)))
    if cfg.train.init_from and not found:
        resolve(Path(cfg.train.init_from), "train.init_from")
    if cfg.eval.every:
        check_eval(cfg)


def _check_resumable(ckpt: Path, cfg: RunConfig, world_size: int) -> None:
    """A checkpoint resumes under the strategy that wrote it; a ZeRO one also only on as many ranks."""
    try:
        desc = checkpoint.describe(ckpt)
    except checkpoint.CheckpointError:
        return  # broken: resume skips it with a warning
    then, now = desc.strategy, cfg.parallel.strategy
    if then != now:
        raise ConfigError(f"{ckpt} was written with parallel.strategy={then}, its optimizer state cannot be "
                          f"loaded under {now}; resume with parallel.strategy={then} or use a new run_dir")
    if not STRATEGIES[now].any_world_size and desc.world_size != world_size:
        raise ConfigError(f"{ckpt} holds DeepSpeed ZeRO partitions of {desc.world_size} ranks, which load only "
                          f"on {desc.world_size} ranks (not {world_size}); resume on {desc.world_size} "
                          f"ranks (ddp and fsdp checkpoints resume on any number)")


def training_catalogs(cfg: RunConfig) -> list[Catalog]:
    """The catalogs of what the run trains on: data.latents where set, else data.path, or each of data.sources."""
    if cfg.data.latents:
        return [open_catalog(cfg.data.latents, cfg.data.split)]
    return [open_catalog(c.data.path, c.data.split, c.data.index) for _, c in source_configs(cfg)]


def checked_catalogs(cfg: RunConfig, world_size: int) -> list[Catalog]:
    """The training catalogs, once `check_data` passed each."""
    catalogs = training_catalogs(cfg)
    for (_, one), catalog in zip(source_configs(cfg), catalogs, strict=True):
        check_data(one, catalog, world_size)
    return catalogs


def check_members(cfg: RunConfig, sample: dict, classes: bool) -> None:
    """Shards whose samples lack the label a class-conditional model needs (img2dataset's keep it, if at all,
    in the json), or the caption member a text model reads, are refused before launch, not at step 0."""
    have = sorted(k for k in sample if not k.startswith("__"))
    fields = sorted(json.loads(sample["json"])) if "json" in sample else []
    where = (f"the first sample of {cfg.data.path} ({sample.get('__url__')}) has no {{}} (its members: "
             f"{', '.join(have)}" + (f"; its json's fields: {', '.join(fields)}" if fields else "") + ")")

    def lacks(key: str) -> bool:
        return key[5:] not in fields if key.startswith("json:") else key not in sample

    key = cfg.data.label_key
    if classes and key and lacks(key):
        raise ConfigError(f"{cfg.task}.num_classes={getattr(cfg, cfg.task).num_classes} needs a class label, but "
                          + where.format(f"data.label_key '{key}'") + ": name the label with data.label_key (a "
                          f"member, or json:FIELD), or set {cfg.task}.num_classes=0 to train unconditionally")
    key = cfg.data.caption_key
    if key and lacks(key):
        raise ConfigError(where.format(f"caption (data.caption_key '{key}')") + ": name the caption member "
                          "with data.caption_key (data.sources[].caption_key for one source)")


def check_data(cfg: RunConfig, catalog: Catalog, world_size: int) -> None:
    """The source can feed the ranks, answers, and has the classes the model is built for."""
    check_catalog(catalog, world_size, max(1, cfg.data.num_workers), cfg.data.batch_size)
    probe_remote(catalog)
    have = len(catalog.classes)
    want = getattr(cfg, cfg.task).__dict__.get("num_classes", 0)
    if not catalog.packed:
        check_members(cfg, first_sample(catalog), bool(want))
    if cfg.data.buckets:
        catalog.sizes = image_sizes(catalog, cfg.data.index)
    if catalog.packed and (want > have or 0 < want < have):
        raise ConfigError(f"{cfg.task}.num_classes={want} but {cfg.data.path} has {have} classes (labels 0 .. "
                          f"{have - 1}); set {cfg.task}.num_classes={have}"
                          + (" (or 0: unconditional)" if cfg.task != "classifier" and have else ""))
    if family(cfg.task).task.reconstructs:
        reference = reference_catalog(cfg).total
        if cfg.train.sample_n > reference:
            raise ConfigError(f"train.sample_n={cfg.train.sample_n}: {cfg.task} grids reconstruct images of the "
                              f"evaluation reference, which has {reference}")
