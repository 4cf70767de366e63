"""Denoising diffusion of a diffusers UNet: DDPM noise schedule, epsilon / v / x0 prediction with optional
Min-SNR-gamma weighting, label dropout for classifier-free guidance, and diffusers' samplers (DDIM, DPM-Solver++,
Euler, Euler ancestral, Heun); in pixel space or on the latents of a frozen autoencoder (latent diffusion)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from gen_dist.config import ConfigError, RunConfig
from gen_dist.tasks import family, register
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
    first_stage: str = ""
    """Latent diffusion: a trained autoencoder or vqvae (run directory, checkpoint or export; or the export of
    a latent diffusion model, whose first stage is taken), kept frozen: the UNet learns its latents (encoded on
    the fly in fp32) and samples are decoded by it. Empty = pixel space."""
    latent_scale: float = 0.0
    """Latent diffusion: the factor latents are multiplied by, so that they have about unit variance as the
    noise schedule assumes; 0 = 1 / std of the latents of the first 512 training images, measured when
    training starts and kept in the checkpoint and exports."""


SCALE_IMAGES = 512
"""Training images whose latents give the latent scale."""


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
    size = latent_shape(cfg)[1] if d.first_stage else cfg.data.resolution
    if size % 2 ** (len(d.channels) - 1):
        where = "the first stage's latent resolution" if d.first_stage else "data.resolution"
        raise ConfigError(f"{where} {size} must be divisible by {2 ** (len(d.channels) - 1)} for "
                          f"{len(d.channels)} UNet levels")
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
    if d.sampler == "euler_a" and d.prediction == "sample":
        raise ConfigError("diffusion.sampler=euler_a does not take diffusion.prediction=sample (diffusers' "
                          "ancestral Euler has no x0 form); use euler, heun, dpm++ or ddim")
    if d.guidance != 1 and not (d.num_classes and d.label_dropout > 0):
        raise ConfigError(f"diffusion.guidance={d.guidance} needs a model trained with classifier-free guidance "
                          f"(diffusion.num_classes > 0 and diffusion.label_dropout > 0); use diffusion.guidance=1")


def first_stage_config(path: Path) -> RunConfig:
    """The config of the autoencoder diffusion.first_stage names (reads metadata only)."""
    from gen_dist import sampling

    if not path.exists():
        raise ConfigError(f"diffusion.first_stage: {path} does not exist")
    found = json.loads(sampling.export_metadata(path).get("frozen_configs", "{}")) if path.is_file() else {}
    text = found.get("first_stage") or sampling.source_config_text(path)
    cfg = sampling.config_for_sampling(text, f"first stage {path}", [])
    if not family(cfg.task).task.reconstructs:
        raise ConfigError(f"diffusion.first_stage: {path} is a {cfg.task} model, not an autoencoder (train one "
                          f"with task: autoencoder or task: vqvae)")
    return cfg


def latent_shape(cfg: RunConfig) -> tuple[int, int]:
    """(channels, resolution) of the first stage's latents of this run's images."""
    first = first_stage_config(Path(cfg.diffusion.first_stage))
    if (first.data.channels, first.data.resolution) != (cfg.data.channels, cfg.data.resolution):
        raise ConfigError(f"diffusion.first_stage was trained on {first.data.channels}-channel "
                          f"{first.data.resolution}px images; this run has {cfg.data.channels}-channel "
                          f"{cfg.data.resolution}px (data.channels, data.resolution)")
    a = getattr(first, first.task)
    return a.latent_channels, first.data.resolution // 2 ** (len(a.channels) - 1)


def load_first_stage(path: Path) -> nn.Module:
    """The trained autoencoder (EMA weights where kept), frozen: `encode` and `decode` are what it serves."""
    from gen_dist import sampling

    cfg, weights = sampling.load_frozen(path, "first_stage") or sampling.load_weights(path, use_ema=True)
    task = family(cfg.task).task(cfg)
    net = task.modules[task.sampled]
    net.load_state_dict(weights)
    return net.eval().requires_grad_(False)


@torch.no_grad()
def encode_latents(first: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Unscaled latents of images `x` in [-1, 1], in fp32 whatever the autocast around."""
    with torch.autocast(x.device.type, enabled=False):
        return first.encode(x.float()).float()


