"""The typed sections of a run config and how text becomes them: YAML values checked against each field's type,
unknown keys and wrong types are errors naming the key. `gen_dist.config` assembles the whole config (these
sections, one per registered family) and validates it."""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration problem, reported before any training starts."""


class Switch(str):
    """Type of a fast-path switch (the config holds the plain string): auto (gen_dist decides from the device
    and strategy), on or off. YAML's true/false (and on/off, which YAML reads as booleans) are accepted."""

    VALUES = ("auto", "on", "off")


@dataclass
class SourceConfig:
    """One source of a weighted mixture (data.sources): where it lives and what of its samples is read; the rest
    (resolution, crop, buckets, batch) is the data section's."""

    path: str = ""
    """As data.path: a packed directory, shards written by others, URLs, an S3 prefix."""
    weight: float = 1.0
    """Its share of the steps: steps draw their source with probability weight / the sum of the weights."""
    name: str = ""
    """What its metrics are logged as; empty: the last part of its path."""
    split: str = "train"
    index: str = ""
    """As data.index (sizes for data.buckets too)."""
    label_key: str = ""
    """As data.label_key; empty: data.label_key."""
    caption_key: str = ""
    """As data.caption_key; empty: data.caption_key."""


@dataclass
class DataConfig:
    path: str = "data/fashion_mnist"
    """The shards: a directory `gen-dist data` wrote; a directory or S3 prefix of shards written by others; or
    shard URLs (local, http(s), s3, pipe:) as a brace pattern or `::` list. S3 endpoint and credentials come from
    the environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE) (docs/data.md)."""
    sources: list[SourceConfig] = field(default_factory=list)
    """A weighted mixture to train on instead of data.path (which stays the evaluation reference): each step
    takes one source, drawn by weight from a seeded plan; each source is read once per its own epoch
    (docs/data.md)."""
    split: str = "train"
    """Which split of a packed dataset to train on."""
    index: str = ""
    """A wids shard index (`gen-dist data index SOURCE --out FILE`): each shard's sample count."""
    image_keys: list[str] = field(default_factory=lambda: ["jpg", "jpeg", "png", "webp", "bmp"])
    """Sample members that may hold the image; the first found is used."""
    label_key: str = "cls"
    """The class label: a member holding an integer (cls), json:FIELD (a field of the .json), or empty: none."""
    caption_key: str = ""
    """The caption: a text member (txt), json:FIELD, or empty: none read."""
    caption_templates: list[str] = field(default_factory=list)
    """Class-labelled data without captions: captions made from these templates, `{class}` standing for the
    class name, one drawn per sample and epoch (e.g. ["a photo of a {class}", "a {class}"])."""
    class_names: list[str] = field(default_factory=list)
    """The class names templates use, one per class; empty = the names in the dataset's index."""
    text_embeddings: str = ""
    """Text-to-image: the captions' encodings, written beside the data by `gen-dist data text-embeddings` and
    read with it sample by sample; the text encoders then never run on training batches."""
    resolution: int = 28
    """Square image size fed to the model: the shorter side is resized to it, then the image cropped. With
    data.buckets, the base resolution of the bucket table."""
    buckets: str = ""
    """Aspect-ratio buckets: sdxl (SDXL's table at 1024), pixart (PixArt's at 256, 512, 1024, 2048) or ladder (made
    at data.resolution^2 pixels). Each step trains one bucket on every rank; each image's size comes from
    data.index (`gen-dist data index` records them). Empty: square crops (docs/data.md)."""
    bucket_multiple: int = 64
    """data.buckets=ladder: the buckets' sides are multiples of this."""
    bucket_max_ratio: float = 4.0
    """data.buckets=ladder: the most elongated bucket's ratio of long to short side."""
    crop: str = "center"
    """center, or random (drawn per sample from the seed, epoch and key: a resumed run crops the same)."""
    min_size: int = 0
    """Skip images whose shorter side is below this (counted with the bad samples); 0 keeps all."""
    cache_dir: str = ""
    """Keep whole remote shards on this local disk for the next epochs (least recently read out first)."""
    cache_gb: float = 50.0
    """The most data.cache_dir holds, in GB."""
    retry_seconds: float = 120.0
    """A remote read that fails is retried from the sample it reached for this long without progress; then the
    shard is bad (an error under data.strict)."""
    channels: int = 1
    """1 for grayscale, 3 for RGB."""
    batch_size: int = 64
    """Batch size per process and per micro-step (global batch = this x processes x grad_accum)."""
    num_workers: int = 1
    """DataLoader worker processes per rank; 0 reads in the training process."""
    shuffle_buffer: int = 1000
    """Samples held in each worker's shuffle buffer (on top of a per-epoch shard shuffle)."""
    hflip: bool = False
    """Random horizontal flips (drawn per sample like data.crop)."""
    latents: str = ""
    """Latent diffusion: a directory of the training split's latents pre-encoded by the run's first stage
    (`gen-dist data latents`), read instead of encoding data.path's images on the fly; the same batches,
    without the encoder's cost. data.path still gives the evaluation images."""
    prefetch: int = 4
    """Batches each loader worker prepares ahead (on GPUs they are copied from pinned memory)."""
    strict: bool = False
    """Stop at the first unreadable shard, undecodable image or sample without image or label, naming shard and
    key. Otherwise such a sample is logged, counted in the data/bad_samples metric and replaced in its batch
    by a good one, so that every rank still takes the planned steps."""


