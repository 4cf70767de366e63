"""Train a config for a few steps through `gen-dist launch` and print throughput and data-wait numbers.

    python benchmarks/throughput.py configs/diffusion_fashion_mnist.yaml --nproc 2 --steps 100
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--skip", type=int, default=1, help="logged windows to ignore as warm-up")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "gen_dist", "launch", args.config, f"run_dir={run_dir}",
               f"train.steps={args.steps}", f"train.log_every={max(1, args.steps // 10)}", "train.sample_every=0",
               f"train.ckpt_every={args.steps}", "track.backends=[jsonl]", "train.progress=false",
               *args.overrides, "--nproc", str(args.nproc)]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in recs if "images_per_s" in r][args.skip :]
        ckpt = [r["seconds"] for r in recs if r.get("event") == "checkpoint"]
    print(f"config {args.config} nproc {args.nproc} steps {args.steps} overrides {args.overrides}")
    print(f"images/s            {statistics.median(r['images_per_s'] for r in steps):.1f} (median of windows)")
    print(f"data wait fraction  {statistics.median(r['data_wait_frac'] for r in steps):.4f}")
    print(f"checkpoint write s  {ckpt[-1]:.3f}" if ckpt else "checkpoint write s  -")
    print(f"wall time s         {wall:.1f} (launch, start-up, training, final samples)")


if __name__ == "__main__":
    main()
