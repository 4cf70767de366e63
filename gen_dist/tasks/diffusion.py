"""Diffusion with a diffusers UNet or DiT backbone and one of three objectives: DDPM (noise schedule, epsilon /
v / x0 prediction, optional Min-SNR-gamma weighting, diffusers' samplers DDIM, DPM-Solver++, Euler, Euler
ancestral, Heun), flow matching (rectified flow: velocity on the linear path, uniform or logit-normal time, time
shift) or EDM (preconditioning, log-normal noise levels, the rho schedule); flow and EDM sample with an Euler or
Heun ODE solver. Conditioned on a class or on text (frozen text encoders, `gen_dist.tasks.text`); label or caption
dropout for classifier-free guidance (with an optional guidance interval); in pixel space or on the latents of a
frozen autoencoder (latent diffusion)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gen_dist.family import Batch, Family, Nets, Phase, Task, register
from gen_dist.pipelines import open_pipeline
from gen_dist.schema import ConfigError, RunConfig
from gen_dist.tasks import finetune
from gen_dist.tasks.backbones import build_backbone, call
from gen_dist.tasks.latents import (
    PretrainedKL,
    check_latents,
    encode_latents,
    latent_shape,
    load_first_stage,
    measure_latent_scale,
)
from gen_dist.tasks.sizes import check_sizes
from gen_dist.tasks.text import Conditioner, TextKeys, check_text, class_prompts, text_on


@dataclass
class DiffusionConfig(TextKeys, finetune.PretrainedKeys):
    backbone: str = "unet"
    """unet (diffusers' UNet2DModel: channels, attention, layers_per_block, head_dim, norm_groups; with text its
    UNet2DConditionModel), dit (diffusers' DiTTransformer2DModel: dit_depth, dit_heads, dit_head_dim, patch_size;
    with text PixArt's cross-attention DiT) or mmdit (text only: SD3's joint-attention transformer, the same
    keys)."""
    objective: str = "ddpm"
    """ddpm (a discrete noise schedule; prediction, snr_gamma, beta_schedule), flow (rectified flow: the network
    predicts the velocity noise - x on the straight path from data to noise; time_sampling, time_shift) or edm
    (Karras et al. 2022: preconditioned denoiser, log-normal noise levels; sigma_data, p_mean, p_std, sigma_min,
    sigma_max, rho)."""
    dit_depth: int = 6
    """DiT: transformer blocks."""
    dit_heads: int = 4
    """DiT: attention heads (width = dit_heads x dit_head_dim)."""
    dit_head_dim: int = 32
    """DiT: channels per attention head."""
    patch_size: int = 2
    """DiT: side of the square patches that become tokens; must divide the (latent) resolution."""
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
    """Class-conditional with this many classes; 0 = unconditional. With text, the classes only name the
    captions of data.caption_templates and the prompts evaluation scores (prompt accuracy)."""
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
    guidance_interval: list[float] = field(default_factory=list)
    """flow and edm: [low, high] of the noise level (flow's t in [0, 1], edm's sigma) where guidance applies;
    outside it the conditional model alone is used (Kynkaanniemi et al. 2024). Empty = everywhere."""
    sampler: str = "auto"
    """ddpm: a diffusers scheduler: ddim, dpm++ (DPM-Solver++ 2M), dpm++_sde (its stochastic form), euler,
    euler_a (ancestral) or heun (2nd order: two network passes per step). flow and edm: the ODE solver euler or
    heun (2nd order; its last step is Euler). auto = dpm++ for ddpm, heun otherwise."""
    sample_steps: int = 20
    """Sampler steps. ddpm: timesteps spaced to end at the last training timestep ('trailing'); flow: the time
    grid of diffusers' FlowMatchEulerDiscreteScheduler (shifted by time_shift); edm: the rho schedule."""
    time_sampling: str = "logit_normal"
    """flow: how training times t are drawn: uniform, or logit_normal (sigmoid of a normal with logit_mean,
    logit_std: more weight on the middle of the path; Esser et al. 2024)."""
    logit_mean: float = 0.0
    """flow: mean of the logit-normal time density."""
    logit_std: float = 1.0
    """flow: std of the logit-normal time density."""
    time_shift: float = 1.0
    """flow: t -> s t / (1 + (s - 1) t) for training and sampling times; s > 1 spends more time at high noise
    (larger images or latents want it); 1 = no shift."""
    sigma_data: float = 0.5
    """edm: std of the data (images in [-1, 1] have about 0.5), which sets the preconditioning."""
    p_mean: float = -1.2
    """edm: mean of ln(sigma) of training noise levels."""
    p_std: float = 1.2
    """edm: std of ln(sigma) of training noise levels."""
    sigma_min: float = 0.002
    """edm: smallest noise level of the sampler."""
    sigma_max: float = 80.0
    """edm: largest noise level of the sampler (where sampling starts)."""
    rho: float = 7.0
    """edm: the sampler's schedule exponent: larger spends more steps at low noise."""
    ddim_eta: float = 1.0
    """DDIM noise: 1 = ancestral (DDPM-like), 0 = deterministic DDIM."""
    first_stage: str = ""
    """Latent diffusion: a trained autoencoder or vqvae (run directory, checkpoint or export; or the export of
    a latent diffusion model, whose first stage is taken), or a diffusers AutoencoderKL directory (e.g. Stable
    Diffusion's VAE; its scaling_factor is the latent scale), kept frozen: the UNet learns its latents (encoded on
    the fly in fp32) and samples are decoded by it. Empty = pixel space."""
    latent_scale: float = 0.0
    """Latent diffusion: the factor latents are multiplied by, so that they have about unit variance as the
    noise schedule assumes; 0 = 1 / std of the latents of the first 512 training images, measured when
    training starts and kept in the checkpoint and exports."""