@dataclass
class OptimConfig:
    lr: float = 2e-4
    """Peak learning rate of every optimizer."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam betas."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    schedule: str = "constant"
    """LR schedule after warmup: constant, linear or cosine (decaying to 0 at train.steps)."""
    warmup_steps: int = 0
    """Linear warmup steps."""
    grad_clip: float = 1.0
    """Clip the gradient norm of each phase to this; 0 disables clipping (the norm is still reported)."""


@dataclass
class TrainConfig:
    steps: int = 1000
    """Optimizer steps to train (per phase that runs every step)."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    mixed_precision: str = "no"
    """no, bf16, fp16 (a GPU only) or auto: bf16 where the device computes it natively (a CUDA GPU with bf16, a
    CPU with AVX512-BF16 or AMX), else no. The choice and its reason are in the run's start event."""
    loss_scaling: bool = True
    """fp16: dynamic loss scaling (a GradScaler). Without it small fp16 gradients flush to zero."""
    ema_decay: float = 0.999
    """EMA decay of the generator/denoiser; 0 disables EMA. Warmed up as min(decay, (1+n)/(10+n))."""
    seed: int = 0
    """Base seed; per-step randomness derives from (seed, rank, step)."""
    log_every: int = 10
    """Steps between metric records."""
    sample_every: int = 0
    """Steps between sample grids; 0 = only at the end."""
    sample_n: int = 64
    """Images in a sample grid."""
    sample_prompts: list[str] = field(default_factory=list)
    """Text-to-image: the grids' prompts, one per column; empty = one class prompt per column."""
    ckpt_every: int = 500
    """Steps between checkpoints (a checkpoint is also written at the end)."""
    keep_checkpoints: int = 2
    """Newest checkpoints kept."""
    snapshot_every: int = 0
    """Steps between snapshots: the EMA (or raw) weights of the sampled module alone, in the export format,
    kept for good in snapshots/ (`gen-dist sample` and `gen-dist eval` read them); 0 = none."""
    posthoc_ema: list[float] = field(default_factory=list)
    """Post-hoc EMA (EDM2): relative stds (sigma_rel, e.g. [0.05, 0.10]) of power-function EMA profiles of the
    sampled module, kept beside train.ema_decay's and written in half precision to posthoc/ every
    train.posthoc_every steps; `gen-dist ema RUN --std S` then makes the EMA of any length from them. Empty =
    none."""
    posthoc_every: int = 0
    """Steps between post-hoc EMA snapshots (needed with train.posthoc_ema)."""
    keep_best: str = ""
    """An in-training eval metric (e.g. eval/inception/fid1k; needs eval.every > 0): the checkpoint of its best
    value is kept beside the newest ones and named in best.json. Lower is better for FID and KID, higher for
    the others."""
    log_keys: bool = False
    """Write the sample keys of every step to keys_rank<R>.jsonl in the run directory (to audit the data order)."""
    max_nonfinite_steps: int = 5
    """Steps with a non-finite loss or gradient are skipped (and counted); this many in a row stop the run."""
    cpu: bool = False
    """Train on CPU even when a GPU is present."""
    progress: bool = True
    """Report progress on the main process: a bar on a terminal, else one plain line per log record."""
    compile: Switch = "auto"
    """torch.compile each trained module (DDP and FSDP; DeepSpeed refuses it). auto = on for CUDA devices."""
    channels_last: Switch = "auto"
    """Channels-last memory format for the trained modules and image batches. auto = on for CUDA devices."""
    tf32: bool = True
    """Allow TF32 matmuls and convolutions (GPUs that have them) for the fp32 parts of the computation."""
    activation_checkpointing: bool = False
    """Recompute activations in backward instead of keeping them: less memory, about one more forward."""
    init_from: str = ""
    """Start a new run from trained weights: a run directory (its latest checkpoint), a checkpoint or a file of
    `gen-dist export`. Matching tensors are loaded (the sampled module's EMA where kept), the rest are reported;
    optimizers, schedules and the step start fresh. Ignored once the run has its own checkpoints."""


