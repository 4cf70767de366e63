"""Compile time and step time of the DiT: regional compilation (each block's forward, as train.compile does for
a model with repeated blocks) against compiling the whole model, at two depths, with activation checkpointing off
and on. Each case runs in a fresh process with inductor's caches off, so no compiled code is reused between cases.

    python benchmarks/dit_compile.py [--depths 2 8] [--width 128] [--tokens-side 7] [--batch 32] [--steps 5]

On a GPU it runs in bf16 and prints peak memory and MFU (model FLOPs counted in eager against the device's
bf16 peak); on CPU in fp32 with inductor's C++ backend.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def case(depth: int, width: int, side: int, batch: int, steps: int, mode: str, checkpointing: bool) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from gen_dist.config import load_config
    from gen_dist.parallel import compile_block_forwards
    from gen_dist.perf import peak_tflops
    from gen_dist.tasks.backbones import build_dit

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    heads = max(1, width // 64)
    cfg = load_config(None, ["diffusion.backbone=dit", f"diffusion.dit_depth={depth}", f"diffusion.dit_heads={heads}",
                             f"diffusion.dit_head_dim={width // heads}", "diffusion.patch_size=2",
                             f"data.resolution={2 * side}", "data.channels=3", "diffusion.num_classes=10"])
    net = build_dit(cfg, 3, 2 * side).to(device)
    x = torch.randn(batch, 3, 2 * side, 2 * side, device=device)
    t, labels = torch.rand(batch, device=device) * 1000, torch.randint(0, 10, (batch,), device=device)
    with FlopCounterMode(display=False) as counter:  # eager, before any switch: the model's own FLOPs
        net(x, t, class_labels=labels).sample.float().square().mean().backward()
    net.zero_grad(set_to_none=True)
    flops_per_image = counter.get_total_flops() / batch
    if checkpointing:
        net.enable_gradient_checkpointing()
    if mode == "regional":  # as train.compile does it
        compile_block_forwards(net)
    elif mode == "whole":
        net.compile()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = net(x, t, class_labels=labels).sample.float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def timed(n: int) -> float:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    first = timed(1)
    timed(1)
    per_step = timed(steps) / steps
    out = {"depth": depth, "width": width, "tokens": side * side, "mode": mode, "checkpointing": checkpointing,
           "first_step_s": round(first, 2), "images_per_s": round(batch / per_step, 1),
           "params_m": round(sum(p.numel() for p in net.parameters()) / 1e6, 2)}
    if cuda:
        out["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        cfg.train.mixed_precision = "bf16"
        peak, _ = peak_tflops(cfg, device)
        if peak:
            out["mfu"] = round(flops_per_image * batch / per_step / (peak * 1e12), 3)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--depths", type=int, nargs="+", default=[2, 8])
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--tokens-side", type=int, default=7, help="tokens per side (the image is twice as wide)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--modes", nargs="+", default=["eager", "regional", "whole"])
    p.add_argument("--checkpointing", nargs="+", type=int, default=[0])
    p.add_argument("--case", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        print(json.dumps(case(**json.loads(args.case))))
        return
    print(f"{'depth':>5} {'mode':>8} {'ckpt':>4} {'params M':>8} {'first step s':>12} {'images/s':>9} {'peak GiB':>8} "
          f"{'MFU':>6}")
    for depth in args.depths:
        for mode in args.modes:
            for ckpt in args.checkpointing:
                spec = {"depth": depth, "width": args.width, "side": args.tokens_side, "batch": args.batch,
                        "steps": args.steps, "mode": mode, "checkpointing": bool(ckpt)}
                # Inductor's on-disk caches would hand one case the kernels another compiled.
                env = {**os.environ, "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"}
                proc = subprocess.run([sys.executable, __file__, "--case", json.dumps(spec)], capture_output=True,
                                      text=True, check=True, env=env)
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                print(f"{depth:>5} {mode:>8} {int(ckpt):>4} {r['params_m']:>8} {r['first_step_s']:>12} "
                      f"{r['images_per_s']:>9} {r.get('peak_gib', '-'):>8} {r.get('mfu', '-'):>6}", flush=True)


if __name__ == "__main__":
    main()
