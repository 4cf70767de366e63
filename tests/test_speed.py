"""The fast path on CPU: activation checkpointing changes memory and not the numbers, the switches are checked
before launch, FLOPs are counted right, and compile runs under DDP and FSDP on real ranks."""

import math
from pathlib import Path

import pytest
import torch
from conftest import CONFIGS, events, free_port, run_cli, smoke_args, step_records
from torch import nn

from gen_dist.config import load_config
from gen_dist.family import Phase, Task, family
from gen_dist.perf import flops_per_image
from gen_dist.schema import ConfigError

FAMILIES = {"diffusion": [], "gan": ["gan.r1_gamma=1.0", "gan.r1_every=1"], "vae": [], "classifier": []}


def _phase_grads(task: Task, batch: dict, seed: int) -> tuple[list[float], list[torch.Tensor], int]:
    """Loss and gradients of every phase from the same weights and seed, and the bytes autograd saved."""
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    losses, grads = [], []
    for phase in task.phases:
        for name, m in task.modules.items():
            m.requires_grad_(name == phase.trains)
            m.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, _ = phase.loss(task.modules, batch, 0)
        loss.backward()
        losses.append(loss.item())
        grads += [p.grad.clone() for p in task.modules[phase.trains].parameters() if p.grad is not None]
    return losses, grads, saved


@pytest.mark.parametrize("name", list(FAMILIES))
def test_activation_checkpointing_keeps_losses_and_gradients_and_saves_memory(name: str) -> None:
    smoke = "smoke_vae" if name == "classifier" else f"smoke_{name}"
    cfg = load_config(CONFIGS / f"{smoke}.yaml", [f"task={name}", *FAMILIES[name]])
    torch.manual_seed(0)
    plain = family(name).task(cfg)
    torch.manual_seed(0)
    checkpointed = family(name).task(cfg)
    for m in checkpointed.modules.values():
        m.enable_gradient_checkpointing()
    batch = {"x": torch.rand(8, 1, 8, 8) * 2 - 1, "label": torch.arange(8) % 10}
    losses, grads, saved = _phase_grads(plain, batch, seed=1)
    c_losses, c_grads, c_saved = _phase_grads(checkpointed, batch, seed=1)
    assert len(losses) == len(task_phases := plain.phases) and len(task_phases) >= 1
    assert c_losses == pytest.approx(losses, rel=1e-6, abs=1e-7)
    assert len(c_grads) == len(grads)
    for a, b in zip(grads, c_grads, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert c_saved < 0.9 * saved, (c_saved, saved)


class _Linear(Task):
    sampled = "net"

    def __init__(self) -> None:
        self.modules = {"net": nn.Linear(64, 20, bias=False)}
        self.phases = [Phase("a", "net", self.loss), Phase("b", "net", self.loss, every=4)]

    def loss(self, nets, batch, step):
        out = nets["net"](batch["x"].flatten(1) + torch.randn(batch["x"].shape[0], 64))
        return out.sum(), {}


def test_flop_count_is_forward_and_backward_weighted_by_phase_frequency() -> None:
    task = _Linear()
    rng = torch.random.get_rng_state()
    weight = task.modules["net"].weight.detach().clone()
    # per image: forward 2*64*20, weight gradient 2*64*20 (the input needs none); phase b runs every 4th step
    assert flops_per_image(task, {}, (1, 8, 8)) == pytest.approx(2 * 2 * 64 * 20 * (1 + 1 / 4))
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert torch.equal(task.modules["net"].weight, weight) and task.modules["net"].weight.grad is None


def test_switches_are_checked_before_launch(tmp_path: Path, digits: Path) -> None:
    base = [f"data.path={digits}"]
    cfg = load_config(CONFIGS / "smoke_vae.yaml", [*base, "train.compile=true", "train.channels_last=off"])
    assert (cfg.train.compile, cfg.train.channels_last) == ("on", "off")
    with pytest.raises(ConfigError, match="train.compile must be one of|'train.compile' must be one of"):
        load_config(CONFIGS / "smoke_vae.yaml", [*base, "train.compile=sometimes"])
    with pytest.raises(ConfigError, match="train.compile=on is not supported with parallel.strategy=deepspeed"):
        load_config(CONFIGS / "smoke_vae.yaml", [*base, "train.compile=on", "parallel.strategy=deepspeed"])
    proc = run_cli("launch", *smoke_args("vae", tmp_path / "r", digits, "parallel.strategy=fsdp",
                                         "train.channels_last=on"), "--nproc", "2", check=False)
    assert proc.returncode != 0 and "train.channels_last=on is not supported with parallel.strategy=fsdp" in proc.stderr
    assert not (tmp_path / "r").exists()


def _losses(run_dir: Path) -> list[float]:
    return [v for r in step_records(run_dir) for k, v in sorted(r.items()) if k.endswith(("/loss", "_penalty"))]


def test_compile_and_checkpointing_under_ddp_and_fsdp(tmp_path: Path, digits: Path) -> None:
    """Two real ranks each train the GAN (two optimizers, R1's double backward, which runs eagerly): compiled,
    checkpointed (and channels-last under DDP) runs track the plain run, and the logs carry the FLOPs, the
    step-time breakdown and peak memory."""
    common = ("train.steps=6", "train.log_every=1", "train.ckpt_every=6", "gan.r1_gamma=1.0", "gan.r1_every=2")

    def launch(name: str, *extra: str) -> Path:
        run_dir = tmp_path / name
        run_cli("launch", *smoke_args("gan", run_dir, digits, *common, *extra), "--nproc", "2",
                "--port", free_port(), timeout=600)
        return run_dir

    plain = launch("plain", "train.compile=off")
    ddp = launch("ddp", "train.compile=on", "train.channels_last=on", "train.activation_checkpointing=true")
    fsdp = launch("fsdp", "parallel.strategy=fsdp", "train.compile=on", "train.activation_checkpointing=true")
    reference = _losses(plain)
    assert len(reference) == 6 * 2 + 3 and all(math.isfinite(v) for v in reference)
    for run_dir in (ddp, fsdp):
        assert _losses(run_dir) == pytest.approx(reference, rel=1e-3), run_dir.name
        (start,) = events(run_dir, "start")
        assert start["compile"] is True and start["activation_checkpointing"] is True
        assert start["optimizer"] == {"foreach": True} and start["flops_per_image"] > 0
    assert events(ddp, "start")[0]["channels_last"] is True
    assert events(fsdp, "start")[0]["channels_last"] is False
    record = step_records(ddp)[-1]
    parts = [record[f"time/{p}_ms"] for p in ("data", "fwd_bwd", "optimizer", "collectives", "ema")]
    assert all(v >= 0 for v in parts) and record["time/fwd_bwd_ms"] > 0
    # the parts cover the step: their sum is the step time that images/s is computed from
    step_ms = 1000 * 16 * 2 / record["images_per_s"]  # smoke batch 16 on each of 2 ranks
    assert sum(parts) == pytest.approx(step_ms, rel=0.15)
    assert record["memory/peak_rss_gib"] > 0.1 and record["perf/tflops_per_device"] > 0
    assert "perf/mfu" not in record  # no peak is known for a CPU
