"""Cost of the metric sinks per log record: train.log alone, + metrics.jsonl, + TensorBoard, measured on the
Tracker the training loop uses, with a record of the demo's size (its keys, 30 values).

    python benchmarks/tracking_cost.py [--records 2000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from gen_dist.config import load_config
from gen_dist.track import Tracker

KEYS = ["denoise/grad_norm", "denoise/loss", "denoise/mse", "nonfinite_skips", "images_per_s", "data_wait_frac",
        "time/data_ms", "time/fwd_bwd_ms", "time/optimizer_ms", "time/collectives_ms", "time/ema_ms", "lr/denoiser",
        "data/bad_samples", "memory/peak_rss_gib", "perf/tflops_per_device", "epoch", "images_seen",
        *(f"extra/{i}" for i in range(13))]


def per_record(backends: list[str], records: int) -> float:
    """Seconds per Tracker.log call, TensorBoard's writer flushing in its own thread as in training."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, [f"track.backends={backends}", f"run_dir={tmp}"])
        tracker = Tracker(None, cfg, Path(tmp))
        tracker.begin(0, resumed=False)
        rng = np.random.default_rng(0)
        rows = [dict(zip(KEYS, map(float, rng.random(len(KEYS))), strict=True)) for _ in range(records)]
        t0 = time.perf_counter()
        for step, row in enumerate(rows, 1):
            tracker.log(step, row)
        elapsed = time.perf_counter() - t0
        tracker.close("ended")
    return elapsed / records


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--records", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    print(f"{'sinks':<28} {'us per record (median, min-max)':>34}")
    for backends in ([], ["jsonl"], ["jsonl", "tensorboard"]):
        times = [per_record(backends, args.records) * 1e6 for _ in range(args.repeats)]
        name = "+".join(["train.log", *backends])
        print(f"{name:<28} {statistics.median(times):>16.1f} ({min(times):.1f}-{max(times):.1f})")


if __name__ == "__main__":
    main()
