#!/usr/bin/env bash
# The fine-tuning demo's table: the LoRA of `make demo-finetune` against a full fine-tune at the same budget (the
# same config, steps and batch; diffusion.lora_rank=0 at a tenth of the LR), each trained on 2 CPU processes and
# timed, exported, and scored with the base by benchmarks/finetune_demo.py on samples diffusers draws.
#   make demo-finetune && benchmarks/finetune_demo.sh [N_PER_CLASS]
set -euo pipefail
cd "$(dirname "$0")/.."
FT=runs/finetune_demo
GD=${GD:-.venv/bin/gen-dist}
export WANDB_MODE=${WANDB_MODE:-offline} WANDB_SILENT=true
start=$(date +%s)
$GD launch configs/finetune_demo_lora.yaml --nproc 2 --cpu run_dir=$FT/full diffusion.lora_rank=0 \
    diffusion.lora_alpha=0 optim.lr=1.0e-4 train.progress=false
echo "full fine-tune: trained in $(( $(date +%s) - start )) s"
$GD export $FT/full --format diffusers --out $FT/full_export
.venv/bin/python benchmarks/finetune_demo.py --base models/sd_fashion_base --classifier $FT/classifier \
    --lora $FT/lora_export --full $FT/full_export --n "${1:-100}" --out $FT/scores_all.json \
    --grid docs/results/finetune.png
