"""Convolutional VAE: a Bernoulli or discretised (logistic / Gaussian, learned per-pixel scale) reconstruction
likelihood, beta-weighted KL with linear warm-up and free bits, and the negative ELBO in bits per dimension."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from gen_dist.family import Batch, Checkpointable, Family, Nets, Phase, Reduce, StepSums, Task, register
from gen_dist.schema import ConfigError, RunConfig, check_halving_levels

LIKELIHOODS = ("bernoulli", "logistic", "gaussian")
BINS = 256
LOG_SCALE_MIN, LOG_SCALE_MAX = -7.0, 2.0
"""Range of the decoder's log-scale (in [-1, 1] pixel units): below -7 a bin holds all the mass already, and
the clamp keeps the CDF differences of a bin representable in float32."""


@dataclass
class VAEConfig:
    channels: list[int] = field(default_factory=lambda: [32, 64])
    """Encoder channels per level (the decoder mirrors them)."""
    latent_dim: int = 16
    """Latent vector size."""
    beta: float = 1.0
    """Weight of the KL term once warmed up (1 = the ELBO)."""
    likelihood: str = "bernoulli"
    """Decoder likelihood of a pixel: bernoulli (intensity in [0, 1] as the probability; its mean is a blur),
    logistic or gaussian (discretised to the 256 pixel levels, the decoder predicting a mean and a log-scale per
    pixel, so the negative ELBO is a code length of the 8-bit image). Samples are the decoded mean in every case:
    drawing pixel noise from the likelihood only adds speckle, which makes FID worse."""
    kl_warmup_steps: int = 0
    """The KL weight ramps linearly from 0 at step 0 to `beta` at this step (0: `beta` from the start), so the
    decoder learns to use the latent before the KL pulls the posterior onto the prior."""
    free_bits: float = 0.0
    """Nats per latent dimension: a dimension whose KL (averaged over the micro-batch) is below this is not
    penalised (Kingma et al. 2016), which keeps dimensions from collapsing to the prior early; 0 disables."""
    res_blocks: int = 0
    """Residual blocks after each encoder level and each decoder level."""
    prior: str = "standard"
    """What samples are drawn from: standard (the N(0, I) prior of training) or fitted (a full-covariance
    Gaussian fitted to the aggregate posterior of the training images, tracked as a moving average during
    training: ex-post density estimation, Ghosh et al. 2020), which lands fewer draws in regions of the latent
    space that no training image encodes to."""
    prior_decay: float = 0.99
    """prior=fitted: per-step decay of the moving averages of the posterior statistics."""
    sample_temperature: float = 1.0
    """Std of the prior draws when sampling: below 1 keeps samples away from the prior's tails, where the
    aggregate posterior leaves holes the decoder never learnt, at some cost in variety."""


def check(cfg: RunConfig) -> None:
    if cfg.task != "vae":
        return
    v = cfg.vae
    check_halving_levels(cfg, "vae.channels")
    for key in ("beta", "free_bits"):  # integer keys: config's own check
        if getattr(v, key) < 0:
            raise ConfigError(f"config key 'vae.{key}' must be >= 0, got {getattr(v, key)!r}")
    if not 0 <= v.prior_decay < 1:
        raise ConfigError(f"config key 'vae.prior_decay' must be in [0, 1), got {v.prior_decay!r}")
    if any(c % 8 for c in v.channels):
        raise ConfigError(f"config key 'vae.channels' must hold multiples of 8 (GroupNorm groups), got {v.channels}")


class ResBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.GroupNorm(8, c), nn.SiLU(), nn.Conv2d(c, c, 3, padding=1),
                                  nn.GroupNorm(8, c), nn.SiLU(), nn.Conv2d(c, c, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ConvVAE(Checkpointable):
    """Strided-conv encoder to a diagonal Gaussian posterior; upsampling decoder to `out_per_pixel` maps per
    image channel (1: Bernoulli logits; 2: mean and log-scale). With no residual blocks and one output map the
    layout (and so the checkpoint keys) is the original one."""

    def __init__(self, channels: list[int], image_channels: int, resolution: int, latent_dim: int,
                 res_blocks: int = 0, out_per_pixel: int = 1, fitted_prior: bool = False) -> None:
        super().__init__()
        if fitted_prior:
            # E[mu] and E[mu mu^T + diag sigma^2] of the posteriors: the aggregate posterior's first two moments.
            self.register_buffer("agg_mean", torch.zeros(latent_dim))
            self.register_buffer("agg_moment", torch.eye(latent_dim))
        self.latent_dim, self.end, self.levels = latent_dim, resolution // 2 ** len(channels), len(channels)
        self.image_channels = image_channels
        enc: list[nn.Module] = []
        prev = image_channels
        for c in channels:
            enc += [nn.Conv2d(prev, c, 4, stride=2, padding=1), nn.GroupNorm(8, c), nn.SiLU()]
            enc += [ResBlock(c) for _ in range(res_blocks)]
            prev = c
        self.encoder = nn.Sequential(*enc, nn.Flatten())
        self.top = prev
        flat = prev * self.end**2
        self.to_stats = nn.Linear(flat, 2 * latent_dim)
        self.from_latent = nn.Linear(latent_dim, flat)
        dec: list[nn.Module] = []
        for c in reversed(channels):
            dec += [nn.Upsample(scale_factor=2), nn.Conv2d(prev, c, 3, padding=1), nn.GroupNorm(8, c), nn.SiLU()]
            dec += [ResBlock(c) for _ in range(res_blocks)]
            prev = c
        self.decoder = nn.Sequential(*dec, nn.Conv2d(prev, image_channels * out_per_pixel, 3, padding=1))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The likelihood's parameters per pixel, stacked on the channel axis."""
        h = self.from_latent(z).view(z.shape[0], self.top, self.end, self.end)
        return self.stack(self.decoder, h, self.levels)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.to_stats(self.stack(self.encoder, x, self.levels)).chunk(2, dim=1)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        return self.decode(z), mu, logvar


