"""DCGAN-style conditional GAN: D and G phases, non-saturating or hinge loss, lazy R1."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from gen_dist.config import ConfigError, RunConfig, check_halving_levels
from gen_dist.tasks import register
from gen_dist.tasks.base import Batch, Checkpointable, Family, Nets, Phase, Task


@dataclass
class GANConfig:
    z_dim: int = 64
    """Latent size."""
    channels: list[int] = field(default_factory=lambda: [128, 64])
    """Generator channels per level, coarse to fine (each level doubles the resolution)."""
    d_channels: list[int] = field(default_factory=lambda: [64, 128])
    """Discriminator channels per level, fine to coarse (each level halves the resolution)."""
    num_classes: int = 10
    """Class-conditional with this many classes (projection discriminator); 0 = unconditional."""
    loss: str = "nonsaturating"
    """nonsaturating or hinge."""
    r1_gamma: float = 0.0
    """R1 penalty weight on real images; 0 disables it."""
    r1_every: int = 16
    """Run the R1 phase every this many steps (lazy regularisation)."""


def check(cfg: RunConfig) -> None:
    if cfg.task != "gan":
        return
    g = cfg.gan
    check_halving_levels(cfg, "gan.channels")
    check_halving_levels(cfg, "gan.d_channels")
    if cfg.train.mixed_precision == "fp16" and not cfg.train.loss_scaling:
        raise ConfigError("train.mixed_precision=fp16 with train.loss_scaling=false cannot train a GAN: the "
                          "adversarial gradients underflow in fp16; set train.loss_scaling=true or use bf16")
    from gen_dist.parallel import STRATEGIES

    if g.r1_gamma > 0 and not STRATEGIES[cfg.parallel.strategy].double_backward_ok(cfg):
        raise ConfigError("gan.r1_gamma > 0 needs a double backward through D, which ZeRO-3 cannot run (it frees "
                          "D's gathered weights after the first backward); use parallel.zero_stage 1 or 2, "
                          "parallel.strategy=fsdp, or gan.r1_gamma=0")


def _act() -> nn.Module:
    return nn.LeakyReLU(0.2)


class Generator(Checkpointable):
    def __init__(self, z_dim: int, channels: list[int], out_channels: int, resolution: int,
                 num_classes: int) -> None:
        super().__init__()
        self.z_dim, self.start, self.levels = z_dim, resolution // 2 ** len(channels), len(channels)
        self.embed = nn.Embedding(num_classes, z_dim) if num_classes else None
        in_dim = z_dim * (2 if num_classes else 1)
        self.fc = nn.Linear(in_dim, channels[0] * self.start**2)
        layers: list[nn.Module] = []
        prev = channels[0]
        for c in channels:
            layers += [nn.Upsample(scale_factor=2), nn.Conv2d(prev, c, 3, padding=1), nn.GroupNorm(8, c), _act()]
            prev = c
        layers += [nn.Conv2d(prev, out_channels, 3, padding=1), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed is not None:
            z = torch.cat([z, self.embed(labels)], dim=1)
        h = self.fc(z).view(z.shape[0], -1, self.start, self.start)
        return self.stack(self.net, h, self.levels)


def minibatch_std(h: torch.Tensor, group: int = 4) -> torch.Tensor:
    """Append the feature std over groups of samples as a channel, so D can see a lack of variety (collapse)."""
    n, c, hh, ww = h.shape
    g = group if n % group == 0 else 1
    std = h.float().view(g, -1, c, hh, ww).var(dim=0, unbiased=False).add(1e-8).sqrt().mean(dim=(1, 2, 3))
    return torch.cat([h, std.to(h.dtype).view(1, -1, 1, 1, 1).expand(g, -1, 1, hh, ww).reshape(n, 1, hh, ww)], 1)


class Discriminator(Checkpointable):
    """Strided convolutions, a minibatch-std channel, and a projection term for the class condition."""

    def __init__(self, channels: list[int], in_channels: int, resolution: int, num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_channels
        for c in channels:
            layers += [nn.Conv2d(prev, c, 4, stride=2, padding=1), _act()]
            prev = c
        self.net = nn.Sequential(*layers)
        self.levels = len(channels)
        end = resolution // 2 ** len(channels)
        # A full-size convolution is the dense head; unlike Linear(…, 1) its weight gradient has the strides
        # DDP's gradient buckets expect.
        self.out = nn.Conv2d(prev + 1, 1, kernel_size=end)
        self.embed = nn.Embedding(num_classes, prev) if num_classes else None

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        h = self.stack(self.net, x, self.levels)
        logit = self.out(minibatch_std(h)).flatten()
        if self.embed is not None:
            logit = logit + (self.embed(labels) * h.sum(dim=(2, 3))).sum(dim=1)
        return logit


class GANTask(Task):
    sampled = "G"

    def __init__(self, cfg: RunConfig) -> None:
        g = cfg.gan
        self.num_classes, self.z_dim, self.loss_type = g.num_classes, g.z_dim, g.loss
        self.r1_gamma, self.r1_every = g.r1_gamma, g.r1_every
        res, ch = cfg.data.resolution, cfg.data.channels
        self.modules = {
            "D": Discriminator(g.d_channels, ch, res, g.num_classes),
            "G": Generator(g.z_dim, g.channels, ch, res, g.num_classes),
        }
        self.phases = [Phase("D", "D", self.d_loss), Phase("G", "G", self.g_loss)]
        if g.r1_gamma > 0:
            self.phases.insert(1, Phase("D_r1", "D", self.r1_loss, every=g.r1_every, autocast=False,
                                                  double_backward=True))

    def _fake_inputs(self, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        z = torch.randn(n, self.z_dim, device=device)
        labels = torch.randint(0, self.num_classes, (n,), device=device) if self.num_classes else None
        return z, labels

    def _labels(self, batch: Batch) -> torch.Tensor | None:
        return batch["label"] if self.num_classes else None

    def d_loss(self, nets: Nets, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = batch["x"]
        z, fake_labels = self._fake_inputs(x.shape[0], x.device)
        with torch.no_grad():
            fake = nets["G"](z, fake_labels)
        real_logit = nets["D"](x, self._labels(batch)).float()
        fake_logit = nets["D"](fake, fake_labels).float()
        if self.loss_type == "hinge":
            loss = F.relu(1 - real_logit).mean() + F.relu(1 + fake_logit).mean()
        else:
            loss = F.softplus(-real_logit).mean() + F.softplus(fake_logit).mean()
        return loss, {"loss": loss.detach(), "real_logit": real_logit.detach().mean(),
                      "fake_logit": fake_logit.detach().mean()}

    def g_loss(self, nets: Nets, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        z, labels = self._fake_inputs(batch["x"].shape[0], batch["x"].device)
        logit = nets["D"](nets["G"](z, labels), labels).float()
        loss = -logit.mean() if self.loss_type == "hinge" else F.softplus(-logit).mean()
        return loss, {"loss": loss.detach()}

    def r1_loss(self, nets: Nets, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = batch["x"].detach().requires_grad_(True)
        logit = nets["D"](x, self._labels(batch))
        (grad,) = torch.autograd.grad(logit.sum(), x, create_graph=True)
        penalty = grad.square().sum(dim=(1, 2, 3)).mean()
        # Scaled by the interval so the lazy penalty has the same expected strength as an every-step one.
        # `logit * 0` gives every D parameter a gradient, which DDP's reducer requires of each backward.
        loss = penalty * (self.r1_gamma / 2) * self.r1_every + logit.sum() * 0
        return loss, {"penalty": penalty.detach()}

    @torch.no_grad()
    def sample(self, net: nn.Module, labels: torch.Tensor | None, n: int,
               generator: torch.Generator) -> torch.Tensor:
        device = next(net.parameters()).device
        z = torch.randn((n, self.z_dim), generator=generator).to(device)
        return net(z, labels).float().clamp(-1, 1)


register(Family("gan", GANConfig, GANTask, "GAN: DCGAN-style G and D, non-saturating or hinge loss, lazy R1",
                choices={"loss": ("nonsaturating", "hinge")}, positive=("r1_every", "z_dim"), check=check))
