"""R3GAN's recipe: the relativistic pairing loss with R1 and R2 on a 2-D mixture of 25 Gaussians, the schedules over
images seen (their values, and what a run applies), R3GAN's nets, and bad settings named before launch."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import CONFIGS, R3GAN, run_cli, smoke_args, step_records
from torch import nn

from gen_dist.config import load_config
from gen_dist.schema import ConfigError
from gen_dist.tasks.gan import GANTask
from gen_dist.tasks.gan_recipe import GANSchedule, ema_decay
from gen_dist.tasks.r3gan import R3Discriminator, R3Generator, Resample, ResidualBlock

# ---------------------------------------------------------------------------------------------- 25 Gaussians

GRID = torch.stack(torch.meshgrid(torch.arange(-2.0, 3.0), torch.arange(-2.0, 3.0), indexing="ij"), -1).view(-1, 2) / 2
SPREAD = 0.025


class _Critic(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 128), nn.LeakyReLU(0.2), nn.Linear(128, 128), nn.LeakyReLU(0.2),
                                 nn.Linear(128, 1))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(x).flatten()


class _Maker(nn.Module):
    def __init__(self, z_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(z_dim, 128), nn.LeakyReLU(0.2), nn.Linear(128, 128), nn.LeakyReLU(0.2),
                                 nn.Linear(128, 2))

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(z)


def _modes_covered(steps: int, *overrides: str) -> tuple[int, float]:
    """Train the GAN task's own D and G phases on MLPs; (modes with >= 10 of 2,500 samples within 1/4 of the
    grid spacing of them, fraction of samples that close to a mode)."""
    cfg = load_config(CONFIGS / "smoke_gan.yaml", ["gan.num_classes=0", "gan.augment=", "gan.ada_target=0",
                                                   "gan.z_dim=16", "gan.r1_every=1", *overrides])
    task = GANTask(cfg)
    torch.manual_seed(0)
    nets = {"G": _Maker(16), "D": _Critic()}
    opts = {n: torch.optim.Adam(m.parameters(), lr=1e-3, betas=(0.0, 0.99)) for n, m in nets.items()}
    data = torch.Generator().manual_seed(0)
    for step in range(steps):
        x = GRID[torch.randint(0, 25, (256,), generator=data)] + SPREAD * torch.randn(256, 2, generator=data)
        for phase in task.phases:
            for name, m in nets.items():
                m.requires_grad_(name == phase.trains)
            loss, _ = phase.loss(nets, {"x": x}, step)
            opts[phase.trains].zero_grad()
            loss.backward()
            opts[phase.trains].step()
    with torch.no_grad():
        near = torch.cdist(nets["G"](torch.randn(2500, 16)), GRID).min(dim=1)
    close = near.values < 0.125
    return int((torch.bincount(near.indices[close], minlength=25) >= 10).sum()), close.float().mean().item()


def test_rpgan_with_r1_and_r2_covers_the_25_gaussians() -> None:
    modes, close = _modes_covered(1500, "gan.loss=rpgan", "gan.r1_gamma=0.1", "gan.r2_gamma=0.1")
    assert modes >= 23 and close > 0.2, (modes, close)


# ---------------------------------------------------------------------------------------------- schedules


def test_schedules_move_on_a_half_cosine_over_images_and_hold() -> None:
    s = GANSchedule(kimg=[1, 3], lr=[2e-4, 5e-5], ema_kimg=[0, 10])
    assert s.at("beta2", 2000) is None
    assert s.at("lr", 0) == s.at("lr", 1000) == 2e-4  # held before the start
    assert s.at("lr", 2000) == pytest.approx((2e-4 + 5e-5) / 2)  # half way: the mean
    assert s.at("lr", 1500) == pytest.approx(2e-4 - 1.5e-4 * (1 - math.cos(math.pi / 4)) / 2)
    assert s.at("lr", 3000) == s.at("lr", 10**9) == pytest.approx(5e-5)  # held after the end
    assert ema_decay(s.at("ema_kimg", 2000) * 1000, 64) == pytest.approx(0.5 ** (64 / 5000))
    assert ema_decay(0, 64) == 0.0  # a zero half-life follows the weights (R3GAN's ramp starts there)


def test_a_run_applies_its_schedules_at_every_step(tmp_path: Path, digits: Path) -> None:
    run = tmp_path / "run"
    run_cli("train", *smoke_args("gan", run, digits), *R3GAN, "train.steps=6", "train.log_every=1",
            "track.backends=[jsonl]")
    cfg = load_config(run / "config.yaml", [])
    s, batch = cfg.gan.schedule, cfg.data.batch_size
    for r in step_records(run):
        images = (r["step"] - 1) * batch  # the values a step uses come from the images before it
        assert r["lr/G"] == pytest.approx(s.at("lr", images)) and r["lr/D"] == r["lr/G"], r
        assert r["beta2/D"] == pytest.approx(s.at("beta2", images))
        assert r["D/r1_gamma"] == pytest.approx(s.at("gamma", images)) == pytest.approx(r["D/r2_gamma"])
        assert r["D/augment_p"] == pytest.approx(s.at("augment_p", images))
    records = step_records(run)  # held for the first 50 images, moving after
    assert len(records) == 6 and records[0]["lr/G"] == 1e-3 > records[-1]["lr/G"]


# ---------------------------------------------------------------------------------------------- R3GAN's nets


def test_r3gan_nets_start_as_identity_blocks_resample_smoothly_and_keep_the_coarsest_stage_in_fp32() -> None:
    g = R3Generator(16, [32, 16], 2, 16, 2, 1, 8, 10)
    d = R3Discriminator([16, 32], 2, 16, 2, 1, 8, 10)
    h = torch.randn(2, 32, 4, 4)
    for block in [m for m in g.modules() if isinstance(m, ResidualBlock)]:
        torch.testing.assert_close(block(h[:, :block.project.weight.shape[0]]), h[:, :block.project.weight.shape[0]])
    flat = torch.ones(1, 3, 8, 8)
    torch.testing.assert_close(Resample(3, 3, up=True)(flat)[..., 2:-2, 2:-2], torch.ones(1, 3, 12, 12))
    torch.testing.assert_close(Resample(3, 3, up=False)(flat)[..., 1:-1, 1:-1], torch.ones(1, 3, 2, 2))
    seen = {}
    for name, stage in [("g0", g.stages[0]), ("g1", g.stages[1]), ("d_last", d.stages[-1])]:
        stage.register_forward_hook(lambda m, i, out, name=name: seen.__setitem__(name, out.dtype))
    z, labels = torch.randn(4, 16), torch.arange(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = g(z, labels)
        logit = d(x, labels)
    assert seen == {"g0": torch.float32, "g1": torch.bfloat16, "d_last": torch.float32}
    assert x.shape == (4, 1, 8, 8) and logit.shape == (4,)
    # D's logit is the projection of its features on the class embedding.
    assert not torch.allclose(d(x.float(), labels), d(x.float(), labels.flip(0)))


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(("overrides", "message"), [
    (["gan.schedule.kimg=[100,50]", "gan.schedule.lr=[1e-3,1e-4]"], "its end comes before its start"),
    (["gan.schedule.lr=[1e-3,1e-4]"], "gan.schedule.kimg is empty"),
    (["gan.r1_gamma=-1"], "'gan.r1_gamma' must be >= 0"),
    (["gan.loss=rpgan", "gan.r2_gamma=1", "gan.schedule.kimg=[0,1]", "gan.schedule.gamma=[1,-0.1]"],
     "a negative weight is no penalty"),
    (["gan.arch=r3gan", "gan.channels=[24,16]", "gan.d_channels=[16,24]", "gan.group_width=32"],
     "width 24 x gan.expansion 2 is not divisible by gan.group_width 32"),
    (["gan.arch=r3gan", "gan.channels=[32,16]", "gan.d_channels=[16]"], "must have as many stages"),
    (["gan.mbstd_group=3"], "gan.mbstd_group=3 must divide data.batch_size=16"),
    (["gan.r2_gamma=1"], "with gan.loss=nonsaturating use R1 alone"),
    (["gan.loss=rpgan", "gan.r2_gamma=1", "gan.r1_every=1", "parallel.strategy=deepspeed", "parallel.zero_stage=2"],
     "gan.r1_every >= 2"),
    (["gan.schedule.kimg=[0,1]", "gan.schedule.augment_p=[0,0.5]"], "adapt it (ADA) or schedule it"),
    (["gan.schedule.kimg=[0,1]", "gan.schedule.lr=[1e-3,1e-4]", "optim.schedule=cosine"],
     "replaces optim.schedule"),
])
def test_bad_recipe_settings_are_named_before_launch(overrides: list[str], message: str, tmp_path: Path,
                                                      digits: Path) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(CONFIGS / "smoke_gan.yaml", overrides)
    proc = run_cli("launch", *smoke_args("gan", tmp_path / "r", digits), *overrides, "--nproc", "2", check=False) \
        if overrides[0] == "gan.schedule.kimg=[100,50]" else None
    if proc is not None:  # refused by the launcher itself: no process started, nothing written
        assert proc.returncode != 0 and message in proc.stderr and not (tmp_path / "r").exists()


def test_shipped_r3gan_configs_build() -> None:
    for name in ("gan_r3gan_cifar10", "gan_r3gan_imagenet64", "gan_r3gan_fashion_mnist"):
        cfg = load_config(CONFIGS / f"{name}.yaml", [])
        assert cfg.gan.arch == "r3gan" and cfg.gan.loss == "rpgan" and cfg.gan.schedule.kimg
        with torch.device("meta"):
            task = GANTask(cfg)
        assert {"D", "G"} == set(task.modules)
