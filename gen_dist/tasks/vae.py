"""Convolutional VAE: Bernoulli reconstruction likelihood + beta-weighted KL."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from gen_dist.config import RunConfig, check_halving_levels
from gen_dist.tasks import register
from gen_dist.tasks.base import Batch, Checkpointable, Family, Nets, Phase, Task


@dataclass
class VAEConfig:
    channels: list[int] = field(default_factory=lambda: [32, 64])
    """Encoder channels per level (the decoder mirrors them)."""
    latent_dim: int = 16
    """Latent vector size."""
    beta: float = 1.0
    """Weight of the KL term."""


def check(cfg: RunConfig) -> None:
    if cfg.task == "vae":
        check_halving_levels(cfg, "vae.channels")


class ConvVAE(Checkpointable):
    def __init__(self, channels: list[int], image_channels: int, resolution: int, latent_dim: int) -> None:
        super().__init__()
        self.latent_dim, self.end, self.levels = latent_dim, resolution // 2 ** len(channels), len(channels)
        enc: list[nn.Module] = []
        prev = image_channels
        for c in channels:
            enc += [nn.Conv2d(prev, c, 4, stride=2, padding=1), nn.GroupNorm(8, c), nn.SiLU()]
            prev = c
        self.encoder = nn.Sequential(*enc, nn.Flatten())
        self.top = prev
        flat = prev * self.end**2
        self.to_stats = nn.Linear(flat, 2 * latent_dim)
        self.from_latent = nn.Linear(latent_dim, flat)
        dec: list[nn.Module] = []
        for c in reversed(channels):
            dec += [nn.Upsample(scale_factor=2), nn.Conv2d(prev, c, 3, padding=1), nn.GroupNorm(8, c), nn.SiLU()]
            prev = c
        self.decoder = nn.Sequential(*dec, nn.Conv2d(prev, image_channels, 3, padding=1))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Logits of the pixel intensities in [0, 1]."""
        h = self.from_latent(z).view(z.shape[0], self.top, self.end, self.end)
        return self.stack(self.decoder, h, self.levels)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.to_stats(self.stack(self.encoder, x, self.levels)).chunk(2, dim=1)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        return self.decode(z), mu, logvar


class VAETask(Task):
    sampled = "vae"

    def __init__(self, cfg: RunConfig) -> None:
        v = cfg.vae
        self.beta = v.beta
        self.modules = {"vae": ConvVAE(v.channels, cfg.data.channels, cfg.data.resolution, v.latent_dim)}
        self.phases = [Phase("elbo", "vae", self.loss)]

    def loss(self, nets: Nets, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = batch["x"]
        logits, mu, logvar = nets["vae"](x)
        target = (x.float() + 1) / 2
        recon = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none").sum(dim=(1, 2, 3))
        kl = 0.5 * (mu.float().square() + logvar.float().exp() - 1 - logvar.float()).sum(dim=1)
        loss = (recon + self.beta * kl).mean()
        return loss, {"loss": loss.detach(), "recon": recon.detach().mean(), "kl": kl.detach().mean()}

    @torch.no_grad()
    def sample(self, net: nn.Module, labels: torch.Tensor | None, n: int,
               generator: torch.Generator) -> torch.Tensor:
        device = next(net.parameters()).device
        z = torch.randn((n, net.latent_dim), generator=generator).to(device)
        return (torch.sigmoid(net.decode(z).float()) * 2 - 1).clamp(-1, 1)


register(Family("vae", VAEConfig, VAETask, "convolutional VAE: Bernoulli likelihood + beta x KL",
                positive=("latent_dim",), check=check))