@dataclass
class ParallelConfig:
    strategy: str = "ddp"
    """How trained modules are spread over ranks: ddp (replicated), deepspeed (ZeRO, one engine per trained
    module) or fsdp (PyTorch FSDP2 through Accelerate)."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage: 1 shards optimizer state, 2 also gradients, 3 also parameters."""
    offload_optimizer: bool = False
    """DeepSpeed: keep optimizer state on the CPU and step it there (DeepSpeedCPUAdam)."""
    offload_params: bool = False
    """DeepSpeed ZeRO-3: keep parameter partitions on the CPU between uses."""
    deepspeed_config: str = ""
    """Optional DeepSpeed JSON (e.g. launcher/deepspeed/zero3.json) whose zero_optimization and communication
    settings are used; batch size, accumulation, clipping and precision always come from this config."""
    timeout_minutes: float = 30.0
    """How long a collective waits for the other ranks before the process group gives up; the rank then
    reports the step and phase it was in. Raise it for long evaluations or slow checkpoint storage."""


@dataclass
class TrackConfig:
    backends: list[str] = field(default_factory=lambda: ["wandb", "tensorboard", "jsonl"])
    """Where metrics go besides train.log: wandb (Weights & Biases, see wandb.*), tensorboard (event files in
    <run_dir>/tensorboard) and jsonl (<run_dir>/metrics.jsonl, which `gen-dist status` and `plot` read)."""


@dataclass
class WandbConfig:
    project: str = "gen_dist"
    """W&B project."""
    entity: str = ""
    """W&B entity; empty = the default of the account."""
    mode: str = "auto"
    """auto (online with an API key, offline without), online, offline or disabled."""
    group: str = ""
    """W&B group of the run (a sweep sets it to the sweep's name, so its trials are shown together)."""


@dataclass
class EvalConfig:
    every: int = 0
    """Steps between evaluations during training (and one at the end); 0 = none."""
    n: int = 1000
    """Generated samples per evaluation; the metric names carry it (fid1k, kid1k, ...)."""
    metrics: list[str] = field(default_factory=lambda: ["fid"])
    """Any of fid, kid, is, pr (precision/recall); for conditional models accuracy (the domain classifier's
    agreement with the class or class prompt each sample was drawn for: prompt accuracy for text models); for
    text models clip_score (with eval.clip_model)."""
    extractors: list[str] = field(default_factory=lambda: ["inception"])
    """Feature extractors: 'inception' (the standard InceptionV3, offline) or the path of a classifier run,
    checkpoint or export trained by gen_dist on the dataset (fast; not comparable with published FIDs)."""
    reference_split: str = "test"
    """Split of data.path (a packed dataset) the samples are compared with."""
    reference_path: str = ""
    """Another source (as data.path takes) whose images the samples are compared with; empty = data.path's
    eval.reference_split."""
    reference_n: int = 0
    """Real images used for the reference statistics; 0 = the whole split."""
    batch_size: int = 250
    """Images generated and embedded at once per rank."""
    clip_model: str = ""
    """clip_score: a transformers CLIPModel (a local directory or hub id) whose image and text embeddings score
    each sample against its prompt."""
    seed: int = 0
    """Seed of the evaluation samples (fixed, so successive evaluations compare the same noise)."""


