"""`gen-dist pipeline new`: a Stable-Diffusion-shaped diffusers pipeline assembled from parts gen_dist trained or
has, with a fresh UNet: a KL autoencoder run as its VAE (the scaling factor measured on the run's images), a
transformers text encoder with its tokenizer, and a UNet and noise schedule given by their diffusers configs.
Training it fully under `diffusion.pretrained` then conditions it exactly as the pipeline does, so the result is a
base model that diffusers loads and that fine-tunes like any other Stable Diffusion pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

from gen_dist.artifact import config_for_sampling, resolve
from gen_dist.schema import ConfigError
from gen_dist.tasks.latents import load_first_stage, measure_latent_scale


def _vae(run: Path) -> Any:
    """The autoencoder run as diffusers' AutoencoderKL (its weights already carry that layout), with its scaling
    factor measured as latent diffusion measures it."""
    from diffusers import AutoencoderKL

    art = resolve(run, "vae")
    cfg = config_for_sampling(art.config_text()[0], f"vae {run}", [])
    if cfg.task != "autoencoder":
        raise ConfigError(f"vae: {run} is a {cfg.task} run; a pipeline's VAE is a KL autoencoder (task: autoencoder)")
    first = load_first_stage(run)
    a, levels = cfg.autoencoder, len(cfg.autoencoder.channels)
    vae = AutoencoderKL(in_channels=cfg.data.channels, out_channels=cfg.data.channels,
                        down_block_types=("DownEncoderBlock2D",) * levels,
                        up_block_types=("UpDecoderBlock2D",) * levels,
                        block_out_channels=tuple(a.channels), layers_per_block=a.layers_per_block,
                        latent_channels=a.latent_channels, norm_num_groups=a.norm_groups,
                        sample_size=cfg.data.resolution, mid_block_add_attention=a.mid_attention,
                        scaling_factor=measure_latent_scale(cfg, first))
    vae.load_state_dict(first.state_dict())
    return vae, cfg.data.resolution


def _text(source: Path, max_length: int) -> tuple[Any, Any]:
    """The encoder and its tokenizer; the tokenizer pads to `max_length` (what the pipeline encodes) and the
    pipeline passes the attention mask (its encoder then ignores padding)."""
    import transformers

    net = transformers.AutoModel.from_pretrained(source)
    net.config.use_attention_mask = True
    tokenizer = transformers.AutoTokenizer.from_pretrained(source, model_max_length=max_length)
    return net, tokenizer


def new_pipeline(spec_file: Path, out: Path) -> Path:
    """Assemble the StableDiffusionPipeline that `spec_file` (YAML: vae, text_encoder, max_length, unet,
    scheduler) describes, saved at `out`."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    spec = yaml.safe_load(spec_file.read_text())
    missing = [k for k in ("vae", "text_encoder", "max_length", "unet", "scheduler") if k not in spec]
    if missing:
        raise ConfigError(f"{spec_file}: missing {', '.join(missing)}")
    vae, resolution = _vae(Path(spec["vae"]))
    text_encoder, tokenizer = _text(Path(spec["text_encoder"]), int(spec["max_length"]))
    torch.manual_seed(int(spec.get("seed", 0)))
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    unet = UNet2DConditionModel(**{**spec["unet"], "sample_size": resolution // factor,
                                   "in_channels": vae.config.latent_channels,
                                   "out_channels": vae.config.latent_channels,
                                   "cross_attention_dim": text_encoder.config.hidden_size})
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDPMScheduler(**spec["scheduler"]), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out)
    return out
