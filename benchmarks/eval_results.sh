#!/usr/bin/env bash
# The results table of the README: train the domain classifier and each family's Fashion-MNIST config on 2 CPU
# processes, then score every family against the test split with both extractors, and print the table rows.
#   benchmarks/eval_results.sh [RUNS_DIR]      (N=1000 samples, REF=2000 test images by default)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs/results}
N=${N:-1000}
REF=${REF:-2000}
GD=${GD:-.venv/bin/gen-dist}
export WANDB_MODE=${WANDB_MODE:-offline} WANDB_SILENT=true
for name in classifier diffusion gan vae; do
    start=$(date +%s)
    $GD launch "configs/${name}_fashion_mnist.yaml" --nproc 2 --cpu "run_dir=$RUNS/$name" train.progress=false
    echo "$name: trained in $(( $(date +%s) - start )) s"
done
.venv/bin/python - "$RUNS" <<'PY'
import sys
from pathlib import Path

import numpy as np
import torch

from gen_dist.data import Fields, Piece, decode_image, load_index, read_pieces
from gen_dist.tasks.classifier import DomainClassifier

root = Path("data/fashion_mnist")
test = load_index(root)["splits"]["test"]
pieces = [Piece(str(root / s["file"]), 0, s["count"]) for s in test["shards"]]
raw = list(read_pieces(pieces))
images = torch.from_numpy(np.stack([decode_image(s, Fields(1, 28)) for s in raw]))
labels = torch.tensor([int(s["cls"]) for s in raw])
net = DomainClassifier(Path(sys.argv[1]) / "classifier", torch.device("cpu"))
with torch.no_grad():
    pred = torch.cat([net(images[i : i + 1000])[1].argmax(1) for i in range(0, len(images), 1000)])
print(f"classifier: test accuracy {(pred == labels).float().mean().item():.4f} on {len(labels)} images")
PY
for name in diffusion gan vae; do
    $GD eval "$RUNS/$name" --nproc 2 --cpu --n "$N" --reference-n "$REF" --metrics fid,kid,is,pr \
        --extractors "inception,$RUNS/classifier"
done
