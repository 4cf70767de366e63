# Environment set-up for slurm/train.sbatch: `gen-dist slurm submit CONFIG ... --setup slurm/setup_env.sh`.
# Sourced by the batch shell on the head node. The job then runs in the venv that `make setup` builds from
# constraints.txt (the versions CI tested), made or brought up to date under a lock, so that jobs sharing the
# checkout never build it at the same time. The venv must be on a file system every node of the job sees.
#
#   GEN_DIST_VENV   the venv (default: the checkout's .venv)
: "${GEN_DIST_ROOT:?setup_env.sh is sourced by slurm/train.sbatch, which sets GEN_DIST_ROOT}"
GEN_DIST_VENV=${GEN_DIST_VENV:-$GEN_DIST_ROOT/.venv}
flock "$GEN_DIST_ROOT/.setup.lock" make -s -C "$GEN_DIST_ROOT" setup VENV="$GEN_DIST_VENV"
PYTHON=$GEN_DIST_VENV/bin/python
GEN_DIST="$PYTHON -m gen_dist"
echo "gen_dist job: environment $GEN_DIST_VENV ($("$PYTHON" -c 'import torch; print("torch", torch.__version__)'))"
