"""Denoising diffusion of a diffusers UNet: DDPM noise schedule, epsilon / v / x0 prediction with optional
Min-SNR-gamma weighting, label dropout for classifier-free guidance, and diffusers' samplers (DDIM, DPM-Solver++,
Euler, Euler ancestral, Heun)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

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
    prediction: str = "epsilon"
    """What the UNet predicts (diffusers' prediction_type): epsilon (the noise), v_prediction (v = alpha eps -
    sigma x0, well scaled at every noise level) or sample (x0)."""
    snr_gamma: float = 0.0
    """Min-SNR-gamma loss weighting (Hang et al. 2023; 5 is their choice): each timestep's loss is weighted as
    if its SNR were at most gamma, so the many easy low-noise steps stop dominating. 0 = unweighted."""
    label_dropout: float = 0.1
    """Conditional models: the probability that a training label is replaced by the null class, which teaches
    the unconditional model that classifier-free guidance needs (and adds that class's embedding)."""
    guidance: float = 1.0
    """Classifier-free guidance scale w of samples (grids, `gen-dist sample` and eval): the prediction is
    uncond + w (cond - uncond), costing a second network pass per step; 1 = the conditional model alone."""
    sampler: str = "dpm++"
    """Sampler (a diffusers scheduler): ddim, dpm++ (DPM-Solver++ 2M), dpm++_sde (its stochastic form), euler,
    euler_a (ancestral) or heun (2nd order: two network passes per step)."""
    sample_steps: int = 20
    """Sampler steps; the timesteps are spaced to end at the last training timestep ('trailing')."""
    ddim_eta: float = 1.0
    """DDIM noise: 1 = ancestral (DDPM-like), 0 = deterministic DDIM."""


SAMPLERS = {
    "ddim": ("DDIMScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpm++_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
}


def check(cfg: RunConfig) -> None:
    d = cfg.diffusion
    if len(d.channels) != len(d.attention):
        raise ConfigError("config keys 'diffusion.channels' and 'diffusion.attention' must have the same length")
    if cfg.task != "diffusion":
        return
    check_divisible(cfg, 2 ** (len(d.channels) - 1), f"for {len(d.channels)} UNet levels")
    if not 0 <= d.label_dropout < 1:
        raise ConfigError(f"config key 'diffusion.label_dropout' must be in [0, 1), got {d.label_dropout}")
    if d.snr_gamma < 0 or d.guidance < 0:
        raise ConfigError("config keys 'diffusion.snr_gamma' and 'diffusion.guidance' must be >= 0")
    if d.sampler == "euler_a" and d.prediction == "sample":
        raise ConfigError("diffusion.sampler=euler_a does not take diffusion.prediction=sample (diffusers' "
                          "ancestral Euler has no x0 form); use euler, heun, dpm++ or ddim")
    if d.guidance != 1 and not (d.num_classes and d.label_dropout > 0):
        raise ConfigError(f"diffusion.guidance={d.guidance} needs a model trained with classifier-free guidance "
                          f"(diffusion.num_classes > 0 and diffusion.label_dropout > 0); use diffusion.guidance=1")


def build_unet(cfg: RunConfig) -> UNet2DModel:
    from diffusers import UNet2DModel

    d = cfg.diffusion
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in d.attention)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(d.attention))
    return UNet2DModel(
        sample_size=cfg.data.resolution, in_channels=cfg.data.channels, out_channels=cfg.data.channels,
        block_out_channels=tuple(d.channels), down_block_types=down, up_block_types=up,
        layers_per_block=d.layers_per_block, norm_num_groups=d.norm_groups,
        # The extra embedding is the null class of classifier-free guidance.
        num_class_embeds=(d.num_classes + (d.label_dropout > 0)) or None, attention_head_dim=d.head_dim,
    )


