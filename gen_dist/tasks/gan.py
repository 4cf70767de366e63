"""DCGAN-style GAN, class-conditional or not: D and G phases, non-saturating or hinge loss, lazy R1,
differentiable augmentation with an adaptive probability, and per-network optimizer settings (TTUR)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from gen_dist import augment
from gen_dist.family import Batch, Checkpointable, Family, Nets, Phase, Reduce, StepSums, Task, register
from gen_dist.schema import ConfigError, RunConfig, check_halving_levels


@dataclass
class GANConfig:
    z_dim: int = 64
    """Latent size."""
    channels: list[int] = field(default_factory=lambda: [128, 64])
    """Generator channels per level, coarse to fine (each level doubles the resolution)."""
    d_channels: list[int] = field(default_factory=lambda: [64, 128])
    """Discriminator channels per level, fine to coarse (each level halves the resolution)."""
    num_classes: int = 10
    """Class-conditional with this many classes, 0 = unconditional. G: the class embedding joins z and sets a
    per-class scale and shift of every GroupNorm (identity at init); D: projection of the pooled features on a
    class embedding, and a minibatch-std channel taken within each class (across classes it would always show
    variety, so it would not see G ignoring z within a class). Fake images get the real batch's labels."""
    loss: str = "nonsaturating"
    """nonsaturating or hinge."""
    r1_gamma: float = 0.0
    """R1 penalty weight on real images; 0 disables it. It scales with resolution: StyleGAN2-ADA's starting
    point is 0.0002 * res^2 / global batch (0.2 at 256 px with batch 64, 6.6 at 1024 px with 32); at 28-32 px
    with batch 64-128 that is ~0.001-0.003, while the Fashion-MNIST config (28 px, global batch 128) trains well
    at 0.1. Raise it when D's real logits run away, lower it when samples stay blurry."""
    r1_every: int = 16
    """Run the R1 phase every this many steps (lazy regularisation)."""
    augment: str = ""
    """Differentiable augmentations of every image D sees (real and fake; D, R1 and G phases): a comma list of
    translation (shift by up to 1/8 of the side, zero fill), cutout (zero a square of half the side), color
    (brightness, saturation, contrast); '' = none."""
    augment_p: float = 1.0
    """Probability that each augmentation applies to a sample when gan.ada_target=0 (1 = always, as in
    DiffAugment). Under ADA the probability starts at 0 and adapts."""
    ada_target: float = 0.0
    """Adaptive augmentation (ADA): target of r_t = E[sign(D(real))], D's overfitting measure; every
    gan.ada_interval steps the probability rises when r_t is above the target and falls when below (0.6 is
    the usual value). 0 = the fixed probability gan.augment_p."""
    ada_interval: int = 4
    """Steps between adjustments of the adaptive probability."""
    ada_kimg: float = 100.0
    """Thousands of training images over which the adaptive probability can go from 0 to 1."""
    g_lr: float = 0.0
    """G's learning rate (two time-scale update rule); 0 = optim.lr."""
    d_lr: float = 0.0
    """D's learning rate; 0 = optim.lr."""
    g_betas: list[float] = field(default_factory=list)
    """G's Adam betas; [] = optim.betas."""
    d_betas: list[float] = field(default_factory=list)
    """D's Adam betas; [] = optim.betas."""


def check(cfg: RunConfig) -> None:
    if cfg.task != "gan":
        return
    g = cfg.gan
    check_halving_levels(cfg, "gan.channels")
    check_halving_levels(cfg, "gan.d_channels")
    for key in ("channels", "d_channels"):
        if any(c > 8 and c % 8 for c in getattr(g, key)):
            raise ConfigError(f"config key 'gan.{key}' must hold multiples of 8 or values up to 8 (GroupNorm "
                              f"groups), got {getattr(g, key)}")
    if g.r1_gamma < 0:
        raise ConfigError(f"config key 'gan.r1_gamma' must be >= 0 (0 = no R1), got {g.r1_gamma}")
    if cfg.train.mixed_precision == "fp16" and not cfg.train.loss_scaling:
        raise ConfigError("train.mixed_precision=fp16 with train.loss_scaling=false cannot train a GAN: the "
                          "adversarial gradients underflow in fp16; set train.loss_scaling=true or use bf16")
    _check_augment(g)
    _check_optim(g)
    from gen_dist.parallel import STRATEGIES

    if g.r1_gamma > 0 and not STRATEGIES[cfg.parallel.strategy].double_backward_ok(cfg):
        raise ConfigError("gan.r1_gamma > 0 needs a double backward through D, which ZeRO-3 cannot run (it frees "
                          "D's gathered weights after the first backward); use parallel.zero_stage 1 or 2, "
                          "parallel.strategy=fsdp, or gan.r1_gamma=0")


