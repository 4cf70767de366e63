"""The GAN family, class-conditional or not: D and G phases with the non-saturating, hinge or relativistic
pairing (R3GAN) loss, zero-centred R1 and R2 (every D step or lazy), differentiable augmentation with a fixed,
scheduled or adaptive probability, schedules over the images seen, per-network optimizer settings (TTUR), and
two architectures: the DCGAN-style nets for small budgets and R3GAN's residual nets."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gen_dist import augment
from gen_dist.family import Batch, Family, Nets, Phase, Reduce, StepSums, Task, register
from gen_dist.schema import ConfigError, RunConfig, check_divisible, check_halving_levels
from gen_dist.tasks import gan_recipe
from gen_dist.tasks.dcgan import Discriminator, Generator
from gen_dist.tasks.gan_recipe import GANSchedule
from gen_dist.tasks.r3gan import R3Discriminator, R3Generator


@dataclass
class GANConfig:
    arch: str = "dcgan"
    """dcgan (small, GroupNorm G and strided-convolution D, for CPU budgets) or r3gan (R3GAN's residual nets:
    no normalisation, inverted bottlenecks with grouped 3x3 convolutions, [1, 2, 1] resampling)."""
    z_dim: int = 64
    """Latent size."""
    channels: list[int] = field(default_factory=lambda: [128, 64])
    """Generator widths per level, coarse to fine. dcgan: each level doubles the resolution after a dense start
    at resolution / 2^levels. r3gan: one stage per width, the first a learned basis at resolution / 2^(stages-1)
    (4x4 at R3GAN's sizes), each next one doubling it."""
    d_channels: list[int] = field(default_factory=lambda: [64, 128])
    """Discriminator widths per level, fine to coarse (each level halves the resolution; r3gan: as many stages as
    G's, mirrored, ending in a basis at G's first size)."""
    blocks: int = 2
    """r3gan: residual blocks per stage."""
    group_width: int = 16
    """r3gan: channels per group of the blocks' grouped 3x3 convolution (R3GAN's widths / cardinalities)."""
    expansion: int = 2
    """r3gan: width of a block's inner layers, as a multiple of the stage width (inverted bottleneck)."""
    num_classes: int = 10
    """Class-conditional with this many classes, 0 = unconditional. dcgan G: the class embedding joins z and
    sets a per-class scale and shift of every GroupNorm (identity at init); r3gan G: the embedding joins z. D:
    projection of its features on a class embedding. Fake images get the real batch's labels."""
    mbstd_group: int = 4
    """dcgan D: samples per minibatch-std group (a group of consecutive samples of the global batch, so the
    statistic does not change with the number of ranks); it must divide data.batch_size. 0 = no minibatch std."""
    loss: str = "nonsaturating"
    """nonsaturating, hinge, or rpgan (relativistic pairing: each fake is compared with the real of the same
    place and class, in D's and in G's phase)."""
    r1_gamma: float = 0.0
    """R1 penalty weight (zero-centred, on real images); 0 disables it. For the non-saturating loss it scales
    with resolution: StyleGAN2-ADA's starting point is 0.0002 * res^2 / global batch (0.2 at 256 px with batch
    64); the DCGAN Fashion-MNIST config (28 px, global batch 128) trains well at 0.1. R3GAN's presets use 0.05
    (CIFAR-10) to 2 (FFHQ-64) for R1 and R2 together, scheduled down by 10x (gan.schedule.gamma)."""
    r2_gamma: float = 0.0
    """R2 penalty weight (zero-centred, on un-augmented fakes); with rpgan only. R1 + R2 is what makes the
    relativistic loss locally convergent."""
    r1_every: int = 1
    """R1 and R2 every D step (1: inside D's phase, one backward) or, lazily, in a phase of their own every this
    many steps, scaled by the interval to keep the same expected strength (StyleGAN2 runs R1 every 16)."""
    augment: str = ""
    """Differentiable augmentations of every image D sees (real and fake; in every phase), a comma list applied
    in order: translation (shift by up to 1/8 of the side, zero fill), cutout (zero a square of half the side),
    color (brightness, saturation, contrast), and ADA's geometric ops: xflip, rotate90, xint (shift by up to
    1/8, reflected), scale, aniso, rotate (one bilinear resampling for consecutive scale/aniso/rotate); '' =
    none."""
    augment_p: float = 1.0
    """Probability that each augmentation applies to a sample when neither ADA (gan.ada_target) nor a schedule
    (gan.schedule.augment_p) sets it (1 = always, as in DiffAugment)."""
    ada_target: float = 0.0
    """Adaptive augmentation (ADA): target of r_t = E[sign(D(real))], D's overfitting measure; every
    gan.ada_interval steps the probability rises when r_t is above the target and falls when below (0.6 is
    the usual value). 0 = the fixed or scheduled probability."""
    ada_interval: int = 4
    """Steps between adjustments of the adaptive probability."""
    ada_kimg: float = 100.0
    """Thousands of training images over which the adaptive probability can go from 0 to 1."""
    g_lr: float = 0.0
    """G's learning rate (two time-scale update rule); 0 = optim.lr."""
    d_lr: float = 0.0
    """D's learning rate; 0 = optim.lr."""
    g_betas: list[float] = field(default_factory=list)
    """G's Adam betas; [] = optim.betas. R3GAN uses beta1 = 0."""
    d_betas: list[float] = field(default_factory=list)
    """D's Adam betas; [] = optim.betas."""
    schedule: GANSchedule = field(default_factory=GANSchedule)
    """Learning rate, Adam's beta2, the penalties' gamma, the EMA half-life and the augmentation probability on a
    half cosine over the images seen (R3GAN's recipe)."""


def check(cfg: RunConfig) -> None:
    if cfg.task != "gan":
        return
    g = cfg.gan
    _check_arch(cfg)
    for key in ("r1_gamma", "r2_gamma"):
        if getattr(g, key) < 0:
            raise ConfigError(f"config key 'gan.{key}' must be >= 0 (0 = none), got {getattr(g, key)}")
    if g.r2_gamma > 0 and g.loss != "rpgan":
        raise ConfigError(f"gan.r2_gamma > 0 (R2, the penalty on fakes) applies to gan.loss=rpgan, whose "
                          f"convergence needs R1 and R2; with gan.loss={g.loss} use R1 alone (gan.r2_gamma=0)")
    if cfg.train.mixed_precision == "fp16" and not cfg.train.loss_scaling:
        raise ConfigError("train.mixed_precision=fp16 with train.loss_scaling=false cannot train a GAN: the "
                          "adversarial gradients underflow in fp16; set train.loss_scaling=true or use bf16")
    _check_augment(g)
    _check_optim(g)
    _check_schedule(cfg)
    from gen_dist.parallel import STRATEGIES

    if _penalised(g) and not STRATEGIES[cfg.parallel.strategy].double_backward_ok(cfg):
        raise ConfigError("gan.r1_gamma or gan.r2_gamma > 0 needs a double backward through D, which ZeRO-3 "
                          "cannot run (it frees D's gathered weights after the first backward); use "
                          "parallel.zero_stage 1 or 2, parallel.strategy=fsdp, or no penalty")
    if _penalised(g) and g.r1_every == 1 and cfg.parallel.strategy == "deepspeed":
        raise ConfigError("gan.r1_every=1 puts R1/R2 inside D's adversarial backward, which DeepSpeed's gradient "
                          "hooks cannot take (they reduce the gradients of that backward before its double backward "
                          "is done); under DeepSpeed run the penalties in their own phase with gan.r1_every >= 2 "
                          "(e.g. 2; they are scaled by the interval), or use parallel.strategy=ddp or fsdp")


def _penalised(g: GANConfig) -> bool:
    return g.r1_gamma > 0 or g.r2_gamma > 0


def _check_arch(cfg: RunConfig) -> None:
    g = cfg.gan
    if g.arch == "dcgan":
        check_halving_levels(cfg, "gan.channels")
        check_halving_levels(cfg, "gan.d_channels")
        for key in ("channels", "d_channels"):
            if any(c > 8 and c % 8 for c in getattr(g, key)):
                raise ConfigError(f"config key 'gan.{key}' must hold multiples of 8 or values up to 8 (GroupNorm "
                                  f"groups), got {getattr(g, key)}")
        if g.mbstd_group < 0 or (g.mbstd_group and cfg.data.batch_size % g.mbstd_group):
            raise ConfigError(f"gan.mbstd_group={g.mbstd_group} must divide data.batch_size={cfg.data.batch_size} "
                              f"(each micro-batch holds whole groups), or be 0 (no minibatch std)")
        return
    if not g.channels or len(g.d_channels) != len(g.channels):
        raise ConfigError(f"gan.arch=r3gan mirrors G in D: gan.d_channels {g.d_channels} must have as many stages "
                          f"as gan.channels {g.channels} (e.g. gan.d_channels={list(reversed(g.channels))})")
    check_divisible(cfg, 2 ** (len(g.channels) - 1), "(2^(stages - 1) of gan.channels)")
    for key in ("channels", "d_channels"):
        bad = [c for c in getattr(g, key) if (c * g.expansion) % g.group_width]
        if bad:
            raise ConfigError(f"gan.{key}: width {bad[0]} x gan.expansion {g.expansion} is not divisible by "
                              f"gan.group_width {g.group_width} (the grouped convolution's channels per group)")


def _check_augment(g: GANConfig) -> None:
    try:
        ops = augment.parse(g.augment)
    except ValueError as e:
        raise ConfigError(f"gan.augment={g.augment!r}: {e}") from None
    if not 0 <= g.augment_p <= 1:
        raise ConfigError(f"gan.augment_p={g.augment_p} must be in [0, 1]")
    if not 0 <= g.ada_target < 1:
        raise ConfigError(f"gan.ada_target={g.ada_target} must be in [0, 1) (0 = fixed gan.augment_p)")
    if (g.ada_target > 0 or g.schedule.augment_p) and not ops:
        what = "gan.ada_target > 0 adapts" if g.ada_target > 0 else "gan.schedule.augment_p schedules"
        raise ConfigError(f"{what} the probability of gan.augment, which is empty; name the augmentations "
                          f"(e.g. gan.augment=translation,cutout,color) or unset it")
    if g.ada_target > 0 and g.schedule.augment_p:
        raise ConfigError("gan.ada_target > 0 and gan.schedule.augment_p both set the augmentation probability; "
                          "adapt it (ADA) or schedule it (R3GAN), not both")


def _check_optim(g: GANConfig) -> None:
    for key in ("g_lr", "d_lr"):
        if getattr(g, key) < 0:
            raise ConfigError(f"gan.{key}={getattr(g, key)} must be >= 0 (0 = optim.lr)")
    for key in ("g_betas", "d_betas"):
        betas = getattr(g, key)
        if betas and (len(betas) != 2 or not all(0 <= b < 1 for b in betas)):
            raise ConfigError(f"gan.{key}={betas} must be [] (optim.betas) or two values in [0, 1)")


def _check_schedule(cfg: RunConfig) -> None:
    g, s = cfg.gan, cfg.gan.schedule
    s.check()
    if s.lr and (g.g_lr or g.d_lr):
        raise ConfigError("gan.schedule.lr sets the learning rate of G and D; unset gan.g_lr and gan.d_lr")
    if s.lr and (cfg.optim.schedule != "constant" or cfg.optim.warmup_steps):
        raise ConfigError("gan.schedule.lr replaces optim.schedule and optim.warmup_steps; set "
                          "optim.schedule=constant and optim.warmup_steps=0")
    if s.gamma and not _penalised(g):
        raise ConfigError("gan.schedule.gamma schedules the weight of R1 and R2, but both are off; switch them on "
                          "with gan.r1_gamma > 0 (and gan.r2_gamma > 0 for rpgan)")
    if s.ema_kimg and cfg.train.ema_decay <= 0:
        raise ConfigError("gan.schedule.ema_kimg sets the half-life of G's EMA, which train.ema_decay=0 turns off; "
                          "set train.ema_decay > 0 (the schedule then replaces it)")


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
        self.gammas = {"r1": g.r1_gamma, "r2": g.r2_gamma}
        self.penalties = tuple(k for k, v in self.gammas.items() if v > 0)
        self.r1_every, self.schedule = g.r1_every, g.schedule
        self.modules = _nets(cfg)
        self.optim = {n: o for n, o in (("G", _own_optim(g.g_lr, g.g_betas)), ("D", _own_optim(g.d_lr, g.d_betas)))
                      if o}
        self.betas1 = {"G": (g.g_betas or cfg.optim.betas)[0], "D": (g.d_betas or cfg.optim.betas)[0]}
        self.aug = Augment(g)
        penalised = _penalised(g)
        # The penalties need fp32 only where fp16's range cannot hold a gradient of a gradient.
        in_d = penalised and g.r1_every == 1
        self.phases = [Phase("D", "D", self.d_loss, double_backward=in_d,
                             autocast=not in_d or cfg.train.mixed_precision != "fp16"),
                       Phase("G", "G", self.g_loss)]
        if penalised and g.r1_every > 1:
            self.phases.insert(1, Phase("D_reg", "D", self.reg_loss, every=g.r1_every, autocast=False,
                                        double_backward=True))

    def state_dict(self) -> dict[str, Any]:
        return {"augment": self.aug.state_dict()} if self.aug.ops else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "augment" in state and self.aug.ops:
            self.aug.load_state_dict(state["augment"])

    def scheduled(self, images: int, global_batch: int) -> dict[str, Any]:
        s, out = self.schedule, {}  # type: GANSchedule, dict[str, Any]
        gamma, p = s.at("gamma", images), s.at("augment_p", images)
        if gamma is not None:
            self.gammas = {k: (gamma if k in self.penalties else 0.0) for k in self.gammas}
        if p is not None:
            self.aug.p = torch.tensor(p)
        lr, beta2, half_life = s.at("lr", images), s.at("beta2", images), s.at("ema_kimg", images)
        for name in ("G", "D"):
            if lr is not None:
                out[f"lr/{name}"] = lr
            if beta2 is not None:
                out[f"betas/{name}"] = (self.betas1[name], beta2)
        if half_life is not None:
            out["ema_decay"] = gan_recipe.ema_decay(half_life * 1000, global_batch)
        return out

    def after_step(self, nets: Nets, reduce: Reduce, step: int) -> None:
        self.aug.update(reduce, step)

    def _fake_inputs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """z, and the real batch's labels: fake i is of the class of real i, which rpgan pairs it with."""
        x = batch["x"]
        return torch.randn(x.shape[0], self.z_dim, device=x.device), self._labels(batch)

    def _labels(self, batch: Batch) -> torch.Tensor | None:
        return batch["label"] if self.num_classes else None

    def d_loss(self, nets: Nets, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        z, labels = self._fake_inputs(batch)
        with torch.no_grad():
            fake = nets["G"](z, labels)
        in_phase = self.phases[0].double_backward
        real, fake = (t.detach().requires_grad_(in_phase) for t in (batch["x"], fake))
        real_logit = nets["D"](self.aug(real), labels).float()
        fake_logit = nets["D"](self.aug(fake), labels).float()
        self.aug.observe(batch, real_logit)
        loss = gan_recipe.d_loss(self.loss_type, real_logit, fake_logit)
        stats = {"loss": loss.detach(), "real_logit": real_logit.detach().mean(),
                 "fake_logit": fake_logit.detach().mean()}
        if in_phase:
            reg, reg_stats = self._penalties(real, real_logit, fake, fake_logit, 1)
            loss, stats = loss + reg, stats | reg_stats
        if self.aug.ops:
            stats |= {"augment_p": self.aug.p.to(real.device), "real_sign": real_logit.detach().sign().mean()}
        return loss, stats

    def _penalties(self, real: torch.Tensor, real_logit: torch.Tensor, fake: torch.Tensor | None,
                   fake_logit: torch.Tensor | None, scale: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """gamma / 2 x (R1 + R2), x `scale` (the lazy interval). The gradients are taken with respect to the
        images before augmentation."""
        total, stats = real_logit.new_zeros(()), {}
        for name, x, logit in (("r1", real, real_logit), ("r2", fake, fake_logit)):
            if name in self.penalties:
                value = gan_recipe.penalty(logit, x).mean()
                total = total + value * (self.gammas[name] / 2) * scale
                stats |= {f"{name}_penalty": value.detach(), f"{name}_gamma": torch.tensor(self.gammas[name])}
        return total, stats

    def g_loss(self, nets: Nets, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        z, labels = self._fake_inputs(batch)
        logit = nets["D"](self.aug(nets["G"](z, labels)), labels).float()
        real = nets["D"](self.aug(batch["x"]), labels).float() if self.loss_type == "rpgan" else None
        loss = gan_recipe.g_loss(self.loss_type, logit, real)
        return loss, {"loss": loss.detach()}

    def reg_loss(self, nets: Nets, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The lazy penalties' phase, every gan.r1_every steps."""
        z, labels = self._fake_inputs(batch)
        with torch.no_grad():
            fake = nets["G"](z, labels) if "r2" in self.penalties else None
        real = batch["x"].detach().requires_grad_(True)
        real_logit = nets["D"](self.aug(real), labels)
        fake_logit = None
        if fake is not None:
            fake = fake.detach().requires_grad_(True)
            fake_logit = nets["D"](self.aug(fake), labels)
        loss, stats = self._penalties(real, real_logit, fake, fake_logit, self.r1_every)
        # `logit * 0` gives every D parameter a gradient, which DDP's reducer requires of each backward.
        return loss + real_logit.sum() * 0, stats

    @torch.no_grad()
    def sample(self, net: nn.Module, labels: torch.Tensor | None, n: int,
               generator: torch.Generator) -> torch.Tensor:
        device = next(net.parameters()).device
        z = torch.randn((n, self.z_dim), generator=generator).to(device)
        return net(z, labels).float().clamp(-1, 1)


def _nets(cfg: RunConfig) -> dict[str, nn.Module]:
    g, res, ch = cfg.gan, cfg.data.resolution, cfg.data.channels
    if g.arch == "r3gan":
        return {"D": R3Discriminator(g.d_channels, g.blocks, g.group_width, g.expansion, ch, res, g.num_classes),
                "G": R3Generator(g.z_dim, g.channels, g.blocks, g.group_width, g.expansion, ch, res, g.num_classes)}
    return {"D": Discriminator(g.d_channels, ch, res, g.num_classes, g.mbstd_group),
            "G": Generator(g.z_dim, g.channels, ch, res, g.num_classes)}


register(Family("gan", GANConfig, GANTask,
                "GAN: DCGAN-style or R3GAN nets, non-saturating/hinge/relativistic loss, R1 + R2, augmentation "
                "(ADA or scheduled), schedules over images seen, TTUR",
                choices={"loss": gan_recipe.LOSSES, "arch": ("dcgan", "r3gan")},
                positive=("r1_every", "z_dim", "ada_interval", "ada_kimg", "blocks", "group_width", "expansion"),
                check=check))
