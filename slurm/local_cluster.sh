#!/usr/bin/env bash
# A real two-node SLURM cluster on this machine (nodes n1 and n2, both 127.0.0.1), for tests. Needs root; no systemd.
#
#   slurm/local_cluster.sh up       install slurm + munge if missing, start the daemons, print the state dir
#   slurm/local_cluster.sh status   sinfo and squeue
#   slurm/local_cluster.sh down     cancel jobs, stop every process of the cluster, free its ports, remove the
#                                   state dir; fails, naming what is left, if it cannot
#
# Client commands need the cluster's config: export SLURM_CONF="$GEN_DIST_SLURM_DIR/slurm.conf".
# Clusters with different state dirs can run side by side: each gets its own ports, and its processes are told
# apart by the state dir.
#
# Environment:
#   GEN_DIST_SLURM_DIR    state dir: config, keys, spool, logs, pid files (default /tmp/gen_dist_slurm)
#   GEN_DIST_SLURM_PORT   slurmctld port, the two slurmd on the next two (default: the first three free ports
#                         from 17000 on that no other cluster holds)
#   GEN_DIST_SLURM_CPUS   CPUs each node claims, whatever this machine has (default 16)
#   GEN_DIST_SLURM_MEM    memory in MB each node claims (default 1000; nothing enforces it, but sbatch --mem
#                         above it is refused)
#   GEN_DIST_SLURM_GPUS   fake GPUs per node (gres.conf over /dev/null; default 8), so GPU requests are
#                         accepted; jobs get CUDA_VISIBLE_DEVICES but no real device. 0 turns GRES off.
set -euo pipefail

DIR=${GEN_DIST_SLURM_DIR:-/tmp/gen_dist_slurm}
DIR=$(realpath -m "$DIR")
CPUS=${GEN_DIST_SLURM_CPUS:-16}
MEM=${GEN_DIST_SLURM_MEM:-1000}
GPUS=${GEN_DIST_SLURM_GPUS:-8}
export SLURM_CONF=$DIR/slurm.conf
SOCKET=$DIR/munge/munge.socket
# Every daemon started here, every slurmstepd a slurmd forks and (through the task prolog) every job task
# carries this variable: `down` finds the cluster's processes by it.
TAG="GEN_DIST_SLURM_CLUSTER=$DIR"
# Port claims of all clusters on this machine: CLAIMS/<first port> holds the state dir of its cluster.
CLAIMS=/tmp/gen_dist_slurm_ports
PORTS=3

die() { echo "local_cluster.sh: $*" >&2; exit 1; }

installed() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sinfo >/dev/null \
        && command -v munged >/dev/null
}

install_packages() {
    local pkgs=(slurmctld slurmd slurm-client munge)
    installed && return
    # Clusters brought up side by side (parallel test workers) install one at a time, and apt waits for a dpkg
    # lock held by anything else instead of failing at once.
    exec 8>/tmp/gen_dist_slurm_install.lock
    flock -w 900 8 || die "waited 15 min for another cluster's package install"
    installed && { exec 8>&-; return; }
    export DEBIAN_FRONTEND=noninteractive
    local apt=(apt-get -o DPkg::Lock::Timeout=600)
    "${apt[@]}" install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null \
        || { "${apt[@]}" update -qq && "${apt[@]}" install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null; }
    exec 8>&-
}

