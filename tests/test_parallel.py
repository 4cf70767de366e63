"""Sharded strategies launched for real (2 gloo ranks): DeepSpeed ZeRO 1/2/3 and FSDP2 against the DDP run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import R3GAN, ROOT, events, free_port, run_cli, smoke_args, step_records, train_command
from safetensors.torch import load_file

from gen_dist import posthoc

# Same global batch for both runs; a record per step; no clipping, so the two clipping implementations cannot
# differ.
COMMON = ["data.batch_size=8", "data.num_workers=0", "train.steps=6", "train.ckpt_every=3", "train.log_every=1",
          "optim.grad_clip=0"]
SHARDED = {
    "zero1": ["parallel.strategy=deepspeed", "parallel.zero_stage=1"],
    "zero2": ["parallel.strategy=deepspeed", "parallel.zero_stage=2"],
    # ZeRO-3 cannot run R1's double backward (refused by the config); its GAN runs train without R1.
    "zero3": ["parallel.strategy=deepspeed", "parallel.zero_stage=3"],
    "fsdp": ["parallel.strategy=fsdp"],
}
DISTRIBUTED_TYPE = {"zero1": "DEEPSPEED", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED", "fsdp": "FSDP"}


def _task_extra(task: str, strategy: str) -> list[str]:
    """ZeRO-3 trains the DCGAN without penalties; ZeRO-2 and FSDP train R3GAN's recipe (rpgan, R1 and R2, every
    schedule moving): FSDP with the penalties in D's phase, ZeRO-2 in their own phase every other step."""
    if task != "gan":
        return []
    return {"zero3": ["gan.r1_gamma=0"], "zero2": [*R3GAN, "gan.r1_every=2"]}.get(strategy, list(R3GAN))


def _launch(task: str, run_dir: Path, data: Path, *extra: str) -> None:
    run_cli(*train_command(2, *smoke_args(task, run_dir, data), *COMMON, *extra))


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory: pytest.TempPathFactory, digits: Path):
    """DDP reference runs, made once per (task, extra overrides)."""
    done: dict[tuple, Path] = {}

    def get(task: str, *extra: str) -> Path:
        key = (task, *extra)
        if key not in done:
            done[key] = tmp_path_factory.mktemp(f"ddp_{task}")
            _launch(task, done[key], digits, *extra)
        return done[key]

    return get


def _sampled_weights(run_dir: Path, task: str) -> dict[str, torch.Tensor]:
    """Consolidated raw + EMA weights of the generator/denoiser in the last checkpoint."""
    ckpt = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    raw = ckpt / "weights.safetensors"
    if not raw.exists():  # DDP: accelerate's own file; the GAN's G is the second module
        raw = ckpt / ("model_1.safetensors" if task == "gan" else "model.safetensors")
    return {**load_file(str(raw)), **{f"ema.{k}": v for k, v in load_file(str(ckpt / "ema.safetensors")).items()}}


# Each strategy; the GAN's two engines (with R1's double backward under ZeRO-2) under ZeRO-2, ZeRO-3 and FSDP;
# each family under DeepSpeed (ZeRO-3 diffusion is the offload test below; VAE FSDP is in the resume tests), and
# the VQ-VAE's codebook and late discriminator phase under ZeRO-3.
EQUIVALENCE = [("diffusion", "zero1"), ("gan", "zero2"), ("gan", "zero3"), ("vae", "zero3"), ("gan", "fsdp"),
               ("vqvae", "zero3")]
# Each sharding strategy's bf16 path (ZeRO-1 runs the same bf16 code as ZeRO-2) and each family once.
BF16 = [("diffusion", "zero2"), ("vae", "zero3"), ("gan", "fsdp")]


@pytest.mark.parametrize(("task", "strategy"), EQUIVALENCE)
def test_sharded_resumed_run_matches_ddp(task: str, strategy: str, tmp_path: Path, digits: Path, ddp_runs) -> None:
    """3 sharded steps, stop, resume for 3 more == 6 DDP steps, fp32, within 1e-4."""
    extra = _task_extra(task, strategy)
    _check_resumed_matches(ddp_runs(task, *extra), task, [*SHARDED[strategy], *extra], DISTRIBUTED_TYPE[strategy],
                           tmp_path / strategy, digits)


def test_zero3_with_cpu_offload_matches_ddp(tmp_path: Path, digits: Path, ddp_runs) -> None:
    """Optimizer state stepped on the CPU by DeepSpeedCPUAdam, parameters offloaded between uses."""
    offload = ["parallel.offload_optimizer=true", "parallel.offload_params=true"]
    _check_resumed_matches(ddp_runs("diffusion"), "diffusion", [*SHARDED["zero3"], *offload], "DEEPSPEED",
                           tmp_path / "offload", digits)