SAMPLERS = {
    "ddim": ("DDIMScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpm++_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
}
OBJECTIVES = ("ddpm", "flow", "edm")
ODE_SAMPLERS = ("euler", "heun")
"""The samplers of flow and edm: solvers of the probability-flow ODE over the noise level."""
TIME_SCALE = 1000.0
"""flow's t in [0, 1] and edm's c_noise are multiplied by this before the network's sinusoidal timestep
embedding, which diffusers builds for DDPM's timesteps 0..999."""


def sampler_name(d: DiffusionConfig) -> str:
    """diffusion.sampler with auto resolved."""
    if d.sampler != "auto":
        return d.sampler
    return "dpm++" if d.objective == "ddpm" else "heun"


def check(cfg: RunConfig) -> None:
    d = cfg.diffusion
    if len(d.channels) != len(d.attention):
        raise ConfigError("config keys 'diffusion.channels' and 'diffusion.attention' must have the same length")
    if cfg.task != "diffusion":
        return
    if d.backbone == "unet":
        _check_unet(d)
    if d.backbone == "dit" and (d.dit_heads * d.dit_head_dim) % 4:
        raise ConfigError(f"diffusion.dit_heads x diffusion.dit_head_dim = {d.dit_heads * d.dit_head_dim} must be a "
                          f"multiple of 4 (the DiT's 2-D sine-cosine position embedding splits the width in four)")
    check_sizes(cfg)
    _check_objective(d)
    check_text(cfg)
    finetune.check(cfg)
    if d.backbone == "mmdit" and not text_on(cfg):
        raise ConfigError("diffusion.backbone=mmdit is a text-to-image transformer: set diffusion.text_encoder")
    if cfg.data.latents and not d.first_stage:
        raise ConfigError("data.latents needs diffusion.first_stage (the autoencoder that encoded them)")
    if cfg.data.latents and cfg.data.hflip:
        raise ConfigError("data.hflip cannot flip pre-encoded latents (the latent of a flipped image is not the "
                          "flipped latent); set data.hflip=false or encode on the fly (data.latents=)")
    if not 0 <= d.label_dropout < 1:
        raise ConfigError(f"config key 'diffusion.label_dropout' must be in [0, 1), got {d.label_dropout}")
    if d.snr_gamma < 0 or d.guidance < 0 or d.latent_scale < 0:
        raise ConfigError("config keys 'diffusion.snr_gamma', 'diffusion.guidance' and 'diffusion.latent_scale' "
                          "must be >= 0")
    if d.objective == "ddpm" and d.sampler == "euler_a" and d.prediction == "sample":
        raise ConfigError("diffusion.sampler=euler_a does not take diffusion.prediction=sample (diffusers' "
                          "ancestral Euler has no x0 form); use euler, heun, dpm++ or ddim")
    if d.guidance != 1 and not (d.caption_dropout > 0 if text_on(cfg) else d.num_classes and d.label_dropout > 0):
        raise ConfigError(f"diffusion.guidance={d.guidance} needs a model trained with classifier-free guidance "
                          f"(diffusion.caption_dropout > 0 with text, else diffusion.num_classes > 0 and "
                          f"diffusion.label_dropout > 0); use diffusion.guidance=1")


def _check_unet(d: DiffusionConfig) -> None:
    """What diffusers' UNet2DModel refuses once built."""
    if not d.channels:
        raise ConfigError("config key 'diffusion.channels' must not be empty")
    if any(c % d.norm_groups for c in d.channels):
        raise ConfigError(f"config key 'diffusion.channels' must be multiples of diffusion.norm_groups "
                          f"({d.norm_groups}), got {d.channels}")
    attended = [c for c, a in zip(d.channels, d.attention, strict=True) if a] + [d.channels[-1]]  # and the middle
    if d.head_dim > min(attended):
        raise ConfigError(f"diffusion.head_dim={d.head_dim} is wider than the {min(attended)} channels of an "
                          f"attention level (or the middle block, {d.channels[-1]}); lower diffusion.head_dim")


def _check_objective(d: DiffusionConfig) -> None:
    """The keys that belong to one objective are not set with another."""
    if d.ddim_eta < 0:
        raise ConfigError(f"config key 'diffusion.ddim_eta' must be >= 0, got {d.ddim_eta}")
    if d.objective == "ddpm":
        if d.sample_steps > d.train_timesteps:
            raise ConfigError(f"diffusion.sample_steps={d.sample_steps} must be <= diffusion.train_timesteps="
                              f"{d.train_timesteps} (a DDPM sampler visits the training timesteps)")
        if d.guidance_interval:
            raise ConfigError("diffusion.guidance_interval applies to objective=flow or edm (a noise-level "
                              "interval of their ODE samplers)")
        return
    if d.sampler not in ("auto", *ODE_SAMPLERS):
        raise ConfigError(f"diffusion.sampler={d.sampler} is a DDPM sampler; objective={d.objective} samples with "
                          f"the ODE solvers {' or '.join(ODE_SAMPLERS)}")
    if d.prediction != "epsilon" or d.snr_gamma:
        raise ConfigError(f"diffusion.prediction and diffusion.snr_gamma belong to objective=ddpm; objective="
                          f"{d.objective} has its own target ({'velocity' if d.objective == 'flow' else 'EDM'})")
    if d.guidance_interval and (len(d.guidance_interval) != 2 or not 0 <= d.guidance_interval[0]
                                < d.guidance_interval[1]):
        raise ConfigError(f"diffusion.guidance_interval must be [low, high] with 0 <= low < high, got "
                          f"{d.guidance_interval}")
    if d.objective == "edm" and (d.rho < 1 or d.p_std <= 0):
        raise ConfigError(f"diffusion.rho must be >= 1 and diffusion.p_std > 0, got {d.rho}, {d.p_std}")
    if d.objective == "edm" and not 0 < d.sigma_min < d.sigma_max:
        raise ConfigError(f"diffusion.sigma_min and sigma_max must satisfy 0 < sigma_min < sigma_max, got "
                          f"{d.sigma_min}, {d.sigma_max}")


def flow_shift(t: torch.Tensor, shift: float) -> torch.Tensor:
    return t if shift == 1 else shift * t / (1 + (shift - 1) * t)


def edm_scalings(sigma: torch.Tensor, sigma_data: float) -> tuple[torch.Tensor, ...]:
    """EDM preconditioning (Karras et al. 2022, Table 1): D(x, sigma) = c_skip x + c_out F(c_in x, c_noise)."""
    total = sigma.square() + sigma_data**2
    return sigma_data**2 / total, sigma * sigma_data / total.sqrt(), total.rsqrt(), sigma.log() / 4


class DiffusionTask(Task):
    sampled = "denoiser"
    for_sampling = ("data.text_embeddings=",)  # a trained text model encodes its prompts itself

    def __init__(self, cfg: RunConfig) -> None:
        from diffusers import DDPMScheduler

        self.run_cfg, self.cfg = cfg, cfg.diffusion
        d = self.cfg
        self.num_classes = d.num_classes
        shape = (cfg.data.channels, cfg.data.resolution)
        self.latent_scale: float | None = None  # latent diffusion: set from the config, measured, or loaded
        if d.first_stage:
            shape = latent_shape(cfg)
            first = load_first_stage(Path(d.first_stage))
            self.frozen = {"first_stage": first}
            # An export carries a first stage gen_dist trained; a pretrained one is loaded from its directory.
            self.frozen_from = {} if isinstance(first, PretrainedKL) else {"first_stage": "diffusion.first_stage"}
            if cfg.data.latents:
                check_latents(cfg, self.frozen["first_stage"])
            self.latent_scale = d.latent_scale or getattr(first, "scaling_factor", None)
        self.shape = shape  # (channels, side) of what the denoiser sees
        self.text: Conditioner | None = None
        if text_on(cfg):
            self.text, self.prompted = Conditioner(cfg, on_the_fly=not cfg.data.text_embeddings), True
            if self.text.encoders is not None:
                self.frozen = {**self.frozen, "text_encoder": self.text.encoders}
            self.class_prompts = class_prompts(cfg)
        text = (self.text.tokens, self.text.width, self.text.pooled) if self.text else None
        self.pipe = open_pipeline(d.pretrained) if d.pretrained else None
        self.modules = {"denoiser": finetune.pretrained_denoiser(cfg) if self.pipe else build_backbone(cfg, *shape,
                                                                                                       text)}
        self.scheduler = (DDPMScheduler.from_config(self.pipe.config("scheduler")) if self.pipe else
                          DDPMScheduler(num_train_timesteps=d.train_timesteps, beta_schedule=d.beta_schedule,
                                        prediction_type=d.prediction))
        self.phases = [Phase("denoise", "denoiser", self.loss)]

    def _train_condition(self, nets: Nets, batch: Batch) -> Any:
        """The training batch's condition: its text (with caption dropout), its labels (with label dropout) or
        None."""
        if self.text is not None:
            device = next(nets["denoiser"].parameters()).device
            cond = self.text.dropped(self.text.of_batch(batch, device))
            return {**cond, "geometry": batch["geometry"]} if "geometry" in batch else cond
        if not self.num_classes:
            return None
        labels = batch["label"]
        if self.cfg.label_dropout > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.cfg.label_dropout
            labels = torch.where(drop, self.num_classes, labels)
        return labels

    def prompts_at(self, labels: torch.Tensor | None) -> list[str] | None:
        """Text models: the prompt of each sample position's label (an index into `prompts`, else a class);
        None (the null condition) without either."""
        if self.text is None or labels is None:
            return None
        prompts = self.prompts or self.class_prompts
        return [prompts[int(i) % len(prompts)] for i in labels] if prompts else None

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

    def state_dict(self) -> dict[str, Any]:
        text = {"text_encoders": self.text.record()} if self.text is not None else {}
        return {**text, **({"latent_scale": self.latent_scale} if "first_stage" in self.frozen else {})}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "first_stage" in self.frozen and state.get("latent_scale"):
            self.latent_scale = state["latent_scale"]
        if self.text is not None and state.get("text_encoders"):
            self.text.trained_with(state["text_encoders"])

    def latents(self, nets: Nets, batch: Batch) -> torch.Tensor:
        """The scaled latents of a training batch."""
        first = nets["first_stage"]
        if self.latent_scale is None and "micro" in batch:
            self.latent_scale = measure_latent_scale(self.run_cfg, first)
        if "latent" in batch:
            return batch["latent"] * self.latent_scale
        if self.latent_scale is None:
            return encode_latents(first, batch["x"])  # the FLOP count's batch: no measurement for it
        return encode_latents(first, batch["x"]) * self.latent_scale

    def _net(self, net: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        """The backbone's output at (x, t) under `cond` (class labels, a text condition or None): t is one value
        per image or one for all."""
        return self.pipe.call(net, x, t, cond) if self.pipe else call(net, x, t, cond)

    def loss(self, nets: Nets, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = self.latents(nets, batch) if "first_stage" in self.frozen else batch["x"]
        error = getattr(self, f"_{self.cfg.objective}_error")
        err, weight = error(nets["denoiser"], x, self._train_condition(nets, batch))
        share = batch.get("weight", 1.0)  # a bucket's fill-in repeats weigh nothing
        loss = (err * weight * share).mean()
        return loss, {"loss": loss.detach(), "mse": (err.detach() * share).mean()}

    # Each objective's (per-image squared error of the network's output, its loss weight).

    def _ddpm_error(self, net: nn.Module, x: torch.Tensor, cond: Any) -> tuple[torch.Tensor, Any]:
        noise = torch.randn_like(x)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (x.shape[0],), device=x.device)
        pred = self._net(net, self.scheduler.add_noise(x, noise, t), t, cond)
        err = (pred.float() - self._target(x, noise, t).float()).square().mean(dim=(1, 2, 3))
        return err, self._snr_weight(t) if self.cfg.snr_gamma > 0 else 1.0

    def _flow_error(self, net: nn.Module, x: torch.Tensor, cond: Any) -> tuple[torch.Tensor, Any]:
        """Rectified flow: x_t = (1 - t) x + t noise, whose velocity is noise - x."""
        from diffusers.training_utils import compute_density_for_timestep_sampling

        d = self.cfg
        noise = torch.randn_like(x)
        u = compute_density_for_timestep_sampling(d.time_sampling, x.shape[0], d.logit_mean, d.logit_std,
                                                  device=x.device)
        t = flow_shift(u, d.time_shift)
        tb = t.view(-1, 1, 1, 1)
        pred = self._net(net, (1 - tb) * x + tb * noise, t * TIME_SCALE, cond)
        return (pred.float() - (noise - x).float()).square().mean(dim=(1, 2, 3)), 1.0

    def _edm_error(self, net: nn.Module, x: torch.Tensor, cond: Any) -> tuple[torch.Tensor, Any]:
        """EDM's loss lambda(sigma) |D(x + n) - x|^2 as the plain error of F against its effective target
        (x - c_skip (x + n)) / c_out, equal because lambda = 1 / c_out^2 (Karras et al. 2022, eq. 8)."""
        d = self.cfg
        sigma = (torch.randn(x.shape[0], device=x.device) * d.p_std + d.p_mean).exp()
        c_skip, c_out, c_in, c_noise = (c.view(-1, 1, 1, 1) for c in edm_scalings(sigma, d.sigma_data))
        noisy = x + torch.randn_like(x) * sigma.view(-1, 1, 1, 1)
        pred = self._net(net, c_in * noisy, c_noise.flatten() * TIME_SCALE, cond)
        return (pred.float() - ((x - c_skip * noisy) / c_out).float()).square().mean(dim=(1, 2, 3)), 1.0

    def make_sampler(self) -> Any:
        """A fresh diffusers scheduler for objective=ddpm's diffusion.sampler, configured from the training
        schedule."""
        import diffusers

        name, extra = SAMPLERS[sampler_name(self.cfg)]
        sched = getattr(diffusers, name).from_config(self.scheduler.config, timestep_spacing="trailing", **extra)
        sched.set_timesteps(self.cfg.sample_steps)
        return sched

    def _predict(self, net: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Any,
                 w: float | None = None) -> torch.Tensor:
        """The network's output at (x, t), guided: uncond + w (cond - uncond) in one doubled batch."""
        w = self.cfg.guidance if w is None else w
        if cond is None or w == 1:
            return self._net(net, x, t, cond).float()
        if isinstance(cond, dict):  # text
            null = self.text.null(x.shape[0], x.device)
            both: Any = {k: torch.cat([v, null[k].to(v.dtype)]) for k, v in cond.items()}
        else:  # class labels
            both = torch.cat([cond, torch.full_like(cond, self.num_classes)])
        cond, uncond = self._net(net, torch.cat([x, x]), t, both).float().chunk(2)
        return uncond + w * (cond - uncond)

    def _guidance_at(self, level: float) -> float:
        lo_hi = self.cfg.guidance_interval
        return self.cfg.guidance if not lo_hi or lo_hi[0] <= level <= lo_hi[1] else 1.0

    def noise_levels(self) -> torch.Tensor:
        """flow and edm: the sampler's grid of noise levels, from the start down to 0 (diffusers' schedulers
        give it: the shifted flow-matching grid, and EDM's rho schedule)."""
        from diffusers import EDMEulerScheduler, FlowMatchEulerDiscreteScheduler

        d = self.cfg
        if d.objective == "flow":
            sched = FlowMatchEulerDiscreteScheduler(shift=d.time_shift)
        else:
            sched = EDMEulerScheduler(sigma_min=d.sigma_min, sigma_max=d.sigma_max, sigma_data=d.sigma_data, rho=d.rho)
        sched.set_timesteps(d.sample_steps)
        return sched.sigmas.double()

    def _derivative(self, net: nn.Module, x: torch.Tensor, level: float, cond: Any) -> torch.Tensor:
        """dx / d(noise level) of the probability-flow ODE at x: flow's velocity, or EDM's (x - D(x)) / sigma."""
        w = self._guidance_at(level)
        if self.cfg.objective == "flow":
            return self._predict(net, x, torch.tensor(level * TIME_SCALE, device=x.device), cond, w)
        c_skip, c_out, c_in, c_noise = edm_scalings(torch.tensor(level, dtype=torch.float64), self.cfg.sigma_data)
        f = self._predict(net, x * float(c_in), torch.tensor(float(c_noise) * TIME_SCALE, device=x.device), cond, w)
        return (x - (float(c_skip) * x + float(c_out) * f)) / level

    def _solve(self, net: nn.Module, x: torch.Tensor, cond: Any) -> torch.Tensor:
        """Euler or Heun (the trapezoid correction, Karras et al. 2022 Algorithm 1 without churn) over the grid;
        the step to 0 is always Euler."""
        grid = self.noise_levels().tolist()
        x = x * grid[0]
        for s, s_next in zip(grid[:-1], grid[1:], strict=True):
            d = self._derivative(net, x, s, cond)
            x_next = x + (s_next - s) * d
            if sampler_name(self.cfg) == "heun" and s_next > 0:
                x_next = x + (s_next - s) * (d + self._derivative(net, x_next, s_next, cond)) / 2
            x = x_next
        return x

    def _ddpm_sample(self, net: nn.Module, x: torch.Tensor, cond: Any,
                     generator: torch.Generator) -> torch.Tensor:
        sched = self.make_sampler()
        name = sampler_name(self.cfg)
        step_kwargs: dict[str, Any] = {"eta": self.cfg.ddim_eta} if name == "ddim" else {}
        if name in ("ddim", "euler_a", "dpm++", "dpm++_sde"):
            step_kwargs["generator"] = generator
        x = x * sched.init_noise_sigma
        for t in sched.timesteps:  # on the CPU, where the scheduler looks its index up
            out = self._predict(net, sched.scale_model_input(x, t), t.to(x.device), cond)
            x = sched.step(out, t, x, **step_kwargs).prev_sample
        return x

    @torch.no_grad()
    def sample(self, net: torch.nn.Module, labels: torch.Tensor | None, n: int,
               generator: torch.Generator) -> torch.Tensor:
        device = next(net.parameters()).device
        cond: Any = labels
        if self.text is not None:
            prompts = self.prompts_at(labels)
            cond = self.text.null(n, device) if prompts is None else self.text.encode(prompts, device)
        channels, size = self.shape
        x = torch.randn((n, channels, size, size), generator=generator).to(device)
        x = self._ddpm_sample(net, x, cond, generator) if self.cfg.objective == "ddpm" else self._solve(net, x, cond)
        if "first_stage" in self.frozen:
            if self.latent_scale is None:
                raise ConfigError("this latent diffusion model has no latent scale: it was saved before training "
                                  "measured one; set diffusion.latent_scale")
            x = self.frozen["first_stage"].decode(x / self.latent_scale).float()
        return x.clamp(-1, 1)


register(Family("diffusion", DiffusionConfig, DiffusionTask,
                "diffusion: UNet or DiT; DDPM (epsilon/v/x0, Min-SNR), flow matching or EDM; guidance; samplers",
                choices={"backbone": ("unet", "dit", "mmdit"), "objective": OBJECTIVES,
                         "null_caption": ("empty", "zero"),
                         "beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
                         "prediction": ("epsilon", "v_prediction", "sample"), "sampler": ("auto", *SAMPLERS),
                         "time_sampling": ("uniform", "logit_normal")},
                positive=("sample_steps", "head_dim", "layers_per_block", "norm_groups", "train_timesteps",
                          "dit_depth", "dit_heads", "dit_head_dim", "patch_size", "sigma_data", "rho", "logit_std",
                          "time_shift"),
                sampling_keys=("guidance", "guidance_interval", "sampler", "sample_steps", "ddim_eta"),
                check=check, resolve=finetune.resolve))
