"""DDPM training (epsilon prediction) of a diffusers UNet, DDIM sampling."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

from gen_dist.config import RunConfig
from gen_dist.tasks.base import Batch, Nets, Phase, Task


def build_unet(cfg: RunConfig) -> UNet2DModel:
    d = cfg.diffusion
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in d.attention)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(d.attention))
    return UNet2DModel(
        sample_size=cfg.data.resolution, in_channels=cfg.data.channels, out_channels=cfg.data.channels,
        block_out_channels=tuple(d.channels), down_block_types=down, up_block_types=up,
        layers_per_block=d.layers_per_block, norm_num_groups=d.norm_groups,
        num_class_embeds=d.num_classes or None,
    )


class DiffusionTask(Task):
    ema_module = "denoiser"

    def __init__(self, cfg: RunConfig) -> None:
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
        device = next(net.parameters()).device
        ddim = DDIMScheduler.from_config(self.scheduler.config)
        ddim.set_timesteps(self.sample_steps)
        size = net.config.sample_size
        x = torch.randn((n, net.config.in_channels, size, size), generator=generator).to(device)
        for t in ddim.timesteps:
            eps = net(x, t.to(device), class_labels=labels).sample
            x = ddim.step(eps, t, x, eta=self.eta, generator=generator).prev_sample
        return x.clamp(-1, 1)
