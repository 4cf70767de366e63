#!/bin/bash
# Start a gen_dist run on every node of this SLURM allocation: one srun task per node, each running
# launcher/multinode.sh (torchrun, c10d rendezvous at the first node). Called from the batch shell of
# slurm/train.sbatch, and by the sweep workers of slurm/sweep.sbatch for each trial.
#
#   slurm/ranks.sh CONFIG [key=value ...]
#
# Environment: NPROC, PYTHON, GEN_DIST and GEN_DIST_ROOT (set by the job script); RDZV_ID (default: from the job
# id and its restart count); MASTER_PORT (default: a free port on the head node).
set -euo pipefail

head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
# The address slurm reaches the node by; a node's own hostname may resolve to a loopback address.
node_addr() { scontrol show node "$1" | tr ' ' '\n' | sed -n 's/^NodeAddr=//p'; }
MASTER_ADDR=$(node_addr "$head_node")
# This runs on the head node, so it can ask that node for a free port; a port derived from the job id can be
# taken by another job or service there.
free_port() { "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'; }
MASTER_PORT=${MASTER_PORT:-$(free_port)}
export MASTER_ADDR MASTER_PORT NNODES=$SLURM_JOB_NUM_NODES NPROC LAUNCHER=torchrun PYTHON GEN_DIST
export RDZV_ID=${RDZV_ID:-gen_dist_${SLURM_JOB_ID}_${SLURM_RESTART_COUNT:-0}}
echo "gen_dist job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $NNODES node(s) x $NPROC process(es)," \
     "rendezvous $MASTER_ADDR:$MASTER_PORT"

# The stop signal (--signal, scancel --signal) may reach this shell too: it must keep waiting while the ranks
# agree to stop, write one checkpoint and exit.
trap 'true' USR1 TERM
# $SLURM_NODEID and the node address are expanded inside each task, on its own node.
srun --kill-on-bad-exit=1 --ntasks-per-node=1 bash -c '
    export NODE_RANK=$SLURM_NODEID
    NODE_ADDR=$(scontrol show node "$SLURMD_NODENAME" | tr " " "\n" | sed -n "s/^NodeAddr=//p")
    export NODE_ADDR
    exec "$0" "$@"' "$GEN_DIST_ROOT/launcher/multinode.sh" "$@" &
srun_pid=$!
status=0
while true; do
    wait "$srun_pid" && status=0 || status=$?
    # `wait` also returns when a trapped signal arrives; only a finished srun ends the loop.
    kill -0 "$srun_pid" 2>/dev/null || break
done
exit "$status"