def _check_augment(g: GANConfig) -> None:
    try:
        ops = augment.parse(g.augment)
    except ValueError as e:
        raise ConfigError(f"gan.augment={g.augment!r}: {e}") from None
    if not 0 <= g.augment_p <= 1:
        raise ConfigError(f"gan.augment_p={g.augment_p} must be in [0, 1]")
    if not 0 <= g.ada_target < 1:
        raise ConfigError(f"gan.ada_target={g.ada_target} must be in [0, 1) (0 = fixed gan.augment_p)")
    if g.ada_target > 0 and not ops:
        raise ConfigError("gan.ada_target > 0 adapts the probability of gan.augment, which is empty; name the "
                          "augmentations (e.g. gan.augment=translation,cutout,color) or set gan.ada_target=0")


def _check_optim(g: GANConfig) -> None:
    for key in ("g_lr", "d_lr"):
        if getattr(g, key) < 0:
            raise ConfigError(f"gan.{key}={getattr(g, key)} must be >= 0 (0 = optim.lr)")
    for key in ("g_betas", "d_betas"):
        betas = getattr(g, key)
        if betas and (len(betas) != 2 or not all(0 <= b < 1 for b in betas)):
            raise ConfigError(f"gan.{key}={betas} must be [] (optim.betas) or two values in [0, 1)")


def _act() -> nn.Module:
    return nn.LeakyReLU(0.2)


class ClassNorm(nn.Module):
    """GroupNorm whose scale and shift are learned per class (conditional normalisation); they start as the
    identity, so a conditional G starts as the unconditional one. Without classes: a plain affine GroupNorm."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(min(8, channels), channels, affine=not num_classes)
        self.embed = nn.Embedding(num_classes, 2 * channels) if num_classes else None
        if self.embed is not None:
            nn.init.zeros_(self.embed.weight)

    def forward(self, h: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        h = self.norm(h)
        if self.embed is None:
            return h
        scale, shift = self.embed(labels)[:, :, None, None].to(h.dtype).chunk(2, dim=1)
        return h * (1 + scale) + shift


class GBlock(nn.Module):
    """Upsample x2, 3x3 convolution, class-conditional norm, activation."""

    def __init__(self, cin: int, cout: int, num_classes: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm = ClassNorm(cout, num_classes)
        self.act = _act()

    def forward(self, h: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        h = self.conv(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.act(self.norm(h, labels))


class Generator(Checkpointable):
    def __init__(self, z_dim: int, channels: list[int], out_channels: int, resolution: int,
                 num_classes: int) -> None:
        super().__init__()
        self.z_dim, self.start = z_dim, resolution // 2 ** len(channels)
        self.embed = nn.Embedding(num_classes, z_dim) if num_classes else None
        in_dim = z_dim * (2 if num_classes else 1)
        self.fc = nn.Linear(in_dim, channels[0] * self.start**2)
        self.fc_norm = ClassNorm(channels[0], num_classes)
        self.blocks = nn.ModuleList(GBlock(cin, cout, num_classes)
                                    for cin, cout in zip(channels[:1] + channels[:-1], channels, strict=True))
        self.out = nn.Sequential(nn.Conv2d(channels[-1], out_channels, 3, padding=1), nn.Tanh())

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed is not None:
            z = torch.cat([z, self.embed(labels)], dim=1)
        h = self.fc(z).view(z.shape[0], -1, self.start, self.start)
        h = F.leaky_relu(self.fc_norm(h, labels), 0.2)
        recompute = self.gradient_checkpointing and torch.is_grad_enabled()
        for block in self.blocks:
            # Each level keeps only its input for backward when checkpointing.
            h = checkpoint(block, h, labels, use_reentrant=False) if recompute else block(h, labels)
        return self.out(h)


def minibatch_std(h: torch.Tensor, group: int = 4) -> torch.Tensor:
    """Append the feature std over groups of samples as a channel, so D can see a lack of variety (collapse)."""
    n, c, hh, ww = h.shape
    g = group if n % group == 0 else 1
    std = h.float().view(g, -1, c, hh, ww).var(dim=0, unbiased=False).add(1e-8).sqrt().mean(dim=(1, 2, 3))
    return torch.cat([h, std.to(h.dtype).view(1, -1, 1, 1, 1).expand(g, -1, 1, hh, ww).reshape(n, 1, hh, ww)], 1)


def classwise_std(h: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Append, for each sample, the feature std over the samples of its class in the batch as a channel: D sees
    a lack of variety within a class, which a std across classes hides. Sums by index_add, which autocast
    leaves in fp32 (a matmul with one-hot rows would run in bf16)."""
    n, _, hh, ww = h.shape
    flat = h.float().flatten(1)
    count = torch.zeros(num_classes, 1, device=h.device).index_add(0, labels, torch.ones(n, 1, device=h.device))
    mean = torch.zeros(num_classes, flat.shape[1], device=h.device).index_add(0, labels, flat) / count.clamp(min=1)
    sq = (flat - mean[labels]).square()
    var = torch.zeros_like(mean).index_add(0, labels, sq) / count.clamp(min=1)
    std = var.add(1e-8).sqrt().mean(dim=1)[labels]
    return torch.cat([h, std.to(h.dtype).view(n, 1, 1, 1).expand(n, 1, hh, ww)], 1)


