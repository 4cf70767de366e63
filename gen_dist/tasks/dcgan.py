"""The DCGAN-style networks, for small budgets: G from a dense layer through upsampling convolutions with
class-conditional GroupNorm, D of strided convolutions with a minibatch-std channel and a class projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from gen_dist.family import Checkpointable


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


def minibatch_std(h: torch.Tensor, group: int) -> torch.Tensor:
    """Append, as a channel, the feature std over each group of `group` consecutive samples, so D can see a lack
    of variety (collapse). The groups are fixed by the global batch's order, not by the micro-batch: any number
    of ranks or accumulation steps that keeps whole groups in a micro-batch gives each sample the same value (a
    short micro-batch at an epoch's end makes a last, smaller group). Sums by index_add, which autocast leaves
    in fp32."""
    n, _, hh, ww = h.shape
    flat, ids = h.float().flatten(1), torch.arange(n, device=h.device) // group
    groups = int(ids[-1]) + 1
    count = torch.zeros(groups, 1, device=h.device).index_add(0, ids, torch.ones(n, 1, device=h.device))
    mean = torch.zeros(groups, flat.shape[1], device=h.device).index_add(0, ids, flat) / count
    var = torch.zeros_like(mean).index_add(0, ids, (flat - mean[ids]).square()) / count
    std = var.add(1e-8).sqrt().mean(dim=1)[ids]
    return torch.cat([h, std.to(h.dtype).view(n, 1, 1, 1).expand(n, 1, hh, ww)], 1)


class Discriminator(Checkpointable):
    """Strided convolutions, a minibatch-std channel over fixed groups of samples (none when `mbstd_group` is 0),
    and a projection term for the class condition: logit = out(h) + <embed(y), mean-pooled h>."""

    def __init__(self, channels: list[int], in_channels: int, resolution: int, num_classes: int,
                 mbstd_group: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_channels
        for c in channels:
            layers += [nn.Conv2d(prev, c, 4, stride=2, padding=1), _act()]
            prev = c
        self.net = nn.Sequential(*layers)
        self.levels, self.group = len(channels), mbstd_group
        end = resolution // 2 ** len(channels)
        # A full-size convolution is the dense head; unlike Linear(…, 1) its weight gradient has the strides
        # DDP's gradient buckets expect.
        self.out = nn.Conv2d(prev + (1 if mbstd_group else 0), 1, kernel_size=end)
        self.embed = nn.Embedding(num_classes, prev) if num_classes else None
        if self.embed is not None:
            # Zero: D starts unconditional. N(0, 1) rows against features summed over positions started the
            # projection tens of times larger than the dense head.
            nn.init.zeros_(self.embed.weight)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        h = self.stack(self.net, x, self.levels)
        logit = self.out(minibatch_std(h, self.group) if self.group else h).flatten()
        if self.embed is None:
            return logit
        return logit + (self.embed(labels) * h.mean(dim=(2, 3))).sum(dim=1)
