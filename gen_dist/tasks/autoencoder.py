"""Autoencoders with spatial latents, the first stages of latent diffusion: a KL-regularised autoencoder
(diffusers' AutoencoderKL, from scratch) and a VQ-VAE (diffusers' encoder and decoder around an EMA codebook with
dead-code restarts). Both train on a reconstruction loss, optionally with a perceptual loss on a frozen
classifier's features and a patch discriminator that joins at a set step (taming / SGM). Their "samples" are
reconstructions of the evaluation split, so grids and `gen-dist eval` measure reconstruction (PSNR, rFID)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gen_dist.artifact import config_text_of
from gen_dist.data import reference_images
from gen_dist.family import Batch, Checkpointable, Family, Nets, Phase, Reduce, StepSums, Task, register
from gen_dist.parsing import read_yaml
from gen_dist.schema import ConfigError, RunConfig, check_divisible
from gen_dist.tasks.classifier import DomainClassifier


@dataclass
class AutoencoderConfig:
    channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    """Encoder channels per level (the decoder mirrors them); each level but the last halves the resolution."""
    layers_per_block: int = 1
    """ResNet layers per level."""
    norm_groups: int = 8
    """GroupNorm groups."""
    latent_channels: int = 4
    """Channels of the spatial latent."""
    mid_attention: bool = True
    """Self-attention in the middle block of encoder and decoder."""
    recon_loss: str = "l1"
    """Pixel reconstruction loss: l1 (sharper, taming / SGM) or mse."""
    kl_weight: float = 1.0e-6
    """autoencoder: weight of the KL to N(0, I) per latent element (Stable Diffusion's VAE: 1e-6); keeps the
    latent's scale in check without turning it into a VAE prior."""
    perceptual: str = ""
    """A classifier run, checkpoint or export (task: classifier) whose features at every level give a perceptual
    loss (LPIPS-style: unit-normalised channels, squared distance); empty = none."""
    perceptual_weight: float = 1.0
    """Weight of the perceptual loss."""
    disc_weight: float = 0.0
    """Weight of the patch discriminator's hinge loss in the autoencoder's loss; 0 = no discriminator."""
    disc_start: int = 0
    """First step of the adversarial phase and term: the discriminator joins once reconstructions are sharp."""
    disc_channels: list[int] = field(default_factory=lambda: [32, 64])
    """Patch discriminator channels per strided level."""


@dataclass
class VQVAEConfig(AutoencoderConfig):
    codebook_size: int = 256
    """Codes in the codebook."""
    commitment: float = 0.25
    """Weight of the commitment loss ||h - sg(q)||^2 that keeps encoder outputs near their codes."""
    codebook_decay: float = 0.99
    """Per-step decay of the codebook's moving averages (counts and sums of the vectors assigned to each code)."""
    dead_threshold: float = 1.0
    """A code whose moving-average count of assignments per step falls below this is restarted on an encoder
    output of the step, so that every code stays in use."""


def check(cfg: RunConfig) -> None:
    if cfg.task not in ("autoencoder", "vqvae"):
        return
    a = getattr(cfg, cfg.task)
    if not a.channels:
        raise ConfigError(f"config key '{cfg.task}.channels' must not be empty")
    check_divisible(cfg, 2 ** (len(a.channels) - 1), f"for {len(a.channels)} {cfg.task} levels")
    for key in ("kl_weight", "perceptual_weight", "disc_weight", "commitment"):  # integers: config's own check
        if getattr(a, key, 0) < 0:
            raise ConfigError(f"config key '{cfg.task}.{key}' must be >= 0, got {getattr(a, key)!r}")
    if any(c % a.norm_groups for c in a.channels):
        raise ConfigError(f"config key '{cfg.task}.channels' must be multiples of {cfg.task}.norm_groups "
                          f"({a.norm_groups}), got {a.channels}")
    if a.disc_weight > 0:
        _check_disc(cfg, a)
    if a.perceptual and not Path(a.perceptual).exists():
        raise ConfigError(f"{cfg.task}.perceptual: {a.perceptual} does not exist (a classifier run, checkpoint or "
                          f"export)")
    if a.perceptual:
        found = (read_yaml(config_text_of(Path(a.perceptual), f"{cfg.task}.perceptual")) or {}).get("task")
        if found != "classifier":
            raise ConfigError(f"{cfg.task}.perceptual: {a.perceptual} holds a model of task {found}, not a "
                              f"classifier (train one with `gen-dist train configs/classifier_<dataset>.yaml`)")
    if cfg.task == "vqvae" and a.codebook_size < 2:
        raise ConfigError(f"config key 'vqvae.codebook_size' must be >= 2, got {a.codebook_size}")
    if cfg.task == "vqvae" and not 0 <= a.codebook_decay < 1:
        raise ConfigError(f"config key 'vqvae.codebook_decay' must be in [0, 1), got {a.codebook_decay!r}")


def _check_disc(cfg: RunConfig, a: AutoencoderConfig) -> None:
    """What the patch discriminator's layers refuse once built."""
    key = f"{cfg.task}.disc_channels"
    if any(c % 8 for c in a.disc_channels[1:]):
        raise ConfigError(f"config key '{key}' after the first must be multiples of 8 (GroupNorm groups), got "
                          f"{a.disc_channels}")
    if cfg.data.resolution // 2 ** len(a.disc_channels) < 1:
        raise ConfigError(f"config key '{key}' has {len(a.disc_channels)} levels, each halving the resolution: too "
                          f"many for data.resolution {cfg.data.resolution}")


# ------------------------------------------------------------------------------------------- networks


def _coder_kwargs(a: AutoencoderConfig) -> dict[str, Any]:
    return {"block_out_channels": tuple(a.channels), "layers_per_block": a.layers_per_block,
            "norm_num_groups": a.norm_groups, "mid_block_add_attention": a.mid_attention}


class EMACodebook(nn.Module):
    """Nearest-code quantiser whose codes are the moving averages of the encoder outputs assigned to them (van
    den Oord et al. 2017, appendix). Kept in buffers and changed only by `update`, outside autograd, with
    statistics summed over ranks: every rank holds the same codebook, and checkpoints and EMA copies carry it."""

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("embedding", torch.randn(size, dim) * 0.1)
        self.register_buffer("ema_count", torch.zeros(size))
        self.register_buffer("ema_sum", torch.zeros(size, dim))
        self.register_buffer("updates", torch.zeros(()))

    def codes(self, h: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code of every vector of `h` (N, D)."""
        e = self.embedding
        return (h.square().sum(1, keepdim=True) - 2 * h @ e.T + e.square().sum(1)).argmin(dim=1)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(quantised h with the straight-through gradient, code indices (N, H, W)) of a latent map h."""
        n, c, hh, ww = h.shape
        flat = h.float().permute(0, 2, 3, 1).reshape(-1, c)
        idx = self.codes(flat)
        q = self.embedding[idx].view(n, hh, ww, c).permute(0, 3, 1, 2).to(h.dtype)
        return h + (q - h).detach(), idx.view(n, hh, ww)

    @torch.no_grad()
    def update(self, counts: torch.Tensor, sums: torch.Tensor, candidates: torch.Tensor, decay: float,
               threshold: float) -> torch.Tensor:
        """Fold a step's assignment counts and vector sums (over all ranks) into the averages; restart the codes
        whose average count is under `threshold` on `candidates` (encoder outputs of the step, one per code);
        returns how many were restarted."""
        # Until 1 / n falls below 1 - decay, the plain mean of the n steps so far: averages from zero would
        # call every code dead for the first hundreds of steps.
        self.updates += 1
        weight = torch.clamp(1 / self.updates, min=1 - decay)
        self.ema_count.lerp_(counts, weight)
        self.ema_sum.lerp_(sums, weight)
        # Laplace smoothing keeps a rarely used code's division finite.
        total = self.ema_count.sum()
        smoothed = (self.ema_count + 1e-5) / (total + len(self.ema_count) * 1e-5) * total
        self.embedding.copy_(self.ema_sum / smoothed.clamp(min=1e-12).unsqueeze(1))
        dead = self.ema_count < threshold
        self.embedding[dead] = candidates[dead]
        self.ema_sum[dead] = candidates[dead] * threshold
        self.ema_count[dead] = threshold
        return dead.sum()


class SpatialAutoencoder(nn.Module):
    """diffusers' Encoder and Decoder in the layout and parameter names of its AutoencoderKL (a diagonal
    Gaussian posterior) or, with a codebook, of its VQModel (encoder, quant_conv, quantize, post_quant_conv,
    decoder). `forward` is the whole training pass, so that a strategy that gathers parameters around the
    module's forward (FSDP2) sees every use; `encode` and `decode` serve the frozen and sampled copies."""

    def __init__(self, a: AutoencoderConfig, channels: int, codebook: int = 0) -> None:
        from diffusers.models.autoencoders.vae import Decoder, Encoder

        super().__init__()
        levels, latent = len(a.channels), a.latent_channels
        moments = latent if codebook else 2 * latent
        self.encoder = Encoder(in_channels=channels, out_channels=latent, double_z=not codebook,
                               down_block_types=("DownEncoderBlock2D",) * levels, **_coder_kwargs(a))
        self.quant_conv = nn.Conv2d(moments, moments, 1)
        self.quantize = EMACodebook(codebook, latent) if codebook else None
        self.post_quant_conv = nn.Conv2d(latent, latent, 1)
        self.decoder = Decoder(in_channels=latent, out_channels=channels,
                               up_block_types=("UpDecoderBlock2D",) * levels, **_coder_kwargs(a))

    def enable_gradient_checkpointing(self) -> None:
        """diffusers' own checkpointing of each block of the encoder and decoder."""
        from torch.utils.checkpoint import checkpoint

        def func(module: nn.Module, *args: Any) -> Any:
            return checkpoint(module.__call__, *args, use_reentrant=False)

        for coder in (self.encoder, self.decoder):
            coder.gradient_checkpointing, coder._gradient_checkpointing_func = True, func

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
        """(reconstruction, the encoder's output (Gaussian moments, or the latent before quantisation), and
        with a codebook (its codes' vectors, their indices)). The KL posterior is sampled; the codebook's
        gradient is straight-through."""
        moments = self.quant_conv(self.encoder(x))
        if self.quantize is None:
            return self.decoder(self.post_quant_conv(self.posterior(moments).sample())), moments, ()
        z, idx = self.quantize(moments)
        return self.decoder(self.post_quant_conv(z)), moments, (self.quantize.embedding[idx], idx)

    @staticmethod
    def posterior(moments: torch.Tensor) -> Any:
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        return DiagonalGaussianDistribution(moments)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The latent that latent diffusion learns: the posterior mean, or the latent before quantisation
        (decoding quantises it)."""
        moments = self.quant_conv(self.encoder(x))
        return moments if self.quantize is not None else self.posterior(moments).mean

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.quantize is not None:
            z = self.quantize(z)[0]
        return self.decoder(self.post_quant_conv(z))


class PatchDiscriminator(Checkpointable):
    """A logit per patch (PatchGAN, as in taming): strided convolutions, GroupNorm instead of BatchNorm so that
    ranks and micro-batches do not change the statistics."""

    def __init__(self, channels: list[int], image_channels: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = image_channels
        for i, c in enumerate(channels):
            layers += [nn.Conv2d(prev, c, 4, stride=2, padding=1)]
            layers += [nn.GroupNorm(8, c)] if i else []
            layers += [nn.LeakyReLU(0.2)]
            prev = c
        self.net = nn.Sequential(*layers, nn.Conv2d(prev, 1, 3, padding=1))
        self.levels = max(1, len(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stack(self.net, x, self.levels)


class Perceptual(nn.Module):
    """LPIPS-style distance on a frozen classifier trained by gen_dist: per level, channels normalised to unit
    length, squared distance averaged over positions, summed over levels (no learned weights)."""

    def __init__(self, path: Path, channels: int) -> None:
        super().__init__()
        found = DomainClassifier(path, torch.device("cpu"))
        if found.channels != channels:
            raise ConfigError(f"perceptual network {path} takes {found.channels}-channel images, the data has "
                              f"{channels}")
        self.body = found.net.body
        self.levels = [i for i, m in enumerate(self.body) if isinstance(m, nn.SiLU)][1::2]

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = torch.cat([x, y])
        total = h.new_zeros(len(x))
        for i, layer in enumerate(self.body[: self.levels[-1] + 1]):
            h = layer(h)
            if i in self.levels:
                a, b = F.normalize(h.float(), dim=1).chunk(2)
                total = total + (a - b).square().sum(1).mean(dim=(1, 2))
        return total


# ------------------------------------------------------------------------------------------- tasks


class AutoencoderTask(Task):
    """The KL autoencoder; `VQVAETask` swaps the bottleneck."""

    family = "autoencoder"
    sampled = "autoencoder"
    reconstructs = True
    for_sampling = ("autoencoder.perceptual=", "autoencoder.disc_weight=0")

    def __init__(self, cfg: RunConfig) -> None:
        self.run_cfg, self.cfg = cfg, getattr(cfg, self.family)
        a = self.cfg
        self.modules = {self.sampled: self.build(cfg)}
        self.phases = [Phase("recon", self.sampled, self.loss)]
        if a.disc_weight > 0:
            self.modules["disc"] = PatchDiscriminator(a.disc_channels, cfg.data.channels)
            self.phases.append(Phase("disc", "disc", self.disc_loss, start=a.disc_start))
        if a.perceptual:
            self.frozen = {"perceptual": Perceptual(Path(a.perceptual), cfg.data.channels)}

    def build(self, cfg: RunConfig) -> nn.Module:
        return SpatialAutoencoder(self.cfg, cfg.data.channels)

    def bottleneck(self, net: nn.Module, x: torch.Tensor, batch: Batch
                   ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(reconstruction, regulariser to add to the loss, stats)."""
        recon, moments, _ = net(x)
        posterior = SpatialAutoencoder.posterior(moments.float())
        kl = posterior.kl() / posterior.mean[0].numel()
        return recon, self.cfg.kl_weight * kl.mean(), {"kl": kl.detach().mean()}

    def loss(self, nets: Nets, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        a, x = self.cfg, batch["x"]
        recon, reg, stats = self.bottleneck(nets[self.sampled], x, batch)
        diff = recon.float() - x.float()
        pixel = diff.abs().mean() if a.recon_loss == "l1" else diff.square().mean()
        loss = pixel + reg
        stats.update(pixel=pixel.detach(), psnr=_psnr(diff.detach()))
        if a.perceptual:
            p = nets["perceptual"](recon, x).mean()
            loss = loss + a.perceptual_weight * p
            stats["perceptual"] = p.detach()
        if a.disc_weight > 0 and step >= a.disc_start:
            g = -nets["disc"](recon).float().mean()
            loss = loss + a.disc_weight * g
            stats["adversarial"] = g.detach()
        return loss, {"loss": loss.detach(), **stats}

    def disc_loss(self, nets: Nets, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = batch["x"]
        with torch.no_grad():
            recon = nets[self.sampled](x)[0]
        real, fake = nets["disc"](x).float(), nets["disc"](recon).float()
        loss = F.relu(1 - real).mean() + F.relu(1 + fake).mean()
        return loss, {"loss": loss.detach(), "real_logit": real.detach().mean(), "fake_logit": fake.detach().mean()}

    @torch.no_grad()
    def reconstruct(self, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Decoded latent of `x` in [-1, 1] (the posterior mean; the quantised latent for a VQ-VAE)."""
        return net.decode(net.encode(x)).float().clamp(-1, 1)

    def real_images(self, start: int, size: int) -> torch.Tensor:
        return reference_images(self.run_cfg, start, size)


def _psnr(diff: torch.Tensor) -> torch.Tensor:
    """Mean PSNR (dB) of images whose difference in [-1, 1] units is `diff` (peak-to-peak 2)."""
    mse = diff.square().mean(dim=(1, 2, 3)).clamp(min=1e-10)
    return (10 * torch.log10(4 / mse)).mean()


class VQVAETask(AutoencoderTask):
    family = "vqvae"
    sampled = "vqvae"
    for_sampling = ("vqvae.perceptual=", "vqvae.disc_weight=0")
    cfg: VQVAEConfig

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        self.step_sums = StepSums()  # per code: count and vector sum of this step's assignments; restart picks

    def build(self, cfg: RunConfig) -> nn.Module:
        return SpatialAutoencoder(self.cfg, cfg.data.channels, codebook=self.cfg.codebook_size)

    def bottleneck(self, net: nn.Module, x: torch.Tensor, batch: Batch
                   ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        recon, h, (q, idx) = net(x)
        commit = (h.float() - q.permute(0, 3, 1, 2).float()).square().mean()
        self._observe(batch, h.detach().float(), idx)
        return recon, self.cfg.commitment * commit, {"commitment": commit.detach()}

    def _observe(self, batch: Batch, h: torch.Tensor, idx: torch.Tensor) -> None:
        """This micro-batch's per-code counts and sums; restart candidates only from the first micro-batch of
        the global batch, so that the sum over ranks picks the same ones on any number of ranks."""
        k, c = self.cfg.codebook_size, h.shape[1]
        flat, idx = h.permute(0, 2, 3, 1).reshape(-1, c), idx.flatten()
        counts = torch.zeros(k, device=h.device).index_add_(0, idx, torch.ones_like(idx, dtype=torch.float))
        sums = torch.zeros(k, c, device=h.device).index_add_(0, idx, flat)
        candidates = torch.zeros(k, c, device=h.device)
        if batch.get("micro") == 0:
            pick = torch.randint(0, len(flat), (k,), device=h.device)
            candidates = flat[pick]
        self.step_sums.add(batch, torch.cat([counts.unsqueeze(1), sums, candidates], dim=1))

    @torch.no_grad()
    def after_step(self, nets: Nets, reduce: Reduce, step: int) -> dict[str, torch.Tensor]:
        book, c = nets[self.sampled].quantize, self.cfg.latent_channels
        # A checksum of this rank's codebook and a 1 ride along in the step's one reduction: their sums say
        # whether every rank entered the step with the same codebook (drift 0).
        e = book.embedding.double()
        check = (e * torch.arange(1, e.numel() + 1, dtype=e.dtype, device=e.device).view_as(e)).sum()
        mine = self.step_sums.take(lambda t: t).double()
        extra = torch.zeros(len(mine), 1, dtype=mine.dtype, device=mine.device)
        extra[0, 0], extra[1, 0] = check, 1.0
        total = reduce(torch.cat([mine, extra], dim=1))
        counts, sums, candidates = (t.float() for t in (total[:, 0], total[:, 1 : 1 + c], total[:, 1 + c : -1]))
        drift = (total[0, -1] - total[1, -1] * check).abs() / check.abs().clamp(min=1e-30)
        restarted = book.update(counts, sums, candidates, self.cfg.codebook_decay, self.cfg.dead_threshold)
        return {"vq/usage": (counts > 0).float().mean(), "vq/perplexity": _perplexity(counts),
                "vq/restarted": restarted.float(), "vq/codebook_drift": drift.float()}


def _perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of the code distribution given by `counts`: the number of codes in effective use."""
    p = counts / counts.sum().clamp(min=1)
    return torch.exp(-(p * torch.log(p.clamp(min=1e-12))).sum())


_CHOICES = {"recon_loss": ("l1", "mse")}
_POSITIVE = ("latent_channels", "layers_per_block", "norm_groups")
register(Family("autoencoder", AutoencoderConfig, AutoencoderTask,
                "KL autoencoder with spatial latents (diffusers' AutoencoderKL): a latent-diffusion first stage",
                choices=_CHOICES, positive=_POSITIVE, check=check))
register(Family("vqvae", VQVAEConfig, VQVAETask,
                "VQ-VAE with spatial codes: EMA codebook with dead-code restarts; a latent-diffusion first stage",
                choices=_CHOICES, positive=(*_POSITIVE, "codebook_size", "dead_threshold"), check=check))