def weights_ident(net: nn.Module) -> str:
    """A hash of a module's weights: which first stage encoded a latent dataset."""
    h = hashlib.sha1()
    for k, v in sorted(net.state_dict().items()):
        h.update(k.encode() + v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def encode_split(first_stage: Path, data: Path, split: str, out: Path) -> dict:
    """`gen-dist data latents`: the images of `split` of `data` encoded by `first_stage` into latent shards of
    the same layout, for data.latents."""
    from gen_dist.data import write_latent_shards
    from gen_dist.images import to_model_range

    cfg = first_stage_config(first_stage)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    first = load_first_stage(first_stage).to(device)

    def encode(images: Any) -> Any:
        return encode_latents(first, to_model_range(torch.from_numpy(images).to(device))).cpu().numpy()

    about = {"first_stage": str(first_stage), "ident": weights_ident(first), "resolution": cfg.data.resolution}
    return write_latent_shards(data, split, out, encode, about)


def check_latents(cfg: RunConfig, first: nn.Module) -> None:
    """data.latents was encoded by this run's first stage."""
    from gen_dist.data import load_index

    about = load_index(Path(cfg.data.latents)).get("latents")
    if about is None:
        raise ConfigError(f"data.latents: {cfg.data.latents} holds images, not latents: write them with "
                          f"`gen-dist data latents FIRST_STAGE --data {cfg.data.path} --out DIR`")
    if about["ident"] != weights_ident(first):
        raise ConfigError(f"data.latents: {cfg.data.latents} was encoded by {about['first_stage']}, whose weights "
                          f"differ from diffusion.first_stage {cfg.diffusion.first_stage}: encode them again")


def build_unet(cfg: RunConfig, channels: int, size: int) -> UNet2DModel:
    from diffusers import UNet2DModel

    d = cfg.diffusion
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in d.attention)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(d.attention))
    return UNet2DModel(
        sample_size=size, in_channels=channels, out_channels=channels,
        block_out_channels=tuple(d.channels), down_block_types=down, up_block_types=up,
        layers_per_block=d.layers_per_block, norm_num_groups=d.norm_groups,
        # The extra embedding is the null class of classifier-free guidance.
        num_class_embeds=(d.num_classes + (d.label_dropout > 0)) or None, attention_head_dim=d.head_dim,
    )


class DiffusionTask(Task):
    sampled = "denoiser"

    def __init__(self, cfg: RunConfig) -> None:
        from diffusers import DDPMScheduler

        self.run_cfg, self.cfg = cfg, cfg.diffusion
        d = self.cfg
        self.num_classes = d.num_classes
        shape = (cfg.data.channels, cfg.data.resolution)
        self.latent_scale: float | None = None  # latent diffusion: set from the config, measured, or loaded
        if d.first_stage:
            shape = latent_shape(cfg)
            self.frozen = {"first_stage": load_first_stage(Path(d.first_stage))}
            self.frozen_from = {"first_stage": "diffusion.first_stage"}
            if cfg.data.latents:
                check_latents(cfg, self.frozen["first_stage"])
            self.latent_scale = d.latent_scale or None
        self.modules = {"denoiser": build_unet(cfg, *shape)}
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

    def state_dict(self) -> dict[str, Any]:
        return {"latent_scale": self.latent_scale} if self.frozen else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.frozen and state.get("latent_scale"):
            self.latent_scale = state["latent_scale"]

    def measure_scale(self, first: nn.Module) -> float:
        """1 / std of the latents of the first SCALE_IMAGES training images, in index order: the same on
        every rank without a collective."""
        from gen_dist.data import load_index
        from gen_dist.evaluation import split_images
        from gen_dist.images import to_model_range

        d = self.run_cfg.data
        split = load_index(Path(d.path))["splits"][d.split]
        device = next(first.parameters()).device
        images = split_images(self.run_cfg, split, 0, min(SCALE_IMAGES, split["count"]))
        z = torch.cat([encode_latents(first, to_model_range(c.to(device))) for c in images.split(128)])
        return 1.0 / z.double().std().item()

    def latents(self, nets: Nets, batch: Batch) -> torch.Tensor:
        """The scaled latents of a training batch."""
        first = nets["first_stage"]
        if self.latent_scale is None and "micro" in batch:
            self.latent_scale = self.measure_scale(first)
        if "latent" in batch:
            return batch["latent"] * self.latent_scale
        if self.latent_scale is None:
            return encode_latents(first, batch["x"])  # the FLOP count's batch: no measurement for it
        return encode_latents(first, batch["x"]) * self.latent_scale

    def loss(self, nets: Nets, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = self.latents(nets, batch) if self.frozen else batch["x"]
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
        if self.frozen:
            if self.latent_scale is None:
                raise ConfigError("this latent diffusion model has no latent scale: it was saved before training "
                                  "measured one; set diffusion.latent_scale")
            x = self.frozen["first_stage"].decode(x / self.latent_scale).float()
        return x.clamp(-1, 1)


register(Family("diffusion", DiffusionConfig, DiffusionTask,
                "denoising diffusion of a diffusers UNet: epsilon/v/x0, Min-SNR, guidance, DDIM/DPM++/Euler/Heun",
                choices={"beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
                         "prediction": ("epsilon", "v_prediction", "sample"), "sampler": tuple(SAMPLERS)},
                positive=("sample_steps", "head_dim", "layers_per_block", "norm_groups", "train_timesteps"),
                check=check))