@dataclass
class RunConfig:
    """The sections every run has. The class a config is loaded into (`config_class()`) adds one section per
    registered model family, named after it (`diffusion.*`, `gan.*`, ...)."""

    task: str = "diffusion"
    """Model family (`gen-dist train --help` lists the registered ones); classifier trains the domain feature
    extractor of eval."""
    name: str = "run"
    """Run name (the W&B run name too)."""
    run_dir: str = ""
    """Output directory; empty = runs/<name>. An existing run directory is resumed."""
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    track: TrackConfig = field(default_factory=TrackConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def out_dir(self) -> Path:
        return Path(self.run_dir or f"runs/{self.name}")


METRICS = ("fid", "kid", "is", "pr", "accuracy", "clip_score")
BACKENDS = ("wandb", "tensorboard", "jsonl")


def eval_metric_keys(cfg: RunConfig, reconstructs: bool) -> dict[str, bool]:
    """The metrics an evaluation under cfg.eval logs, each with whether lower is better."""
    e = cfg.eval
    tag = f"{e.n // 1000}k" if e.n % 1000 == 0 else str(e.n)
    out = {"eval/psnr": False} if reconstructs else {}
    for spec in e.extractors:
        name = "inception" if spec == "inception" else "domain"
        names = {"fid": ["fid"], "kid": ["kid"], "pr": ["precision", "recall"],
                 "is": ["is"] if name == "domain" else []}
        names["accuracy"] = ["accuracy"] if name == "domain" else []
        for metric in [m for m in e.metrics if m != "clip_score"]:
            out.update({f"eval/{name}/{m}{tag}": m in ("fid", "kid") for m in names[metric]})
    if "clip_score" in e.metrics:
        out[f"eval/clip_score{tag}"] = False
    return out
CHOICES = {
    "optim.schedule": ("constant", "linear", "cosine"),
    "data.crop": ("center", "random"),
    "train.mixed_precision": ("no", "bf16", "fp16", "auto"),
    "wandb.mode": ("auto", "online", "offline", "disabled"),
    "parallel.zero_stage": (1, 2, 3),
}
POSITIVE = ("data.resolution", "data.batch_size", "data.prefetch", "data.shuffle_buffer", "train.steps",
            "train.grad_accum", "train.log_every", "train.sample_n", "train.ckpt_every", "train.max_nonfinite_steps",
            "train.keep_checkpoints", "eval.n", "eval.batch_size")


def check_divisible(cfg: RunConfig, factor: int, why: str) -> None:
    """data.resolution must be divisible by `factor` (levels that halve the resolution ask for it)."""
    if cfg.data.resolution % factor:
        raise ConfigError(f"data.resolution {cfg.data.resolution} must be divisible by {factor} {why}")


def check_halving_levels(cfg: RunConfig, key: str) -> None:
    """`key` lists one entry per level that halves the resolution: it must not be empty, and data.resolution
    must be divisible by 2^len."""
    levels = len(get_value(cfg, key))
    if not levels:
        raise ConfigError(f"config key '{key}' must not be empty")
    check_divisible(cfg, 2**levels, f"(2^len({key}))")


def get_value(cfg: RunConfig, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def check_keys(cfg: RunConfig, choices: dict[str, tuple], positive: tuple[str, ...]) -> None:
    for key, allowed in choices.items():
        value = get_value(cfg, key)
        if value not in allowed:
            raise ConfigError(f"config key '{key}' must be one of {', '.join(map(str, allowed))}, got {value!r}")
    for key in positive:
        if get_value(cfg, key) <= 0:
            raise ConfigError(f"config key '{key}' must be > 0, got {get_value(cfg, key)!r}")


def check_no_negative_ints(obj: Any, prefix: str = "") -> None:
    """Every integer key is a count, a step, an index or a seed: none may be negative."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            check_no_negative_ints(value, f"{prefix}{f.name}.")
        elif hints[f.name] is int and value < 0:
            raise ConfigError(f"config key '{prefix}{f.name}' must be >= 0, got {value}")


def validate_core(cfg: RunConfig, tasks: tuple[str, ...]) -> None:
    """Checks of the core sections across fields that types alone cannot express; `tasks` are the registered
    family names."""
    check_no_negative_ints(cfg)
    check_keys(cfg, {"task": tasks, **CHOICES}, POSITIVE)
    if not cfg.run_dir and (not cfg.name or cfg.name in (".", "..") or "/" in cfg.name or "\\" in cfg.name):
        raise ConfigError(f"config key 'name' must be a plain name (the run directory is runs/<name>), got "
                          f"{cfg.name!r}; set run_dir to train elsewhere")
    if cfg.data.channels not in (1, 3):
        raise ConfigError(f"config key 'data.channels' must be 1 or 3, got {cfg.data.channels}")
    if cfg.data.num_workers < 0:
        raise ConfigError("config key 'data.num_workers' must be >= 0")
    if cfg.data.buckets and cfg.task != "diffusion":
        raise ConfigError(f"data.buckets trains diffusion models; a {cfg.task} trains on one image shape")
    if cfg.data.buckets and cfg.data.latents:
        raise ConfigError("data.buckets encodes each bucket's images on the fly: data.latents, encoded at one "
                          "size, cannot be bucketed (leave data.latents empty)")
    if not 0 <= cfg.train.ema_decay < 1:
        raise ConfigError("config key 'train.ema_decay' must be in [0, 1)")
    _validate_posthoc(cfg)
    _validate_optim(cfg.optim)
    backends = cfg.track.backends
    if set(backends) - set(BACKENDS) or len(set(backends)) != len(backends):
        raise ConfigError(f"config key 'track.backends' must list distinct entries of {', '.join(BACKENDS)}, got "
                          f"{backends}")
    if cfg.parallel.timeout_minutes <= 0:
        raise ConfigError(f"config key 'parallel.timeout_minutes' must be > 0, got {cfg.parallel.timeout_minutes}")


def _validate_optim(o: OptimConfig) -> None:
    """What torch.optim.AdamW would refuse once the ranks are up."""
    if len(o.betas) != 2:
        raise ConfigError("config key 'optim.betas' must have two values")
    if not all(0 <= b < 1 for b in o.betas):
        raise ConfigError(f"config key 'optim.betas' must both be in [0, 1), got {o.betas}")
    if o.lr < 0:
        raise ConfigError(f"config key 'optim.lr' must be >= 0, got {o.lr}")
    if o.weight_decay < 0:
        raise ConfigError(f"config key 'optim.weight_decay' must be >= 0, got {o.weight_decay}")
    if o.grad_clip < 0:
        raise ConfigError(f"config key 'optim.grad_clip' must be >= 0 (0 disables clipping), got {o.grad_clip}")


MAX_SIGMA_REL = 0.28
"""The longest post-hoc EMA: above it the power function's exponent is negative (sigma_rel peaks at 0.2887 for an
exponent near 0)."""


def _validate_posthoc(cfg: RunConfig) -> None:
    t = cfg.train
    if not t.posthoc_ema:
        return
    if any(not 0 < s <= MAX_SIGMA_REL for s in t.posthoc_ema) or len(set(t.posthoc_ema)) != len(t.posthoc_ema):
        raise ConfigError(f"config key 'train.posthoc_ema' must list distinct relative stds in (0, {MAX_SIGMA_REL}], "
                          f"got {t.posthoc_ema}")
    if t.posthoc_every <= 0:
        raise ConfigError("train.posthoc_ema needs train.posthoc_every > 0 (steps between its snapshots)")


def validate_eval(cfg: RunConfig, generates: bool, reconstructs: bool) -> None:
    e = cfg.eval
    unknown = sorted(set(e.metrics) - set(METRICS))
    if unknown or not e.metrics:
        raise ConfigError(f"eval.metrics must be a non-empty list of {', '.join(METRICS)}; got {e.metrics}")
    if not e.extractors:
        raise ConfigError("eval.extractors must name at least one extractor ('inception' or a classifier run)")
    if e.every < 0 or e.reference_n < 0:
        raise ConfigError("eval.every and eval.reference_n must be >= 0")
    if e.every and not generates:
        raise ConfigError("eval.every needs a generative task; a classifier run generates nothing to evaluate")
    if e.n < 2 or e.reference_n == 1:
        raise ConfigError("eval.n and eval.reference_n (unless 0, the whole split) must be >= 2: the metrics compare "
                          "feature statistics of sets")
    if "clip_score" in e.metrics and not e.clip_model:
        raise ConfigError("eval.metrics clip_score needs eval.clip_model (a CLIP model's directory or hub id)")
    if "accuracy" in e.metrics and "inception" in e.extractors and len(e.extractors) == 1:
        raise ConfigError("eval.metrics accuracy needs a domain classifier in eval.extractors (a classifier run "
                          "trained on the dataset): it checks the class each sample shows")
    if "pr" in e.metrics and (e.n <= 3 or 0 < e.reference_n <= 3):
        raise ConfigError("eval.metrics 'pr' (k-NN precision/recall, k=3) needs eval.n > 3 and eval.reference_n "
                          "0 or > 3")
    if reconstructs and cfg.train.sample_n % 10:
        raise ConfigError(f"train.sample_n={cfg.train.sample_n} must be a multiple of 10 for {cfg.task}: its grid "
                          f"has rows of 10 originals above their reconstructions")
    best = cfg.train.keep_best
    if best:
        known = eval_metric_keys(cfg, reconstructs)
        if not e.every:
            raise ConfigError(f"train.keep_best={best} needs in-training evaluation: set eval.every > 0")
        if best not in known:
            raise ConfigError(f"train.keep_best={best} is not a metric this run's evaluation logs; it logs "
                              f"{', '.join(known)}")


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: RunConfig, path: Path) -> None:
    """Atomically: a run killed while writing it must still find the old file on restart."""
    write_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def write_atomic(path: Path, text: str) -> None:
    """Write the whole file under another name, then rename it: a reader, or a restart after a kill, sees the
    old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
