#!/usr/bin/env bash
# The autoencoder and latent-diffusion rows of docs/results.md: train the KL autoencoder, the VQ-VAE and
# latent diffusion on the KL autoencoder's latents (each timed, 2 CPU processes), score reconstructions and
# samples as eval_results.sh scores the other families, and print the VQ-VAE's codebook usage on the test split.
#   benchmarks/latent_results.sh [RUNS_DIR] [CLASSIFIER_RUN]   (N=1000 samples, REF=2000 test images)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs/results}
CLASSIFIER=${2:-$RUNS/classifier}
N=${N:-1000}
REF=${REF:-2000}
GD=${GD:-.venv/bin/gen-dist}
export WANDB_MODE=${WANDB_MODE:-offline} WANDB_SILENT=true
for name in autoencoder vqvae latent_diffusion; do
    extra=()
    [[ $name == latent_diffusion ]] && extra=("diffusion.first_stage=$RUNS/autoencoder")
    start=$(date +%s)
    $GD launch "configs/${name}_fashion_mnist.yaml" --nproc 2 --cpu "run_dir=$RUNS/$name" train.progress=false \
        "${extra[@]}"
    echo "$name: trained in $(( $(date +%s) - start )) s"
done
for name in autoencoder vqvae latent_diffusion; do
    $GD eval "$RUNS/$name" --nproc 2 --cpu --n "$N" --reference-n "$REF" --metrics fid,kid,is,pr \
        --extractors "inception,$CLASSIFIER"
done
.venv/bin/python - "$RUNS/vqvae" <<'PY'
import sys
from pathlib import Path

import numpy as np
import torch

from gen_dist.data import Fields, Piece, decode_image, load_index, read_pieces
from gen_dist.images import to_model_range
from gen_dist.artifact import load_model

_, task, net = load_model(Path(sys.argv[1]), use_ema=True, device=torch.device("cpu"))
root = Path("data/fashion_mnist")
test = load_index(root)["splits"]["test"]
raw = read_pieces([Piece(str(root / s["file"]), 0, s["count"]) for s in test["shards"]])
images = torch.from_numpy(np.stack([decode_image(s, Fields(1, 28)) for s in raw]))
counts = torch.zeros(task.cfg.codebook_size)
with torch.no_grad():
    for chunk in images.split(500):
        h = net.encode(to_model_range(chunk)).permute(0, 2, 3, 1).flatten(0, 2)
        counts += torch.bincount(net.quantize.codes(h), minlength=len(counts)).float()
p = counts / counts.sum()
perplexity = torch.exp(-(p[p > 0] * p[p > 0].log()).sum()).item()
print(f"vqvae: {int((counts > 0).sum())} of {len(counts)} codes used on the {len(images)} test images "
      f"({(counts > 0).float().mean().item():.1%}), perplexity {perplexity:.1f}")
PY
