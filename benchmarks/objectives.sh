#!/usr/bin/env bash
# The objective x backbone table of docs/results.md: the demo's UNet with DDPM (v-prediction, Min-SNR), flow matching
# and EDM, and the DiT with flow matching, each trained on 2 CPU processes for the demo's budget (2,000 steps x
# 64), then scored as the results table is (1,000 samples against 2,000 test images, Inception and the domain
# classifier). A run directory that already holds a finished run is only scored.
#   benchmarks/objectives.sh [RUNS_DIR] [CLASSIFIER_RUN]
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs/objectives}
CLASSIFIER=${2:-runs/results/classifier}
GD=${GD:-.venv/bin/gen-dist}
export WANDB_MODE=${WANDB_MODE:-offline} WANDB_SILENT=true
declare -A CONFIG=([unet_ddpm]=diffusion [unet_flow]=diffusion_flow [unet_edm]=diffusion_flow [dit_flow]=diffusion_dit)
declare -A EXTRA=([unet_ddpm]="" [unet_flow]="" [unet_edm]="diffusion.objective=edm" [dit_flow]="")
for name in unet_ddpm unet_flow unet_edm dit_flow; do
    if [ ! -f "$RUNS/$name/samples/step_00002000.png" ]; then
        start=$(date +%s)
        # shellcheck disable=SC2086
        $GD launch "configs/${CONFIG[$name]}_fashion_mnist.yaml" --nproc 2 --cpu "run_dir=$RUNS/$name" \
            train.progress=false ${EXTRA[$name]}
        echo "$name: trained in $(( $(date +%s) - start )) s"
    fi
    $GD eval "$RUNS/$name" --nproc 2 --cpu --n 1000 --reference-n 2000 --metrics fid,kid,is,pr \
        --extractors "inception,$CLASSIFIER"
done