class Discriminator(Checkpointable):
    """Strided convolutions, a minibatch-std channel (within each class when conditional), and a projection
    term for the class condition: logit = out(h) + <embed(y), mean-pooled h>."""

    def __init__(self, channels: list[int], in_channels: int, resolution: int, num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_channels
        for c in channels:
            layers += [nn.Conv2d(prev, c, 4, stride=2, padding=1), _act()]
            prev = c
        self.net = nn.Sequential(*layers)
        self.levels, self.num_classes = len(channels), num_classes
        end = resolution // 2 ** len(channels)
        # A full-size convolution is the dense head; unlike Linear(…, 1) its weight gradient has the strides
        # DDP's gradient buckets expect.
        self.out = nn.Conv2d(prev + 1, 1, kernel_size=end)
        self.embed = nn.Embedding(num_classes, prev) if num_classes else None
        if self.embed is not None:
            # Zero: D starts unconditional. N(0, 1) rows against features summed over positions started the
            # projection tens of times larger than the dense head.
            nn.init.zeros_(self.embed.weight)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        h = self.stack(self.net, x, self.levels)
        if self.embed is None:
            return self.out(minibatch_std(h)).flatten()
        logit = self.out(classwise_std(h, labels, self.num_classes)).flatten()
        return logit + (self.embed(labels) * h.mean(dim=(2, 3))).sum(dim=1)


class Augment:
    """The augmentation of a run and its probability p; under ADA, r_t is summed over ranks each step and p
    moves every `interval` steps by sign(r_t - target) x (images of the interval) / (kimg x 1000)."""

    def __init__(self, g: GANConfig) -> None:
        self.ops = augment.parse(g.augment)
        self.target, self.interval, self.kimg = g.ada_target, g.ada_interval, g.ada_kimg
        self.p = torch.tensor(0.0 if self.adaptive else g.augment_p)
        self.sums = torch.zeros(2)  # (sum of sign(D(real)), count) since the last adjustment, all ranks
        self.step_sums = StepSums()  # (sum of sign(D(real)), count) of this step

    @property
    def adaptive(self) -> bool:
        return bool(self.ops) and self.target > 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return augment.augment(x, self.ops, self.p) if self.ops else x

    def observe(self, batch: Batch, real_logit: torch.Tensor) -> None:
        if self.adaptive:
            signs = real_logit.detach().sign()
            self.step_sums.add(batch, torch.stack([signs.sum(), torch.full((), float(signs.numel()),
                                                                      device=signs.device)]))

    def update(self, reduce: Reduce, step: int) -> None:
        if not self.adaptive:
            return
        # Reduced every step (two numbers), so the sums a checkpoint keeps are the same on every rank.
        mine = self.step_sums.take(reduce)
        self.sums = self.sums.to(mine.device) + mine
        if (step + 1) % self.interval:
            return
        rt = self.sums[0] / self.sums[1]
        adjust = torch.sign(rt - self.target) * self.sums[1] / (self.kimg * 1000)
        self.p = (self.p.to(mine.device) + adjust).clamp(0, 1)
        self.sums = torch.zeros_like(self.sums)

    def state_dict(self) -> dict[str, Any]:
        return {"p": self.p.item(), "sums": self.sums.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.p = torch.tensor(state["p"], dtype=torch.float32)
        self.sums = torch.tensor(state["sums"], dtype=torch.float32)


def _own_optim(lr: float, betas: list[float]) -> dict[str, Any]:
    return {**({"lr": lr} if lr else {}), **({"betas": list(betas)} if betas else {})}


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
        self.optim = {n: o for n, o in (("G", _own_optim(g.g_lr, g.g_betas)), ("D", _own_optim(g.d_lr, g.d_betas)))
                      if o}
        self.aug = Augment(g)
        self.phases = [Phase("D", "D", self.d_loss), Phase("G", "G", self.g_loss)]
        if g.r1_gamma > 0:
            self.phases.insert(1, Phase("D_r1", "D", self.r1_loss, every=g.r1_every, autocast=False,
                                        double_backward=True))

    def state_dict(self) -> dict[str, Any]:
        return {"augment": self.aug.state_dict()} if self.aug.ops else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "augment" in state and self.aug.ops:
            self.aug.load_state_dict(state["augment"])

    def after_step(self, nets: Nets, reduce: Reduce, step: int) -> None:
        self.aug.update(reduce, step)

    def _fake_inputs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """z, and the real batch's labels: real and fake batches hold the same classes, which the within-class
        minibatch std of D compares."""
        x = batch["x"]
        return torch.randn(x.shape[0], self.z_dim, device=x.device), self._labels(batch)

    def _labels(self, batch: Batch) -> torch.Tensor | None:
        return batch["label"] if self.num_classes else None

    def d_loss(self, nets: Nets, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, labels = batch["x"], self._labels(batch)
        z, _ = self._fake_inputs(batch)
        with torch.no_grad():
            fake = nets["G"](z, labels)
        real_logit = nets["D"](self.aug(x), labels).float()
        fake_logit = nets["D"](self.aug(fake), labels).float()
        self.aug.observe(batch, real_logit)
        if self.loss_type == "hinge":
            loss = F.relu(1 - real_logit).mean() + F.relu(1 + fake_logit).mean()
        else:
            loss = F.softplus(-real_logit).mean() + F.softplus(fake_logit).mean()
        stats = {"loss": loss.detach(), "real_logit": real_logit.detach().mean(),
                 "fake_logit": fake_logit.detach().mean()}
        if self.aug.ops:
            stats |= {"augment_p": self.aug.p.to(x.device), "real_sign": real_logit.detach().sign().mean()}
        return loss, stats

    def g_loss(self, nets: Nets, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        z, labels = self._fake_inputs(batch)
        logit = nets["D"](self.aug(nets["G"](z, labels)), labels).float()
        loss = -logit.mean() if self.loss_type == "hinge" else F.softplus(-logit).mean()
        return loss, {"loss": loss.detach()}

    def r1_loss(self, nets: Nets, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = batch["x"].detach().requires_grad_(True)
        logit = nets["D"](self.aug(x), self._labels(batch))
        # The gradient is taken with respect to the images before augmentation.
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


register(Family("gan", GANConfig, GANTask,
                "GAN: DCGAN-style G and D, class-conditional norm, augmentation/ADA, lazy R1, TTUR",
                choices={"loss": ("nonsaturating", "hinge")},
                positive=("r1_every", "z_dim", "ada_interval", "ada_kimg"), check=check))
