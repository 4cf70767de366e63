#!/usr/bin/env bash
# A real two-node SLURM cluster on this machine (nodes n1 and n2, both 127.0.0.1), for tests. Needs root; no systemd.
#
#   slurm/local_cluster.sh up       install slurm + munge if missing, start the daemons, print the state dir
#   slurm/local_cluster.sh status   sinfo and squeue
#   slurm/local_cluster.sh down     cancel jobs, stop every daemon it started, remove the state dir
#
# Client commands need the cluster's config: export SLURM_CONF="$GEN_DIST_SLURM_DIR/slurm.conf".
#
# Environment:
#   GEN_DIST_SLURM_DIR    state dir: config, keys, spool, logs, pid files (default /tmp/gen_dist_slurm)
#   GEN_DIST_SLURM_PORT   slurmctld port; the two slurmd use the next two (default 17000)
#   GEN_DIST_SLURM_CPUS   CPUs each node claims, whatever this machine has (default 16)
#   GEN_DIST_SLURM_MEM    memory in MB each node claims (default 1000; nothing enforces it, but sbatch --mem
#                         above it is refused)
#   GEN_DIST_SLURM_GPUS   fake GPUs per node (gres.conf over /dev/null; default 8), so GPU requests are
#                         accepted; jobs get CUDA_VISIBLE_DEVICES but no real device. 0 turns GRES off.
set -euo pipefail

DIR=${GEN_DIST_SLURM_DIR:-/tmp/gen_dist_slurm}
PORT=${GEN_DIST_SLURM_PORT:-17000}
CPUS=${GEN_DIST_SLURM_CPUS:-16}
MEM=${GEN_DIST_SLURM_MEM:-1000}
GPUS=${GEN_DIST_SLURM_GPUS:-8}
export SLURM_CONF=$DIR/slurm.conf
SOCKET=$DIR/munge/munge.socket
# Every daemon started here, and every slurmstepd a slurmd forks, inherits this variable: `down` finds them by it.
TAG="GEN_DIST_SLURM_CLUSTER=$DIR"

die() { echo "local_cluster.sh: $*" >&2; exit 1; }

install_packages() {
    local pkgs=(slurmctld slurmd slurm-client munge)
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sinfo >/dev/null \
        && command -v munged >/dev/null && return
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null \
        || { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null; }
}

