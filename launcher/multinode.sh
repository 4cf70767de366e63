#!/usr/bin/env bash
# Start this machine's share of a multi-node gen-dist run. Run it once on every node with the same CONFIG.
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 launcher/multinode.sh configs/x.yaml [key=value ...]
#
# Environment:
#   NNODES        number of machines (required)
#   NODE_RANK     this machine's rank, 0..NNODES-1 (required; 0 hosts the rendezvous)
#   MASTER_ADDR   address of node rank 0 as the other nodes reach it (required)
#   MASTER_PORT   rendezvous port (default 29500)
#   NPROC         processes on this machine (default: one per GPU, else 1)
#   LAUNCHER      accelerate (default; static rendezvous) or torchrun (c10d rendezvous, elastic agent)
#   NODE_ADDR     this machine's own address (torchrun only; default: the first of `hostname -I`)
#   GEN_DIST      the gen-dist command (default: gen-dist)
#   PYTHON        the interpreter gen_dist is installed in (torchrun only; default: python3)
# Set GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME to the interface facing the other nodes when the hostname of a
# node resolves to a loopback address.
set -euo pipefail

CONFIG=${1:?usage: multinode.sh CONFIG [key=value ...]}
shift
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"
MASTER_PORT=${MASTER_PORT:-29500}
LAUNCHER=${LAUNCHER:-accelerate}
GEN_DIST=${GEN_DIST:-gen-dist}
PYTHON=${PYTHON:-python3}
if [[ -z "${NPROC:-}" ]]; then
    NPROC=$($PYTHON -c "import torch; print(max(1, torch.cuda.device_count()))" 2>/dev/null || echo 1)
fi

# SIGUSR1 asks the ranks to checkpoint and stop. The launcher and its agent inherit "ignore" through exec (the
# ranks install their own handler), so they outlive the signal instead of killing the ranks mid-checkpoint.
trap '' USR1

case "$LAUNCHER" in
accelerate)
    exec $GEN_DIST launch "$CONFIG" "$@" --nproc "$NPROC" --num-machines "$NNODES" \
        --machine-rank "$NODE_RANK" --main-ip "$MASTER_ADDR" --port "$MASTER_PORT"
    ;;
torchrun)
    NODE_ADDR=${NODE_ADDR:-$(hostname -I | awk '{print $1}')}
    IS_HOST=$([[ "$NODE_RANK" == 0 ]] && echo 1 || echo 0)
    # `gen-dist train` joins the group torchrun makes; `gen-dist launch --dry-run` validates first.
    $GEN_DIST launch "$CONFIG" "$@" --nproc "$NPROC" --num-machines "$NNODES" --dry-run > /dev/null
    exec $PYTHON -m torch.distributed.run --nnodes "$NNODES" --nproc-per-node "$NPROC" \
        --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "${RDZV_ID:-gen_dist}" \
        --rdzv-conf "is_host=$IS_HOST" --local-addr "$NODE_ADDR" -m gen_dist train "$CONFIG" "$@"
    ;;
*)
    echo "multinode.sh: LAUNCHER must be accelerate or torchrun, got '$LAUNCHER'" >&2
    exit 2
    ;;
esac
