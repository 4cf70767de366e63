"""The task contract from outside gen_dist: a family defined in this module (its config section, checks, a
frozen module loaded from a path in its config, and an update after each step that reduces across ranks) trains
through the ordinary CLI, on 1 process and on 2 ranks under DDP and ZeRO-2. GEN_DIST_PLUGINS=test_families
registers it in every process of a run."""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import CONFIGS, ROOT, events, free_port, run_cli, step_records
from safetensors.torch import load_file, save_file
from torch import nn

from gen_dist.family import Batch, Family, Nets, Phase, Reduce, Task, register
from gen_dist.schema import ConfigError, RunConfig

HERE = Path(__file__).resolve().parent


@dataclass
class ProbeConfig:
    width: int = 8
    """Hidden channels of the trained net."""
    frozen: str = ""
    """safetensors file holding the frozen feature net's weights."""


class FeatureNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)


class ProbeNet(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.SiLU(), nn.Conv2d(width, 1, 3, padding=1))
        # Kept by `after_step`: rank-count sums (through the engine's reduce) and a checksum of the frozen net.
        self.register_buffer("reduced", torch.zeros((), dtype=torch.float64))
        self.register_buffer("frozen_crc", torch.zeros((), dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def frozen_crc(net: nn.Module) -> int:
    return zlib.crc32(b"".join(p.detach().cpu().numpy().tobytes() for p in net.parameters()))


class ProbeTask(Task):
    """Learns to imitate a frozen convolution of the image."""

    sampled = "net"

    def __init__(self, cfg: RunConfig) -> None:
        features = FeatureNet()
        features.load_state_dict(load_file(cfg.probe.frozen))
        self.modules = {"net": ProbeNet(cfg.probe.width)}
        self.frozen = {"features": features}
        self.phases = [Phase("fit", "net", self.loss)]

    def loss(self, nets: Nets, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with torch.no_grad():
            target = nets["features"].conv(batch["x"])
        loss = F.mse_loss(nets["net"](batch["x"]).float(), target.float())
        return loss, {"loss": loss.detach()}

    def after_step(self, nets: Nets, reduce: Reduce, step: int) -> None:
        net = nets["net"]
        net.reduced += reduce(torch.ones((), dtype=torch.float64, device=net.reduced.device))
        net.frozen_crc.fill_(frozen_crc(nets["features"]))

    @torch.no_grad()
    def sample(self, net: nn.Module, labels: torch.Tensor | None, n: int, generator: torch.Generator) -> torch.Tensor:
        x = torch.randn((n, 1, 8, 8), generator=generator).to(next(net.parameters()).device)
        return net(x).float().clamp(-1, 1)


def check(cfg: RunConfig) -> None:
    if cfg.task == "probe" and not cfg.probe.frozen:
        raise ConfigError("probe.frozen must name the frozen feature net's weights")


# Registered in the processes of the runs these tests start, not in pytest's own: there every in-process run
# would write a probe section into its saved config, which other tests' processes could not read back.
if "test_families" in os.environ.get("GEN_DIST_PLUGINS", "").split(","):
    register(Family("probe", ProbeConfig, ProbeTask, "a test family: imitates a frozen convolution",
                    positive=("width",), check=check))


def _plugin_env() -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(HERE), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return {"GEN_DIST_PLUGINS": "test_families", "PYTHONPATH": path}


@pytest.fixture
def probe(tmp_path: Path, digits: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, list[str]]:
    """A probe config (the smoke VAE's data and train sections) and its frozen weights file."""
    for k, v in _plugin_env().items():
        monkeypatch.setenv(k, v)
    torch.manual_seed(1)
    weights = tmp_path / "features.safetensors"
    save_file(FeatureNet().state_dict(), str(weights))
    text = (CONFIGS / "smoke_vae.yaml").read_text().split("vae:")[0].replace("task: vae", "task: probe")
    config = tmp_path / "probe.yaml"
    config.write_text(text + f"probe:\n  width: 4\n  frozen: {weights}\n")
    return weights, [str(config), f"data.path={digits}", "track.backends=[jsonl]"]


def test_extra_family_trains_through_the_cli(probe: tuple[Path, list[str]], tmp_path: Path) -> None:
    weights, args = probe
    assert "probe        a test family" in run_cli("train", "--help").stdout
    bad = run_cli("train", *args, "probe.widht=3", check=False)
    assert bad.returncode == 2 and "unknown config key 'probe.widht'" in bad.stderr
    bad = run_cli("train", *args, "probe.frozen=", check=False)
    assert bad.returncode == 2 and "probe.frozen must name" in bad.stderr
    run_dir = tmp_path / "one"
    run_cli("train", *args, f"run_dir={run_dir}", "train.steps=4")
    assert [r["step"] for r in step_records(run_dir)] == [2, 4]
    assert (run_dir / "samples" / "step_00000004.png").exists()
    ema = load_file(str(run_dir / "checkpoints" / "step_00000004" / "ema.safetensors"))
    assert ema["reduced"].item() == 4  # one rank, 4 steps
    assert ema["frozen_crc"].item() == frozen_crc(_features(weights))


def _features(weights: Path) -> FeatureNet:
    net = FeatureNet()
    net.load_state_dict(load_file(str(weights)))
    return net


def _optimizer_numels(ckpt: Path) -> list[int]:
    """Sizes of the parameters the optimizer state of a checkpoint covers (whole, over all ranks)."""
    if (ckpt / "optimizer.bin").exists():  # DDP: torch's optimizer state dict
        state = torch.load(ckpt / "optimizer.bin", weights_only=True)["state"]
        return sorted(s["exp_avg"].numel() for s in state.values())
    # DeepSpeed: the engine records the shapes of the parameters its optimizer holds.
    (states,) = ckpt.rglob("mp_rank_00_model_states.pt")
    from gen_dist.checkpoint import _safe_globals

    with torch.serialization.safe_globals(_safe_globals()):
        shapes = torch.load(states, weights_only=True)["param_shapes"]
    return sorted(torch.Size(s).numel() for group in shapes for s in group.values())


@pytest.mark.parametrize("strategy", [["parallel.strategy=ddp"],
                                      ["parallel.strategy=deepspeed", "parallel.zero_stage=2"]], ids=["ddp", "zero2"])
def test_frozen_module_on_two_ranks(strategy: list[str], probe: tuple[Path, list[str]], tmp_path: Path) -> None:
    """The frozen net is bit-identical after training, is in no optimizer state, is not saved, and the update
    after each step sees every rank through the engine's reduce."""
    weights, args = probe
    run_dir = tmp_path / "two"
    run_cli("launch", *args, f"run_dir={run_dir}", "train.steps=4", *strategy, "--nproc", "2", "--port", free_port())
    (start,) = events(run_dir, "start")
    assert start["world_size"] == 2
    ckpt = run_dir / "checkpoints" / "step_00000004"
    ema = load_file(str(ckpt / "ema.safetensors"))
    assert ema["reduced"].item() == 2 * 4  # two ranks, 4 steps
    assert ema["frozen_crc"].item() == frozen_crc(_features(weights))
    trained = ProbeNet(4)
    assert _optimizer_numels(ckpt) == sorted(p.numel() for p in trained.parameters())
    saved = [k for f in ckpt.rglob("*.safetensors") for k in load_file(str(f))]
    assert saved and not any("features" in k or k.startswith("conv.") for k in saved)
