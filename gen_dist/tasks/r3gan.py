"""R3GAN's networks (Huang et al. 2024): no normalisation, inverted-bottleneck residual blocks with a grouped 3x3
convolution, fix-up initialisation (the last layer of each block starts at zero, the others are scaled down by
the depth), [1, 2, 1] low-pass resampling, G from a learned basis at the coarsest size and D mirrored, ending in
a projection on the class embedding.

The coarsest stage of each network runs in fp32 under mixed precision, the others in the autocast dtype, as the
recipe keeps its 4x4 stages out of half precision."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from gen_dist.family import Checkpointable

SLOPE = 0.2
GAIN = math.sqrt(2 / (1 + SLOPE**2))
"""Leaky ReLU's gain: the factor that keeps unit variance through it."""


def _msr(weight: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
    """He (MSR) initialisation, std = gain / sqrt(fan in), in place; gain 0 gives zeros."""
    fan_in = weight[0].numel()
    return nn.init.normal_(weight, 0, gain / math.sqrt(fan_in)) if gain else nn.init.zeros_(weight)


def _class_embedding(num_classes: int, dim: int, gain: float) -> nn.Parameter | None:
    """A row per class, as a bias-free linear map of one-hot labels initialised by _msr (fan in = classes)."""
    return nn.Parameter(torch.randn(num_classes, dim) * (gain / math.sqrt(num_classes))) if num_classes else None


class Conv(nn.Module):
    """Bias-free convolution whose weight follows the input's dtype (so the fp32 stage stays fp32 whatever the
    strategy stores the weights in)."""

    def __init__(self, cin: int, cout: int, kernel: int, groups: int = 1, gain: float = 1.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(_msr(torch.empty(cout, cin // groups, kernel, kernel), gain))
        self.groups, self.padding = groups, kernel // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight.to(x.dtype), padding=self.padding, groups=self.groups)


class BiasedAct(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(x + self.bias.to(x.dtype).view(1, -1, 1, 1), SLOPE)


class ResidualBlock(nn.Module):
    """x + 1x1 (expand) -> act -> grouped 3x3 -> act -> 1x1 (project, zero at init). With `depth` blocks in the
    network, the first two layers are scaled by depth^(-1/4) (fix-up: the sum of the residuals stays bounded)."""

    def __init__(self, channels: int, group_width: int, expansion: int, depth: int) -> None:
        super().__init__()
        wide = channels * expansion
        gain = GAIN * depth ** (-1 / 4)  # -1 / (2 x layers - 2) for three layers
        self.expand = Conv(channels, wide, 1, gain=gain)
        self.act1 = BiasedAct(wide)
        self.spatial = Conv(wide, wide, 3, groups=wide // group_width, gain=gain)
        self.act2 = BiasedAct(wide)
        self.project = Conv(wide, channels, 1, gain=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.project(self.act2(self.spatial(self.act1(self.expand(x)))))


def _lowpass() -> torch.Tensor:
    """The 4x4 kernel of [1, 2, 1] resampling by 2 (the filter convolved with a box of 2, outer product, sum 1)."""
    taps = torch.tensor([1.0, 3.0, 3.0, 1.0])
    kernel = taps[:, None] * taps[None, :]
    return kernel / kernel.sum()


class Resample(nn.Module):
    """Low-pass up- or down-sampling by 2 of each channel, then (down) or before (up) a 1x1 convolution when the
    width changes."""

    def __init__(self, cin: int, cout: int, up: bool) -> None:
        super().__init__()
        self.up = up
        self.register_buffer("kernel", _lowpass(), persistent=False)
        self.linear = Conv(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.up and self.linear is not None:
            x = self.linear(x)
        c = x.shape[1]
        k = self.kernel.to(x.dtype).expand(c, 1, 4, 4)
        if self.up:
            x = F.conv_transpose2d(x, k * 4, stride=2, padding=1, groups=c)
        else:
            x = F.conv2d(x, k, stride=2, padding=1, groups=c)
        return x if self.up or self.linear is None else self.linear(x)


class Stage(nn.Module):
    """A transition (basis or resampling) and residual blocks; G's transition comes first, D's last."""

    def __init__(self, transition: nn.Module, blocks: list[nn.Module], first: bool, fp32: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList([transition, *blocks] if first else [*blocks, transition])
        self.fp32 = fp32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp32 and torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return self._run(x.float())
        return self._run(x)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class GenerativeBasis(nn.Module):
    """A learned size x size basis per channel, scaled by a linear map of the latent."""

    def __init__(self, in_dim: int, channels: int, size: int) -> None:
        super().__init__()
        self.basis = nn.Parameter(torch.randn(channels, size, size))
        self.linear = nn.Parameter(_msr(torch.empty(channels, in_dim)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        scale = F.linear(z, self.linear.to(z.dtype))
        return self.basis.to(z.dtype)[None] * scale[:, :, None, None]


class DiscriminativeBasis(nn.Module):
    """A depthwise size x size convolution to one value per channel, then a linear map to the output."""

    def __init__(self, channels: int, out_dim: int, size: int) -> None:
        super().__init__()
        self.basis = Conv(channels, channels, size, groups=channels)
        self.basis.padding = 0
        self.linear = nn.Parameter(_msr(torch.empty(out_dim, channels)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.basis(x).flatten(1), self.linear.to(x.dtype))


class R3Generator(Checkpointable):
    _no_split_modules = ["ResidualBlock"]

    def __init__(self, z_dim: int, widths: list[int], blocks: int, group_width: int, expansion: int,
                 out_channels: int, resolution: int, num_classes: int) -> None:
        super().__init__()
        self.z_dim, depth = z_dim, blocks * len(widths)
        size = resolution // 2 ** (len(widths) - 1)
        self.embed = _class_embedding(num_classes, z_dim, 1.0)

        def res(c: int) -> list[nn.Module]:
            return [ResidualBlock(c, group_width, expansion, depth) for _ in range(blocks)]

        in_dim = z_dim * (2 if num_classes else 1)
        stages = [Stage(GenerativeBasis(in_dim, widths[0], size), res(widths[0]), first=True, fp32=True)]
        stages += [Stage(Resample(a, b, up=True), res(b), first=True, fp32=False)
                   for a, b in zip(widths[:-1], widths[1:], strict=True)]
        self.stages = nn.ModuleList(stages)
        self.out = Conv(widths[-1], out_channels, 1)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed is not None:
            z = torch.cat([z, self.embed[labels].to(z.dtype)], dim=1)
        recompute = self.gradient_checkpointing and torch.is_grad_enabled()
        for stage in self.stages:
            z = checkpoint(stage, z, use_reentrant=False) if recompute else stage(z)
        return self.out(z)


class R3Discriminator(Checkpointable):
    _no_split_modules = ["ResidualBlock"]

    def __init__(self, widths: list[int], blocks: int, group_width: int, expansion: int, in_channels: int,
                 resolution: int, num_classes: int) -> None:
        super().__init__()
        depth = blocks * len(widths)
        size = resolution // 2 ** (len(widths) - 1)
        embed_dim = widths[-1] if num_classes else 1

        def res(c: int) -> list[nn.Module]:
            return [ResidualBlock(c, group_width, expansion, depth) for _ in range(blocks)]

        self.extract = Conv(in_channels, widths[0], 1)
        stages = [Stage(Resample(a, b, up=False), res(a), first=False, fp32=False)
                  for a, b in zip(widths[:-1], widths[1:], strict=True)]
        stages.append(Stage(DiscriminativeBasis(widths[-1], embed_dim, size), res(widths[-1]), first=False,
                            fp32=True))
        self.stages = nn.ModuleList(stages)
        # Projection: logit = <D's features, embedding of the class>, the embedding at gain 1/sqrt(its width).
        self.embed = _class_embedding(num_classes, embed_dim, 1 / math.sqrt(embed_dim))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        h = self.extract(x)
        recompute = self.gradient_checkpointing and torch.is_grad_enabled()
        for stage in self.stages:
            h = checkpoint(stage, h, use_reentrant=False) if recompute else stage(h)
        if self.embed is None:
            return h.flatten().float()
        return (h.float() * self.embed[labels].float()).sum(dim=1)
