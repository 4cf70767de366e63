"""Images/s of gen_dist's loop against a plain PyTorch loop and the diffusers `train_unconditional.py` recipe:
the same model, batch and shards, in one process, repeated in turn so the spread between repeats shows.

    python benchmarks/speed.py --case cpu        # 2.7 M-param UNet, 32x32, batch 64, fp32, 2 threads
    python benchmarks/speed.py --case gpu-unet   # UNet [128, 256, 256, 512], 64x64, batch 256, bf16
    python benchmarks/speed.py --case gpu-gan    # the Fashion-MNIST GAN scaled to 64x64, batch 256, bf16
    python benchmarks/speed.py --case gpu-vae    # the Fashion-MNIST VAE scaled to 64x64, batch 256, bf16

(a) gen_dist: `Trainer(cfg).train()` with its defaults for the device (on CUDA: compile, channels-last, TF32,
    fused AdamW, pinned memory); images/s from the wall-clock times of its log records after the warm-up.
(b) plain: the task's own modules and losses in a hand-written loop (default AdamW, clipping, an EMA, a
    `loss.item()` per log interval) over the same ShardStream and DataLoader.
(c) diffusers (diffusion cases): the `train_unconditional.py` recipe as a plain loop: its DDPMScheduler, AdamW
    settings, cosine schedule with warm-up, clipping, EMAModel with warm-up, a `loss.item()` every step.
`--checkpointing` adds gen_dist with train.activation_checkpointing=true (peak memory on CUDA).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from gen_dist import perf
from gen_dist.config import load_config
from gen_dist.data import ShardStream, make_loader, pack_digits
from gen_dist.family import family
from gen_dist.images import to_model_range
from gen_dist.schema import RunConfig

UNET = ["task=diffusion", "diffusion.num_classes=0", "diffusion.layers_per_block=1"]
CASES: dict[str, dict] = {
    "cpu": {"overrides": [*UNET, "data.resolution=32", "data.batch_size=64", "diffusion.channels=[32,64,128]",
                          "diffusion.attention=[false,false,true]"], "steps": 12, "warmup": 4},
    "gpu-unet": {"overrides": [*UNET, "diffusion.layers_per_block=2", "data.resolution=64", "data.channels=3",
                               "data.batch_size=256", "diffusion.channels=[128,256,256,512]",
                               "diffusion.attention=[false,false,true,true]", "diffusion.norm_groups=32",
                               "train.mixed_precision=bf16", "data.num_workers=4"], "steps": 60, "warmup": 20},
    "gpu-gan": {"config": "configs/gan_fashion_mnist.yaml",
                "overrides": ["data.resolution=64", "data.channels=3", "data.batch_size=256",
                              "gan.channels=[512,256,128,64]", "gan.d_channels=[64,128,256,512]",
                              "train.mixed_precision=bf16", "data.num_workers=4"], "steps": 60, "warmup": 20},
    "gpu-vae": {"config": "configs/vae_fashion_mnist.yaml",
                "overrides": ["data.resolution=64", "data.channels=3", "data.batch_size=256",
                              "vae.channels=[64,128,256]", "vae.latent_dim=128", "train.mixed_precision=bf16",
                              "data.num_workers=4"], "steps": 60, "warmup": 20},
}


def config(case: dict, data: Path, run_dir: Path, extra: list[str]) -> RunConfig:
    steps = case["warmup"] + case["steps"]
    return load_config(case.get("config"), [
        f"data.path={data}", f"run_dir={run_dir}", f"train.steps={steps}", f"train.log_every={case['warmup']}",
        f"train.ckpt_every={steps}", "train.sample_every=0", "train.sample_n=10", "train.progress=false",
        "track.backends=[jsonl]", "eval.every=0", *case["overrides"], *extra])


def device_of(cfg: RunConfig) -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() and not cfg.train.cpu else "cpu")


def batches(cfg: RunConfig, device: torch.device) -> Iterator[dict]:
    d = cfg.data
    stream = ShardStream(d.path, d.split, d.batch_size, 0, 1, d.num_workers, cfg.train.seed, d.shuffle_buffer,
                         d.resolution, d.channels, d.hflip, d.strict)
    while True:
        for b in make_loader(stream, d.num_workers, d.prefetch, pin_memory=device.type == "cuda"):
            yield {"x": to_model_range(b["image"].to(device, non_blocking=True)),
                   "label": b["label"].to(device, non_blocking=True)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(cfg: RunConfig, case: dict, device: torch.device, step: Callable[[int], None]) -> float:
    """Images/s of `step` over case['steps'] steps after case['warmup']."""
    for i in range(case["warmup"]):
        step(i)
    sync(device)
    t0 = time.perf_counter()
    for i in range(case["warmup"], case["warmup"] + case["steps"]):
        step(i)
    sync(device)
    return cfg.data.batch_size * case["steps"] / (time.perf_counter() - t0)


def run_gen_dist(cfg: RunConfig) -> dict[str, float]:
    from accelerate.state import AcceleratorState

    from gen_dist.engine import Trainer

    try:
        Trainer(cfg).train()
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    recs = [json.loads(x) for x in (cfg.out_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in recs if "images_per_s" in r]
    first, last = logged[0], logged[-1]  # the first record closes the warm-up window
    out = {"images_per_s": cfg.data.batch_size * (last["step"] - first["step"]) / (last["time"] - first["time"]),
           "data_wait_frac": statistics.median(r["data_wait_frac"] for r in logged[1:])}
    for key in ("perf/mfu", "perf/tflops_per_device", "memory/peak_allocated_gib", "time/fwd_bwd_ms",
                "time/optimizer_ms", "time/ema_ms", "time/data_ms"):
        if key in last:
            out[key] = last[key]
    return out


def autocast(cfg: RunConfig, device: torch.device):
    if cfg.train.mixed_precision == "no":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if cfg.train.mixed_precision == "bf16" else torch.float16)


def run_plain(cfg: RunConfig, case: dict) -> dict[str, float]:
    device = device_of(cfg)
    torch.manual_seed(cfg.train.seed)
    task = family(cfg.task).task(cfg)
    nets = {n: m.to(device) for n, m in task.modules.items()}
    o = cfg.optim
    opts = {n: torch.optim.AdamW(m.parameters(), lr=o.lr, betas=tuple(o.betas)) for n, m in nets.items()}
    ema_net = copy.deepcopy(nets[task.sampled]).requires_grad_(False)
    ema, live = list(ema_net.parameters()), list(nets[task.sampled].parameters())
    data = batches(cfg, device)
    losses: list[torch.Tensor] = []

    def step(i: int) -> None:
        batch = next(data)
        for phase in task.phases:
            if i % phase.every:
                continue
            for n, m in nets.items():
                m.requires_grad_(n == phase.trains)
            with autocast(cfg, device) if phase.autocast else nullcontext():
                loss, _ = phase.loss(nets, batch, i)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(nets[phase.trains].parameters(), cfg.optim.grad_clip)
            opts[phase.trains].step()
            opts[phase.trains].zero_grad(set_to_none=True)
            losses.append(loss.detach())
        with torch.no_grad():
            torch._foreach_lerp_(ema, live, 1 - cfg.train.ema_decay)
        if (i + 1) % cfg.train.log_every == 0:
            losses[-1].item()

    return {"images_per_s": timed(cfg, case, device, step), **peak(device)}


def run_diffusers(cfg: RunConfig, case: dict) -> dict[str, float]:
    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    from gen_dist.tasks.backbones import build_unet

    device = device_of(cfg)
    torch.manual_seed(cfg.train.seed)
    model = build_unet(cfg, cfg.data.channels, cfg.data.resolution).to(device)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    lr_scheduler = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=500, num_training_steps=10_000)
    ema = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4,
                   model_cls=UNet2DModel, model_config=model.config)
    ema.to(device)
    data = batches(cfg, device)

    def step(i: int) -> None:
        clean = next(data)["x"]
        noise = torch.randn_like(clean)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (clean.shape[0],), device=device)
        with autocast(cfg, device):
            pred = model(scheduler.add_noise(clean, noise, t), t).sample
        loss = F.mse_loss(pred.float(), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        ema.step(model.parameters())
        loss.detach().item()  # the recipe logs the loss every step

    return {"images_per_s": timed(cfg, case, device, step), **peak(device)}


def peak(device: torch.device) -> dict[str, float]:
    """Peak device memory since the last call (the CPU's resident-set peak never goes down: not reported)."""
    return perf.peak_memory(device) if device.type == "cuda" else {}


def data_dir(arg: str, tmp: Path) -> Path:
    if (Path(arg) / "index.json").exists():
        return Path(arg)
    print(f"{arg} has no index.json: packing scikit-learn's digits instead (the images' content does not "
          f"change the speed)")
    pack_digits(tmp / "digits")
    return tmp / "digits"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--case", choices=list(CASES), default="cpu")
    p.add_argument("--data", default="data/fashion_mnist")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="torch threads on CPU")
    p.add_argument("--steps", type=int, help="timed steps per repeat (default: the case's)")
    p.add_argument("--checkpointing", action="store_true", help="also gen_dist with activation checkpointing")
    p.add_argument("--loops", default="gen_dist,plain,diffusers", help="which loops to time (comma-separated)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides for every loop")
    args = p.parse_args()
    case = dict(CASES[args.case])
    if args.steps:
        case["steps"] = args.steps
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data = data_dir(args.data, tmp)
        probe = config(case, data, tmp / "probe", args.overrides)
        loops: dict[str, Callable[[int], dict[str, float]]] = {
            "gen_dist": lambda r: run_gen_dist(config(case, data, tmp / f"g{r}", args.overrides)),
            "plain": lambda r: run_plain(config(case, data, tmp / "p", args.overrides), case),
        }
        if probe.task == "diffusion":
            loops["diffusers"] = lambda r: run_diffusers(config(case, data, tmp / "d", args.overrides), case)
        loops = {k: v for k, v in loops.items() if k in args.loops.split(",")}
        if args.checkpointing:
            loops["gen_dist+ckpt"] = lambda r: run_gen_dist(config(
                case, data, tmp / f"c{r}", [*args.overrides, "train.activation_checkpointing=true"]))
        results: dict[str, list[dict[str, float]]] = {k: [] for k in loops}
        for r in range(args.repeats):
            for name, loop in loops.items():
                results[name].append(loop(r))
                print(f"repeat {r + 1}/{args.repeats} {name:14s} {results[name][-1]['images_per_s']:9.1f} images/s",
                      flush=True)
    report(args, probe, case, results)


