"""Latent diffusion's first stage: the autoencoder that diffusion.first_stage names (trained by gen_dist, or a
pretrained diffusers AutoencoderKL directory such as Stable Diffusion's VAE), loaded frozen, and the latent
datasets it encodes (`gen-dist data latents`, data.latents)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gen_dist.artifact import config_for_sampling, resolve, weights_digest
from gen_dist.data import open_catalog, split_images, write_latent_shards
from gen_dist.family import family
from gen_dist.images import to_model_range
from gen_dist.schema import ConfigError, RunConfig


def pretrained_kl(path: Path) -> dict | None:
    """The config of a diffusers AutoencoderKL directory, or None for anything else."""
    found = path / "config.json"
    if not found.is_file():
        return None
    config = json.loads(found.read_text())
    return config if config.get("_class_name") == "AutoencoderKL" else None


class PretrainedKL(nn.Module):
    """A diffusers AutoencoderKL serving as a first stage: the mode of its latent distribution, and its decoder."""

    def __init__(self, path: Path) -> None:
        from diffusers import AutoencoderKL

        super().__init__()
        self.vae = AutoencoderKL.from_pretrained(path).float()
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self.shift = float(self.vae.config.get("shift_factor") or 0.0)  # SD3's and Flux's latents are centred

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(x).latent_dist.mode() - self.shift

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z + self.shift).sample


def first_stage_config(path: Path) -> RunConfig:
    """The config of the autoencoder diffusion.first_stage names (reads metadata only)."""
    text = resolve(path, "diffusion.first_stage").source_config_text("first_stage")
    cfg = config_for_sampling(text, f"first stage {path}", [])
    if not family(cfg.task).task.reconstructs:
        raise ConfigError(f"diffusion.first_stage: {path} is a {cfg.task} model, not an autoencoder (train one "
                          f"with task: autoencoder or task: vqvae)")
    return cfg


def latent_shape(cfg: RunConfig) -> tuple[int, int]:
    """(channels, resolution) of the first stage's latents of this run's images."""
    kl = pretrained_kl(Path(cfg.diffusion.first_stage))
    if kl is not None:
        if kl["in_channels"] != cfg.data.channels:
            raise ConfigError(f"diffusion.first_stage {cfg.diffusion.first_stage} takes {kl['in_channels']}-channel "
                              f"images; data.channels is {cfg.data.channels}")
        return kl["latent_channels"], cfg.data.resolution // 2 ** (len(kl["block_out_channels"]) - 1)
    first = first_stage_config(Path(cfg.diffusion.first_stage))
    if (first.data.channels, first.data.resolution) != (cfg.data.channels, cfg.data.resolution):
        raise ConfigError(f"diffusion.first_stage was trained on {first.data.channels}-channel "
                          f"{first.data.resolution}px images; this run has {cfg.data.channels}-channel "
                          f"{cfg.data.resolution}px (data.channels, data.resolution)")
    a = getattr(first, first.task)
    return a.latent_channels, first.data.resolution // 2 ** (len(a.channels) - 1)


def load_first_stage(path: Path) -> nn.Module:
    """The trained autoencoder (EMA weights where kept), frozen: `encode` and `decode` are what it serves."""
    if pretrained_kl(path) is not None:
        return PretrainedKL(path).eval().requires_grad_(False)
    art = resolve(path, "diffusion.first_stage")
    carried = art.frozen("first_stage")
    cfg, weights = carried if carried is not None else (art.config(), None)
    weights = weights if weights is not None else art.sampled_weights(cfg, use_ema=True)
    task = family(cfg.task).task(cfg)
    net = task.modules[task.sampled]
    net.load_state_dict(weights)
    return net.eval().requires_grad_(False)


SCALE_IMAGES = 512
"""Training images whose latents give the latent scale."""


def measure_latent_scale(cfg: RunConfig, first: nn.Module) -> float:
    """1 / std of the latents `first` makes of the first SCALE_IMAGES training images of `cfg`, in index order: the
    same on every rank without a collective."""
    d = cfg.data
    catalog = open_catalog(d.path, d.split, d.index)
    device = next(first.parameters()).device
    images = split_images(cfg, catalog, 0, min(SCALE_IMAGES, catalog.total))
    z = torch.cat([encode_latents(first, to_model_range(c.to(device))) for c in images.split(128)])
    return 1.0 / z.double().std().item()


@torch.no_grad()
def encode_latents(first: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Unscaled latents of images `x` in [-1, 1], in fp32 whatever the autocast around."""
    with torch.autocast(x.device.type, enabled=False):
        return first.encode(x.float()).float()


def weights_ident(net: nn.Module) -> str:
    """A hash of a module's weights: which first stage encoded a latent dataset."""
    return weights_digest(net.state_dict())[:16]


def encode_split(first_stage: Path, data: Path, split: str, out: Path, resolution: int = 0) -> dict:
    """`gen-dist data latents`: the images of `split` of `data` encoded by `first_stage` (an autoencoder run, a
    diffusers AutoencoderKL directory or a pipeline's, at `resolution`) into latent shards of the same layout and
    keys, other members (labels, captions) kept, for data.latents."""
    if (first_stage / "model_index.json").is_file():
        first_stage = first_stage / "vae"
    kl = pretrained_kl(first_stage)
    if kl is not None and not resolution:
        raise ConfigError(f"gen-dist data latents {first_stage}: a pretrained VAE needs --resolution")
    channels, size = (kl["in_channels"], resolution) if kl is not None else (None, first_stage_config(
        first_stage).data.resolution)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    first = load_first_stage(first_stage).to(device)

    def encode(images: Any) -> Any:
        return encode_latents(first, to_model_range(torch.from_numpy(images).to(device))).cpu().numpy()

    about = {"first_stage": str(first_stage), "ident": weights_ident(first), "resolution": size,
             **({"channels": channels} if channels else {})}
    return write_latent_shards(data, split, out, encode, about)


def check_latents(cfg: RunConfig, first: nn.Module) -> None:
    """data.latents was encoded by this run's first stage."""
    about = open_catalog(cfg.data.latents, cfg.data.split).latents
    if about is None:
        raise ConfigError(f"data.latents: {cfg.data.latents} holds images, not latents: write them with "
                          f"`gen-dist data latents FIRST_STAGE --data {cfg.data.path} --out DIR`")
    if about["ident"] != weights_ident(first):
        raise ConfigError(f"data.latents: {cfg.data.latents} was encoded by {about['first_stage']}, whose weights "
                          f"differ from diffusion.first_stage {cfg.diffusion.first_stage}: encode them again")
