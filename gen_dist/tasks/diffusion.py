"""DDPM training (epsilon prediction) of a diffusers UNet, DDIM sampling."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from gen_dist.config import ConfigError, RunConfig, check_divisible
from gen_dist.tasks import register
from gen_dist.tasks.base import Batch, Family, Nets, Phase, Task

if TYPE_CHECKING:
    from diffusers import UNet2DModel


@dataclass
class DiffusionConfig:
    channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    """UNet channels per resolution level."""
    attention: list[bool] = field(default_factory=lambda: [False, False, True])
    """Self-attention at each level."""
    layers_per_block: int = 1
    """ResNet layers per UNet block."""
    head_dim: int = 8
    """Channels per attention head (fewer, wider heads run faster on CPUs)."""
    norm_groups: int = 8
    """GroupNorm groups."""
    num_classes: int = 10
    """Class-conditional with this many classes; 0 = unconditional."""
    train_timesteps: int = 1000
    """DDPM training timesteps."""
    beta_schedule: str = "squaredcos_cap_v2"
    """DDPM beta schedule (diffusers name): linear, scaled_linear or squaredcos_cap_v2."""
    sample_steps: int = 100
    """DDIM steps when sampling."""
    ddim_eta: float = 1.0
    """DDIM noise: 1 = ancestral (DDPM-like, best for short-trained models), 0 = deterministic DDIM."""


def check(cfg: RunConfig) -> None:
    d = cfg.diffusion
    if len(d.channels) != len(d.attention):
        raise ConfigError("config keys 'diffusion.channels' and 'diffusion.attention' must have the same length")
    if cfg.task == "diffusion":
        check_divisible(cfg, 2 ** (len(d.channels) - 1), f"for {len(d.channels)} UNet levels")


def build_unet(cfg: RunConfig) -> UNet2DModel:
    from diffusers import UNet2DModel

    d = cfg.diffusion
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in d.attention)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(d.attention))
    return UNet2DModel(
        sample_size=cfg.data.resolution, in_channels=cfg.data.channels, out_channels=cfg.data.channels,
        block_out_channels=tuple(d.channels), down_block_types=down, up_block_types=up,
        layers_per_block=d.layers_per_block, norm_num_groups=d.norm_groups,
        num_class_embeds=d.num_classes or None, attention_head_dim=d.head_dim,
    )


class DiffusionTask(Task):
    sampled = "denoiser"

    def __init__(self, cfg: RunConfig) -> None:
        from diffusers import DDPMScheduler

        d = cfg.diffusion
        self.num_classes = d.num_classes
        self.sample_steps, self.eta = d.sample_steps, d.ddim_eta
        self.modules = {"denoiser": build_unet(cfg)}
        self.scheduler = DDPMScheduler(num_train_timesteps=d.train_timesteps, beta_schedule=d.beta_schedule,
                                       prediction_type="epsilon")
        self.phases = [Phase("denoise", "denoiser", self.loss)]

    def loss(self, nets: Nets, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = batch["x"]
        noise = torch.randn_like(x)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (x.shape[0],), device=x.device)
        xt = self.scheduler.add_noise(x, noise, t)
        labels = batch["label"] if self.num_classes else None
        pred = nets["denoiser"](xt, t, class_labels=labels).sample
        loss = F.mse_loss(pred.float(), noise.float())
        return loss, {"loss": loss.detach()}

    @torch.no_grad()
    def sample(self, net: torch.nn.Module, labels: torch.Tensor | None, n: int,
               generator: torch.Generator) -> torch.Tensor:
        from diffusers import DDIMScheduler

        device = next(net.parameters()).device
        ddim = DDIMScheduler.from_config(self.scheduler.config)
        ddim.set_timesteps(self.sample_steps)
        size = net.config.sample_size
        x = torch.randn((n, net.config.in_channels, size, size), generator=generator).to(device)
        for t in ddim.timesteps:
            eps = net(x, t.to(device), class_labels=labels).sample
            x = ddim.step(eps, t, x, eta=self.eta, generator=generator).prev_sample
        return x.clamp(-1, 1)


register(Family("diffusion", DiffusionConfig, DiffusionTask, "denoising diffusion (DDPM, epsilon) of a diffusers UNet",
                choices={"beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2")},
                positive=("sample_steps", "head_dim"), check=check))