# Live (not zombie) pids among "${@:2}", the processes carrying the tag $1, and all their descendants (tasks that
# lost their slurmstepd are found by the tag their prolog gave them).
cluster_pids() {
    local tag=$1 f line pid ppid rest todo=()
    shift
    todo=("$@")
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
    done < <(grep -lzxF "$tag" /proc/[0-9]*/environ 2>/dev/null || true)
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

# Sockets on ports $1..$1+PORTS-1 that keep a daemon from binding there: listening ones and any a live process
# holds. (A dead process's closing connections do not: the daemons bind with SO_REUSEADDR.)
port_users() {
    ss -Htanp "sport >= :$1 and sport <= :$(($1 + PORTS - 1))" 2>/dev/null | grep -E '^LISTEN|users:' || true
}

alive() { # pid: running, not a zombie (nothing reaps orphans on some machines)
    local state
    state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
    [[ -n $state && $state != Z ]]
}

DAEMONS=(munged slurmctld slurmd-n1 slurmd-n2) # names of their pid files in the state dir

running() {
    local name
    for name in "${DAEMONS[@]}"; do
        [[ -s $DIR/$name.pid ]] && alive "$(cat "$DIR/$name.pid")" || return 1
    done
}

# Claim PORTS consecutive free ports for this cluster (GEN_DIST_SLURM_PORT, or the first free ones); prints the
# first. A claim whose cluster has no state dir and no process left is stale and taken over.
claim_ports() {
    local base owner first=${GEN_DIST_SLURM_PORT:-17000} last=${GEN_DIST_SLURM_PORT:-29990}
    mkdir -p "$CLAIMS"
    exec 9>"$CLAIMS/.lock"
    flock 9
    for ((base = first; base <= last; base += 10)); do
        if [[ -f $CLAIMS/$base ]]; then
            owner=$(cat "$CLAIMS/$base")
            [[ $owner == "$DIR" ]] && { echo "$base"; exec 9>&-; return; }
            if [[ -d $owner || -n $(cluster_pids "GEN_DIST_SLURM_CLUSTER=$owner") ]]; then
                [[ -n ${GEN_DIST_SLURM_PORT:-} ]] && die "port $base is held by the cluster in $owner"
                continue
            fi
        fi
        if [[ -n $(port_users "$base") ]]; then
            [[ -n ${GEN_DIST_SLURM_PORT:-} ]] && die "ports $base-$((base + PORTS - 1)) are in use: $(port_users "$base")"
            continue
        fi
        echo "$DIR" >"$CLAIMS/$base"
        echo "$base"
        exec 9>&-
        return
    done
    die "no free ports for the cluster between $first and $last"
}

# The first ports of the claims this cluster holds, one a line.
owned_ports() {
    local f
    for f in "$CLAIMS"/[0-9]*; do
        [[ -f $f && $(cat "$f") == "$DIR" ]] && echo "${f##*/}"
    done
    return 0
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
    # Job tasks get the cluster's tag too: a task whose slurmstepd is gone is still found by `down`.
    printf '#!/bin/sh\necho "export %s"\n' "$TAG" >"$DIR/task_prolog.sh"
    chmod 0755 "$DIR/task_prolog.sh"
    cat >"$DIR/slurm.conf" <<CONF
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
TaskProlog=$DIR/task_prolog.sh
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
CONF
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

# True when a daemon wrote its pid file and is gone since: it will not come back.
daemon_died() {
    local name
    for name in "${DAEMONS[@]}"; do
        [[ -s $DIR/$name.pid ]] && ! alive "$(cat "$DIR/$name.pid")" && return 0
    done
    return 1
}

wait_idle() {
    local i
    for ((i = 0; i < 600; i++)); do
        # sinfo retries for minutes when slurmctld is gone, so bound it and check the daemons are alive.
        [[ $(timeout 5 sinfo -h -N -p debug -o '%N %t' 2>/dev/null | sort) == $'n1 idle\nn2 idle' ]] && return
        daemon_died && break
        sleep 0.2
    done
    sinfo -N -l >&2 || true
    tail -n 20 "$DIR"/log/*.log "$DIR/munge/munged.log" >&2 || true
    die "nodes of the cluster in $DIR not idle"
}

up() {
    install_packages
    # Already up (its nodes may be busy with jobs, so not necessarily idle).
    if running && timeout 10 sinfo -h >/dev/null 2>&1; then
        echo "$DIR"
        return
    fi
    down >/dev/null # whatever is left of an earlier, broken start
    # A failed start leaves nothing running and no port held.
    trap 'echo "local_cluster.sh: up failed; stopping what it started" >&2; down >/dev/null || true' EXIT
    mkdir -p "$DIR" # before the claim: a claim whose state dir is missing is taken for stale
    PORT=$(claim_ports)
    write_config
    start_munge
    env "$TAG" slurmctld -c -f "$SLURM_CONF" || die "slurmctld failed; see $DIR/log/slurmctld.log"
    env "$TAG" slurmd -N n1 -f "$SLURM_CONF" || die "slurmd n1 failed; see $DIR/log/slurmd-n1.log"
    env "$TAG" slurmd -N n2 -f "$SLURM_CONF" || die "slurmd n2 failed; see $DIR/log/slurmd-n2.log"
    wait_idle
    trap - EXIT
    echo "$DIR"
}

# Returns once no process of the cluster is alive and none of its ports is in use, having released them and
# removed the state dir; fails (keeping both) naming what is left when that does not happen within 30 s.
down() {
    local i f pids="" busy="" ports
    mapfile -t ports < <(owned_ports)
    if [[ -f $SLURM_CONF ]] && running; then
        timeout 10 scancel --partition=debug 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do
            [[ -z $(timeout 5 squeue -h -o %i 2>/dev/null) ]] && break
            sleep 0.2
        done
    fi
    # Nothing here needs a graceful stop (the state goes too), and srun ignores SIGTERM.
    for ((i = 0; i < 300; i++)); do
        # shellcheck disable=SC2086 # one pid a word
        pids=$(cluster_pids "$TAG" $pids)
        busy=""
        for f in "${ports[@]}"; do busy+=$(port_users "$f"); done
        [[ -z $pids && -z $busy ]] && break
        # shellcheck disable=SC2086
        [[ -z $pids ]] || kill -KILL $pids 2>/dev/null || true
        sleep 0.1
    done
    if [[ -n $pids || -n $busy ]]; then
        die "the cluster in $DIR did not stop within 30 s; still alive: ${pids//$'\n'/ }; ports in use: ${busy:-none}"
    fi
    for f in "${ports[@]}"; do rm -f "$CLAIMS/$f"; done
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