def test_accelerate_deepspeed_flags_select_deepspeed(tmp_path: Path, digits: Path) -> None:
    """`accelerate launch --use_deepspeed --zero_stage 3` alone (no parallel.* keys) trains under ZeRO-3."""
    run_dir = tmp_path / "acc"
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed", "--zero_stage", "3",
         "--num_processes", "2", "--main_process_port", free_port(), "-m", "gen_dist", "train",
         *smoke_args("vae", run_dir, digits), "train.steps=2"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (start,) = events(run_dir, "start")
    assert start["world_size"] == 2 and start["distributed_type"] == "DistributedType.DEEPSPEED"
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())["parallel"]
    assert saved["strategy"] == "deepspeed" and saved["zero_stage"] == 3


def _check_resumed_matches(ref: Path, task: str, sharded: list[str], kind: str, run_dir: Path, digits: Path,
                           resume: bool = True) -> None:
    if resume:
        _launch(task, run_dir, digits, *sharded, "train.steps=3")
    _launch(task, run_dir, digits, *sharded)
    starts = events(run_dir, "start")
    assert [s["step"] for s in starts] == ([0, 3] if resume else [0]) and starts[-1]["resumed"] == resume
    assert all(s["world_size"] == 2 and s["distributed_type"] == f"DistributedType.{kind}" for s in starts)
    a, b = _sampled_weights(ref, task), _sampled_weights(run_dir, task)
    assert a.keys() == b.keys()
    # All-reduce vs reduce-scatter order changes float rounding; Adam's first steps amplify it to ~4e-5.
    # A wrong data split, noise, LR or EMA moves weights by ~lr = 1e-3.
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-4, msg=k)
    ref_losses = [(r["step"], v) for r in step_records(ref) for k, v in sorted(r.items()) if k.endswith("loss")]
    losses = [(r["step"], v) for r in step_records(run_dir) for k, v in sorted(r.items()) if k.endswith("loss")]
    assert [s for s, _ in losses] == [s for s, _ in ref_losses]
    assert [v for _, v in losses] == pytest.approx([v for _, v in ref_losses], rel=1e-4, abs=1e-5)


# A small DiT with flow matching and two post-hoc EMA profiles.
DIT = ["diffusion.backbone=dit", "diffusion.objective=flow", "diffusion.dit_depth=3", "diffusion.dit_heads=2",
       "diffusion.dit_head_dim=8", "train.posthoc_ema=[0.05,0.1]", "train.posthoc_every=2"]


def _losses(run_dir: Path) -> list[float]:
    return [r["denoise/loss"] for r in step_records(run_dir)]


def test_dit_under_zero3_and_fsdp_matches_ddp_and_so_does_its_posthoc_ema(tmp_path: Path, digits: Path,
                                                                          ddp_runs) -> None:
    """The DiT trains under ZeRO-3, and under FSDP with each block its own unit (but the first, which the output
    layer also reads), compiled per block and checkpointed per block, as under DDP (FSDP's stopped at step 3 and
    resumed). The post-hoc EMA reconstructed from each run's half-precision snapshots is the same; for a tracked
    length it is that profile; `eval --ema-stds` scores lengths and refuses one the snapshots cannot give."""
    ref = ddp_runs("diffusion", *DIT)
    zero3, fsdp = tmp_path / "zero3", tmp_path / "fsdp"
    _check_resumed_matches(ref, "diffusion", [*SHARDED["zero3"], *DIT], "DEEPSPEED", zero3, digits, resume=False)
    fast = ["train.compile=on", "train.activation_checkpointing=true"]
    _launch("diffusion", fsdp, digits, *SHARDED["fsdp"], *DIT, *fast, "train.steps=3")
    _launch("diffusion", fsdp, digits, *SHARDED["fsdp"], *DIT, *fast)
    start = events(fsdp, "start")[-1]
    assert start["resumed"] and start["compile"] and start["activation_checkpointing"]
    units = start["sharding_units"]["denoiser"]
    assert {"(root)", "transformer_blocks.1", "transformer_blocks.2"} <= set(units)
    assert "transformer_blocks.0" not in units and start["compiled_blocks"] == {"denoiser": 3}
    assert _losses(fsdp) == pytest.approx(_losses(ref), rel=1e-3)

    made = {run.name: posthoc.reconstruct(run, 0.09)[0] for run in (ref, zero3, fsdp)}
    for run in (zero3, fsdp):
        for k, v in made[ref.name].items():
            torch.testing.assert_close(made[run.name][k], v, rtol=1e-3, atol=2e-3, msg=k)
    tracked = tmp_path / "tracked.safetensors"
    run_cli("ema", str(ref), "--std", "0.1", "--out", str(tracked))
    profile = load_file(str(ref / "checkpoints" / "step_00000006" / "posthoc_1.safetensors"))
    rebuilt = {k.removeprefix("ema."): v for k, v in load_file(str(tracked)).items()}
    assert rebuilt.keys() == profile.keys()
    for k, v in profile.items():  # through a half-precision snapshot
        torch.testing.assert_close(rebuilt[k], v, rtol=2e-3, atol=1e-4, msg=k)

    proc = run_cli("eval", str(ref), "--ema-stds", "0.25", "--nproc", "2", check=False)
    assert proc.returncode == 2 and "post-hoc EMA std 0.25 cannot be reconstructed" in proc.stderr
    run_cli("eval", str(ref), "--ema-stds", "0.07,0.1", "--n", "8", "--reference-n", "16", "--metrics", "fid",
            "--batch-size", "8")
    report = json.loads((ref / "eval" / "posthoc.json").read_text())
    assert [r["std"] for r in report["stds"]] == [0.07, 0.1] and report["best"] in (0.07, 0.1)
    assert all(math.isfinite(r["scores"]["eval/inception/fid8"]) for r in report["stds"])