def _log1mexp(d: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(d)) for d < 0, accurate at both ends (Maechler 2012)."""
    d = d.clamp(max=-1e-12)
    return torch.where(d > -math.log(2), torch.log(-torch.expm1(d)), torch.log1p(-torch.exp(d)))


LOG_CDF = {"logistic": F.logsigmoid, "gaussian": torch.special.log_ndtr}
"""log F(t) of the standardised distribution; both are symmetric, so log(1 - F(t)) = log F(-t)."""


def discretised_log_prob(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor, kind: str) -> torch.Tensor:
    """log P(x) per pixel of x in [-1, 1] on the 256 levels of an 8-bit image: the mass of the bin of width 2/255
    around x, the edge bins taking the tails. Computed in log space on the side of the bin away from the mean,
    so it stays finite for bins far in either tail."""
    log_cdf = LOG_CDF[kind]
    inv = torch.exp(-log_scale.clamp(LOG_SCALE_MIN, LOG_SCALE_MAX))
    half = 1.0 / (BINS - 1)
    lo, hi = (x - half - mean) * inv, (x + half - mean) * inv
    below = x <= mean  # bin on the lower side: F(hi) - F(lo); otherwise (1 - F(lo)) - (1 - F(hi))
    top, bottom = torch.where(below, hi, -lo), torch.where(below, lo, -hi)
    a = log_cdf(top)
    interior = a + _log1mexp(log_cdf(bottom) - a)
    first, last = x < -1 + half, x > 1 - half
    return torch.where(first, log_cdf(hi), torch.where(last, log_cdf(-lo), interior))


def kl_weight(beta: float, step: int, warmup_steps: int) -> float:
    """beta, ramped linearly from 0 at step 0 over `warmup_steps`."""
    return beta * min(1.0, step / warmup_steps) if warmup_steps else beta


def kl_penalty(kl_dims: torch.Tensor, free_bits: float) -> torch.Tensor:
    """Sum over latent dimensions of max(KL averaged over the batch, free_bits): a dimension under the floor
    gets no gradient, so the KL stops pulling it onto the prior."""
    per_dim = kl_dims.mean(dim=0)
    return per_dim.clamp(min=free_bits).sum() if free_bits else per_dim.sum()


class VAETask(Task):
    sampled = "vae"

    def __init__(self, cfg: RunConfig) -> None:
        v = cfg.vae
        self.cfg = v
        self.modules = {"vae": ConvVAE(v.channels, cfg.data.channels, cfg.data.resolution, v.latent_dim,
                                       v.res_blocks, 1 if v.likelihood == "bernoulli" else 2,
                                       fitted_prior=v.prior == "fitted")}
        self.phases = [Phase("elbo", "vae", self.loss)]
        self.posterior = StepSums()  # count, sum of mu and second moment of this step's posteriors

    def recon_nll(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood of each image in nats."""
        if self.cfg.likelihood == "bernoulli":
            nll = F.binary_cross_entropy_with_logits(out, (x + 1) / 2, reduction="none")
        else:
            mean, log_scale = out.chunk(2, dim=1)
            nll = -discretised_log_prob(x, mean, log_scale, self.cfg.likelihood)
        return nll.sum(dim=(1, 2, 3))

    def loss(self, nets: Nets, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = batch["x"].float()
        out, mu, logvar = nets["vae"](batch["x"])
        mu, logvar = mu.float(), logvar.float()
        recon = self.recon_nll(out.float(), x)
        kl_dims = 0.5 * (mu.square() + logvar.exp() - 1 - logvar)
        if self.cfg.prior == "fitted":
            self._observe(batch, mu.detach(), logvar.detach().exp())
        beta = kl_weight(self.cfg.beta, step, self.cfg.kl_warmup_steps)
        loss = recon.mean() + beta * kl_penalty(kl_dims, self.cfg.free_bits)
        kl = kl_dims.detach().sum(dim=1).mean()
        # The ELBO at full KL weight whatever the warm-up and free bits; for bernoulli it is a cross-entropy
        # against grey levels, not a code length, so only the discretised likelihoods give true bits/dim.
        bpd = (recon.detach().mean() + kl) / (x[0].numel() * math.log(2))
        return loss, {"loss": loss.detach(), "recon": recon.detach().mean(), "kl": kl, "bits_per_dim": bpd,
                      "beta": x.new_tensor(beta)}

    def _observe(self, batch: Batch, mu: torch.Tensor, var: torch.Tensor) -> None:
        moment = mu.T @ mu + torch.diag(var.sum(0))
        self.posterior.add(batch, torch.cat([mu.new_tensor([len(mu)]), mu.sum(0), moment.flatten()]))

    @torch.no_grad()
    def after_step(self, nets: Nets, reduce: Reduce, step: int) -> None:
        if self.cfg.prior != "fitted":
            return
        total = self.posterior.take(reduce)
        net, d = nets["vae"], self.cfg.prior_decay
        n, k = total[0], net.latent_dim
        net.agg_mean.lerp_(total[1 : 1 + k] / n, 1 - d)
        net.agg_moment.lerp_(total[1 + k :].view(k, k) / n, 1 - d)

    def _prior_draws(self, net: nn.Module, n: int, generator: torch.Generator) -> torch.Tensor:
        device = next(net.parameters()).device
        eps = torch.randn((n, net.latent_dim), generator=generator).to(device) * self.cfg.sample_temperature
        if self.cfg.prior != "fitted":
            return eps
        mean = net.agg_mean.double()
        cov = net.agg_moment.double() - torch.outer(mean, mean)
        chol = torch.linalg.cholesky(cov + 1e-6 * torch.eye(len(mean), dtype=cov.dtype, device=cov.device))
        return (mean + eps.double() @ chol.T).float()

    def decode_mean(self, out: torch.Tensor) -> torch.Tensor:
        """The likelihood's mean in [-1, 1] (logistic and Gaussian: their location)."""
        if self.cfg.likelihood == "bernoulli":
            return torch.sigmoid(out) * 2 - 1
        return out.chunk(2, dim=1)[0]

    @torch.no_grad()
    def sample(self, net: nn.Module, labels: torch.Tensor | None, n: int,
               generator: torch.Generator) -> torch.Tensor:
        return self.decode_mean(net.decode(self._prior_draws(net, n, generator)).float()).clamp(-1, 1)


register(Family("vae", VAEConfig, VAETask, "convolutional VAE: Bernoulli or discretised logistic/Gaussian "
                "likelihood + beta x KL (warm-up, free bits)",
                choices={"likelihood": LIKELIHOODS, "prior": ("standard", "fitted")},
                positive=("latent_dim", "sample_temperature"), check=check))