def report(args: argparse.Namespace, cfg: RunConfig, case: dict, results: dict[str, list[dict]]) -> None:
    device = device_of(cfg)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {args.threads} threads"
    params = sum(p.numel() for m in family(cfg.task).task(cfg).modules.values() for p in m.parameters())
    print(f"\ncase {args.case} on {name}: task {cfg.task}, {params / 1e6:.2f} M params, batch {cfg.data.batch_size}, "
          f"{cfg.data.resolution}x{cfg.data.resolution}, precision {cfg.train.mixed_precision}, "
          f"{case['steps']} timed steps after {case['warmup']} x {args.repeats} repeats, torch {torch.__version__}")
    medians = {k: statistics.median(r["images_per_s"] for r in v) for k, v in results.items()}
    print(f"{'loop':14s} {'images/s (median)':>18s} {'min-max':>17s}  {'vs plain':>8s}  other")
    for k, v in results.items():
        ips = [r["images_per_s"] for r in v]
        other = {m: round(statistics.median(r[m] for r in v), 4) for m in v[-1] if m != "images_per_s"}
        ratio = f"{medians[k] / medians['plain']:8.3f}" if "plain" in medians else f"{'-':>8s}"
        print(f"{k:14s} {medians[k]:18.1f} {min(ips):8.1f}-{max(ips):<8.1f}  {ratio}  {other}")
    if {"diffusers", "gen_dist"} <= set(medians):
        print(f"gen_dist / diffusers recipe: {medians['gen_dist'] / medians['diffusers']:.3f}")


if __name__ == "__main__":
    main()