@pytest.mark.parametrize(("task", "strategy"), BF16)
def test_sharded_bf16_losses_are_finite(task: str, strategy: str, tmp_path: Path, digits: Path) -> None:
    run_dir = tmp_path / "bf16"
    _launch(task, run_dir, digits, *SHARDED[strategy], *_task_extra(task, strategy), "train.mixed_precision=bf16",
            "train.steps=4")
    losses = [v for r in step_records(run_dir) for k, v in r.items() if k.endswith(("loss", "grad_norm"))]
    assert losses and all(math.isfinite(v) for v in losses)
    (start,) = events(run_dir, "start")
    assert start["world_size"] == 2


@pytest.mark.parametrize(("strategy", "shards"), [("zero3", "pytorch_model/zero_pp_rank_*_optim_states.pt"),
                                                  ("fsdp", "pytorch_model_fsdp_0/__*_*.distcp")])
def test_sharded_checkpoint_exports_consolidated_weights(strategy: str, shards: str, tmp_path: Path,
                                                        digits: Path) -> None:
    run_dir = tmp_path / strategy
    _launch("diffusion", run_dir, digits, *SHARDED[strategy], "train.steps=3", "train.snapshot_every=3")
    ckpt = run_dir / "checkpoints" / "step_00000003"
    # Each rank wrote its own part of the state.
    assert len(list(ckpt.glob(shards))) == 2, sorted(p.name for p in ckpt.rglob("*"))
    out = tmp_path / "denoiser.safetensors"
    run_cli("export", str(run_dir), "--out", str(out))
    exported = load_file(str(out))
    ema = load_file(str(ckpt / "ema.safetensors"))
    snapshot = load_file(str(run_dir / "snapshots" / "step_00000003.safetensors"))  # consolidated too
    assert snapshot.keys() == {f"ema.{k}" for k in ema}
    for k, v in ema.items():
        assert torch.equal(exported[f"ema.{k}"], v) and torch.equal(snapshot[f"ema.{k}"], v)
    raw = {k.removeprefix("model."): v for k, v in exported.items() if k.startswith("model.")}
    assert raw.keys() == ema.keys() and all(v.numel() > 0 for v in raw.values())
    run_cli("sample", str(out), "--n", "4", "--out", str(tmp_path / "s.npz"))
    import numpy as np

    images = np.load(tmp_path / "s.npz")["images"]
    assert images.shape == (4, 8, 8, 1) and images.std() > 0


@pytest.mark.parametrize(("overrides", "message"), [
    (["parallel.zero_stage=3", "gan.r1_gamma=1"], "double backward"),
    (["parallel.offload_params=true"], "needs parallel.zero_stage=3"),
    (["train.mixed_precision=fp16"], "fp16 is not supported with parallel.strategy=deepspeed"),
])
def test_bad_deepspeed_settings_fail_before_launch(overrides: list[str], message: str, tmp_path: Path,
                                                   digits: Path) -> None:
    proc = run_cli("launch", *smoke_args("gan", tmp_path / "r", digits), "parallel.strategy=deepspeed",
                   *overrides, "--nproc", "2", check=False)
    assert proc.returncode == 2 and message in proc.stderr
    assert not (tmp_path / "r").exists()


def test_deepspeed_json_is_validated_before_launch(tmp_path: Path, digits: Path) -> None:
    bad = tmp_path / "ds.json"
    bad.write_text('{"zero_optimization": {"stage": 2, "reduce_bucket_size": "lots"}}')
    proc = run_cli("launch", *smoke_args("vae", tmp_path / "r", digits), "parallel.strategy=deepspeed",
                   f"parallel.deepspeed_config={bad}", "--nproc", "2", check=False)
    assert proc.returncode == 2 and "reduce_bucket_size" in proc.stderr
    bad.write_text('{"optimizer": {"type": "Adam"}}')
    proc = run_cli("launch", *smoke_args("vae", tmp_path / "r", digits), "parallel.strategy=deepspeed",
                   f"parallel.deepspeed_config={bad}", "--nproc", "2", check=False)
    assert proc.returncode == 2 and "sets 'optimizer'" in proc.stderr