# Live pids among "$@", the processes carrying $TAG, and all their descendants (job tasks do not carry it, and
# they outlive their slurmstepd).
cluster_pids() {
    local f line pid ppid rest todo=("$@")
    local -A kids=() live=() seen=()
    for f in /proc/[0-9]*/stat; do
        read -r line 2>/dev/null <"$f" || continue
        pid=${line%% *}
        rest=${line##*) } # the fields after "(comm)", which may hold spaces
        ppid=${rest#* }
        ppid=${ppid%% *}
        [[ ${rest:0:1} == Z || $pid == "$$" ]] && continue
        live[$pid]=1
        kids[$ppid]+=" $pid"
    done
    while read -r f; do
        f=${f#/proc/}
        todo+=("${f%/environ}")
    done < <(grep -lzxF "$TAG" /proc/[0-9]*/environ 2>/dev/null)
    while ((${#todo[@]})); do
        pid=${todo[-1]}
        unset 'todo[-1]'
        [[ -n ${live[$pid]:-} && -z ${seen[$pid]:-} ]] || continue
        seen[$pid]=1
        echo "$pid"
        # shellcheck disable=SC2206 # one pid a word
        todo+=(${kids[$pid]:-})
    done
}

running() {
    local name
    for name in munged slurmctld slurmd-n1 slurmd-n2; do
        [[ -s $DIR/$name.pid ]] && kill -0 "$(cat "$DIR/$name.pid")" 2>/dev/null || return 1
    done
}

write_config() {
    local i gres="" gres_conf=""
    if ((GPUS > 0)); then
        gres="Gres=gpu:$GPUS"
        # Files are what make jobs get CUDA_VISIBLE_DEVICES. slurmd wants one device per GPU, distinct by name
        # (/dev/null repeated is refused) and a character or block device (a plain file is ignored).
        mkdir -p "$DIR/dev"
        for ((i = 0; i < GPUS; i++)); do ln -sfn /dev/null "$DIR/dev/nvidia$i"; done
        gres_conf="Name=gpu File=$DIR/dev/nvidia[0-$((GPUS - 1))]"
    fi
    mkdir -p "$DIR"/{state,log,spool/n1,spool/n2}
    cat >"$DIR/slurm.conf" <<EOF
ClusterName=gendist
SlurmctldHost=localhost
SlurmctldPort=$PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket=$SOCKET,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
# No cgroups: linuxproc tracks job processes by parentage, task/none does no binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# Let the nodes claim more CPUs than the machine has, instead of being drained for it.
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
# Look at pending jobs every second or two, not every minute: a requeued job restarts soon after cred_expire.
SchedulerParameters=sched_interval=2,bf_interval=1
ReturnToService=2
JobRequeue=1
MinJobAge=5
KillWait=2
InactiveLimit=0
MailProg=/bin/true
${gres:+GresTypes=gpu}
NodeName=n[1-2] NodeAddr=127.0.0.1 Port=[$((PORT + 1))-$((PORT + 2))] CPUs=$CPUS RealMemory=$MEM $gres State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP
EOF
    echo "$gres_conf" >"$DIR/gres.conf"
}

start_munge() {
    install -d -o munge -g munge -m 0755 "$DIR/munge"
    dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    chown munge:munge "$DIR/munge/munge.key"
    chmod 0400 "$DIR/munge/munge.key"
    env "$TAG" runuser -u munge -- munged --key-file "$DIR/munge/munge.key" --socket "$SOCKET" \
        --pid-file "$DIR/munge/munged.pid" --log-file "$DIR/munge/munged.log" --seed-file "$DIR/munge/munged.seed"
    cp "$DIR/munge/munged.pid" "$DIR/munged.pid"
    munge -n -S "$SOCKET" | unmunge -S "$SOCKET" >/dev/null || die "munge does not work; see $DIR/munge/munged.log"
}

wait_idle() {
    local i
    for ((i = 0; i < 300; i++)); do
        # sinfo retries for minutes when slurmctld is gone, so bound it and check the daemons are alive.
        [[ $(timeout 5 sinfo -h -N -p debug -o '%N %t' 2>/dev/null | sort) == $'n1 idle\nn2 idle' ]] && return
        running || break
        sleep 0.2
    done
    sinfo -N -l >&2 || true
    tail -n 20 "$DIR"/log/*.log "$DIR/munge/munged.log" >&2 || true
    die "nodes not idle after 60 s"
}

up() {
    install_packages
    # Already up (its nodes may be busy with jobs, so not necessarily idle).
    if running && sinfo -h >/dev/null 2>&1; then
        echo "$DIR"
        return
    fi
    down >/dev/null # whatever is left of an earlier, broken start
    write_config
    start_munge
    env "$TAG" slurmctld -c -f "$SLURM_CONF" || die "slurmctld failed; see $DIR/log/slurmctld.log"
    env "$TAG" slurmd -N n1 -f "$SLURM_CONF" || die "slurmd n1 failed; see $DIR/log/slurmd-n1.log"
    env "$TAG" slurmd -N n2 -f "$SLURM_CONF" || die "slurmd n2 failed; see $DIR/log/slurmd-n2.log"
    wait_idle
    echo "$DIR"
}

down() {
    local i pids=""
    if [[ -f $SLURM_CONF ]] && running; then
        scancel --partition=debug 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do
            [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break
            sleep 0.2
        done
    fi
    # Nothing here needs a graceful stop (the state goes too), and srun ignores SIGTERM.
    for ((i = 0; i < 50; i++)); do
        # shellcheck disable=SC2086 # one pid a word
        pids=$(cluster_pids $pids)
        [[ -z $pids ]] && break
        # shellcheck disable=SC2086
        kill -KILL $pids 2>/dev/null || true
        sleep 0.1
    done
    rm -rf "$DIR"
}

status() {
    [[ -f $SLURM_CONF ]] || die "no cluster in $DIR"
    sinfo -N -l
    squeue
}

case "${1:-}" in
up | down | status) "$1" ;;
*) die "usage: local_cluster.sh up|down|status" ;;
esac