class DiffusionTask(Task):
    sampled = "denoiser"

    def __init__(self, cfg: RunConfig) -> None:
        from diffusers import DDPMScheduler

        self.cfg = d = cfg.diffusion
        self.num_classes = d.num_classes
        self.modules = {"denoiser": build_unet(cfg)}
        self.scheduler = DDPMScheduler(num_train_timesteps=d.train_timesteps, beta_schedule=d.beta_schedule,
                                       prediction_type=d.prediction)
        self.phases = [Phase("denoise", "denoiser", self.loss)]

    def _train_labels(self, batch: Batch) -> torch.Tensor | None:
        if not self.num_classes:
            return None
        labels = batch["label"]
        if self.cfg.label_dropout > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.cfg.label_dropout
            labels = torch.where(drop, self.num_classes, labels)
        return labels

    def _target(self, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.cfg.prediction == "v_prediction":
            return self.scheduler.get_velocity(x, noise, t)
        return noise if self.cfg.prediction == "epsilon" else x

    def _snr_weight(self, t: torch.Tensor) -> torch.Tensor:
        """Min-SNR-gamma weight of each sample's loss, for the quantity the UNet predicts."""
        from diffusers.training_utils import compute_snr

        snr = compute_snr(self.scheduler, t).float()
        clipped = snr.clamp(max=self.cfg.snr_gamma)
        return {"epsilon": clipped / snr, "v_prediction": clipped / (snr + 1), "sample": clipped}[self.cfg.prediction]

    def loss(self, nets: Nets, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = batch["x"]
        noise = torch.randn_like(x)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (x.shape[0],), device=x.device)
        xt = self.scheduler.add_noise(x, noise, t)
        pred = nets["denoiser"](xt, t, class_labels=self._train_labels(batch)).sample
        err = (pred.float() - self._target(x, noise, t).float()).square().mean(dim=(1, 2, 3))
        stats = {"mse": err.detach().mean()}
        if self.cfg.snr_gamma > 0:
            err = err * self._snr_weight(t)
        loss = err.mean()
        return loss, {"loss": loss.detach(), **stats}

    def make_sampler(self) -> Any:
        """A fresh diffusers scheduler for diffusion.sampler, configured from the training schedule."""
        import diffusers

        name, extra = SAMPLERS[self.cfg.sampler]
        sched = getattr(diffusers, name).from_config(self.scheduler.config, timestep_spacing="trailing", **extra)
        sched.set_timesteps(self.cfg.sample_steps)
        return sched

    def _predict(self, net: torch.nn.Module, x: torch.Tensor, t: torch.Tensor,
                 labels: torch.Tensor | None) -> torch.Tensor:
        """The network's prediction at (x, t), guided: uncond + w (cond - uncond) in one doubled batch."""
        w = self.cfg.guidance
        if labels is None or w == 1:
            return net(x, t, class_labels=labels).sample.float()
        null = torch.full_like(labels, self.num_classes)
        cond, uncond = net(torch.cat([x, x]), t, class_labels=torch.cat([labels, null])).sample.float().chunk(2)
        return uncond + w * (cond - uncond)

    @torch.no_grad()
    def sample(self, net: torch.nn.Module, labels: torch.Tensor | None, n: int,
               generator: torch.Generator) -> torch.Tensor:
        device = next(net.parameters()).device
        sched = self.make_sampler()
        step_kwargs: dict[str, Any] = {"eta": self.cfg.ddim_eta} if self.cfg.sampler == "ddim" else {}
        if self.cfg.sampler in ("ddim", "euler_a", "dpm++", "dpm++_sde"):
            step_kwargs["generator"] = generator
        size = net.config.sample_size
        x = torch.randn((n, net.config.in_channels, size, size), generator=generator).to(device)
        x = x * sched.init_noise_sigma
        for t in sched.timesteps:  # on the CPU, where the scheduler looks its index up
            out = self._predict(net, sched.scale_model_input(x, t), t.to(device), labels)
            x = sched.step(out, t, x, **step_kwargs).prev_sample
        return x.clamp(-1, 1)


register(Family("diffusion", DiffusionConfig, DiffusionTask,
                "denoising diffusion of a diffusers UNet: epsilon/v/x0, Min-SNR, guidance, DDIM/DPM++/Euler/Heun",
                choices={"beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
                         "prediction": ("epsilon", "v_prediction", "sample"), "sampler": tuple(SAMPLERS)},
                positive=("sample_steps", "head_dim"), check=check))
