"""The GAN's objective and its schedules: the adversarial losses (non-saturating, hinge, relativistic pairing),
the zero-centred gradient penalties R1 and R2, and values that follow a half cosine over the images seen."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from gen_dist.schema import ConfigError

LOSSES = ("nonsaturating", "hinge", "rpgan")


def d_loss(kind: str, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """D's loss from its logits on a real and a fake batch. rpgan pairs fake i with real i (the same class):
    softplus(-(D(real) - D(fake)))."""
    if kind == "rpgan":
        return F.softplus(fake - real).mean()
    if kind == "hinge":
        return F.relu(1 - real).mean() + F.relu(1 + fake).mean()
    return F.softplus(-real).mean() + F.softplus(fake).mean()


def g_loss(kind: str, fake: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
    """G's loss from D's logits on its fakes (and, for rpgan, on the paired reals, which carry no gradient)."""
    if kind == "rpgan":
        assert real is not None
        return F.softplus(real.detach() - fake).mean()
    if kind == "hinge":
        return -fake.mean()
    return F.softplus(-fake).mean()


def penalty(logit: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Zero-centred gradient penalty per sample, |dD(x)/dx|^2, with the graph kept for the double backward: R1
    on reals, R2 on fakes."""
    (grad,) = torch.autograd.grad(logit.sum(), x, create_graph=True)
    return grad.square().sum(dim=tuple(range(1, grad.ndim)))


@dataclass
class GANSchedule:
    """Values that move along a half cosine from a first to a second value between two image counts and are held
    before and after (R3GAN's schedules). Each value is [] (not scheduled) or [first, second]."""

    kimg: list[float] = field(default_factory=list)
    """[begin, end] in thousands of images seen (all ranks, every micro-batch); [] = nothing scheduled."""
    lr: list[float] = field(default_factory=list)
    """Learning rate of G and D (replaces optim.lr, gan.g_lr and gan.d_lr)."""
    beta2: list[float] = field(default_factory=list)
    """Adam's beta2 of G and D (beta1 stays that of optim.betas, gan.g_betas, gan.d_betas)."""
    gamma: list[float] = field(default_factory=list)
    """Weight of R1 and R2 (those switched on by gan.r1_gamma > 0 and gan.r2_gamma > 0)."""
    ema_kimg: list[float] = field(default_factory=list)
    """Half-life of G's EMA in thousands of images (replaces train.ema_decay; [0, H] ramps it up from zero)."""
    augment_p: list[float] = field(default_factory=list)
    """Probability of each augmentation of gan.augment (replaces gan.augment_p; not with gan.ada_target)."""

    VALUES = ("lr", "beta2", "gamma", "ema_kimg", "augment_p")

    def at(self, name: str, images: int) -> float | None:
        """The value of `name` after `images` images, or None when it is not scheduled."""
        pair = getattr(self, name)
        if not pair:
            return None
        begin, end = (k * 1000 for k in self.kimg)
        done = min(max((images - begin) / (end - begin), 0.0), 1.0)
        return pair[0] + (pair[1] - pair[0]) * (1 - math.cos(math.pi * done)) / 2

    def check(self) -> None:
        if self.kimg and (len(self.kimg) != 2 or self.kimg[0] < 0 or self.kimg[1] <= self.kimg[0]):
            raise ConfigError(f"gan.schedule.kimg={self.kimg} must be [begin, end] thousands of images with "
                              f"0 <= begin < end (its end comes before its start)")
        ranges = {"lr": ">= 0", "beta2": "in [0, 1)", "gamma": ">= 0 (a negative weight is no penalty)",
                  "ema_kimg": ">= 0", "augment_p": "in [0, 1]"}
        within = {"beta2": lambda v: 0 <= v < 1, "augment_p": lambda v: 0 <= v <= 1}
        for name in self.VALUES:
            pair = getattr(self, name)
            if not pair:
                continue
            if not self.kimg:
                raise ConfigError(f"gan.schedule.{name} is set but gan.schedule.kimg is empty: give the images "
                                  f"over which it moves, e.g. gan.schedule.kimg=[0, 20000]")
            if len(pair) != 2 or not all(within.get(name, lambda v: v >= 0)(v) for v in pair):
                raise ConfigError(f"gan.schedule.{name}={pair} must be [first, second], each {ranges[name]}")


def ema_decay(half_life_images: float, global_batch: int) -> float:
    """Decay of one EMA update of `global_batch` images for a half-life in images (0: follow the weights)."""
    return 0.5 ** (global_batch / max(half_life_images, 1e-8))
