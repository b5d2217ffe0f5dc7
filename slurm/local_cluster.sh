#!/usr/bin/env bash
# A real single-node Slurm on this machine, for trying the sbatch files and for CI.
#
# Usage (as root; Debian/Ubuntu):
#   slurm/local_cluster.sh up       # install slurmctld slurmd slurm-client munge if missing, start them
#   eval "$(slurm/local_cluster.sh env)"   # point sbatch/squeue/scontrol at this cluster
#   sbatch --gres=none slurm/train.sbatch  # or FAKE_GPUS=1 at `up` and keep --gres=gpu:1
#   slurm/local_cluster.sh status   # daemons, node state, queue
#   slurm/local_cluster.sh down     # cancel jobs, stop the daemons this script started
#
# Everything lives in $SLURM_LOCAL_STATE: the rendered slurm.conf (from slurm/slurm.conf.in),
# a munge key and socket, pid files, logs, spool. The default is /tmp/hn-slurm-<hash of this
# checkout's path>, one per checkout, mode 0755: munged runs as user munge and must traverse
# every parent of its socket, which a checkout inside a 0700 directory (a private home,
# `mktemp -d`) does not allow. `up` refuses a state dir that is a symlink or not its own.
# `down` stops only the processes whose pid files are there; nothing is killed by name,
# and no system service or /etc file is touched (clients find the cluster via SLURM_CONF).
#
# Settings (env): SLURM_LOCAL_STATE, SLURM_CTLD_PORT (16817), SLURM_SLURMD_PORT (16818),
# SLURM_PARTITION (debug), DEF_MEM_PER_CPU MB (2048), KILL_WAIT s (30), CRED_EXPIRE s (10;
# also how long a requeued job waits before it may start again), MIN_JOB_AGE s (300: how
# long `scontrol show job` still shows a finished job's state and exit code), FAKE_GPUS (0: the
# node has N gres gpus backed by dummy char devices, so `--gres=gpu:N` jobs are accepted;
# no CUDA exists behind them), OVERSUBSCRIBE (NO; FORCE:N lets N jobs share a core),
# UP_TIMEOUT s (60).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# pwd -P: the same checkout reached through a symlink gets the same state dir.
CHECKOUT_ID="$(cd "$HERE/.." && pwd -P | sha1sum | cut -c1-12)"
STATE="${SLURM_LOCAL_STATE:-/tmp/hn-slurm-$CHECKOUT_ID}"
CONF="$STATE/slurm.conf"
CTLD_PORT="${SLURM_CTLD_PORT:-16817}"
SLURMD_PORT="${SLURM_SLURMD_PORT:-16818}"
PARTITION="${SLURM_PARTITION:-debug}"
DEF_MEM_PER_CPU="${DEF_MEM_PER_CPU:-2048}"
KILL_WAIT="${KILL_WAIT:-30}"
CRED_EXPIRE="${CRED_EXPIRE:-10}"
MIN_JOB_AGE="${MIN_JOB_AGE:-300}"
FAKE_GPUS="${FAKE_GPUS:-0}"
OVERSUBSCRIBE="${OVERSUBSCRIBE:-NO}"
UP_TIMEOUT="${UP_TIMEOUT:-60}"
PACKAGES=(slurmctld slurmd slurm-client munge)
DAEMONS=(slurmd slurmctld munged)  # stop order: node, controller, then auth

log() { echo "[local_cluster $(date -u +%H:%M:%S)] $*" >&2; }
die() { log "error: $*"; exit 1; }

pidfile() {
    case "$1" in
        munged) echo "$STATE/munge/munged.pid" ;;
        *) echo "$STATE/$1.pid" ;;
    esac
}

# The pid in a daemon's pid file, if that process is alive.
running_pid() {
    local file pid
    file="$(pidfile "$1")"
    [[ -s "$file" ]] || return 1
    pid="$(tr -dc '0-9' <"$file")"
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

install_packages() {
    local missing=() pkg
    for pkg in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    [[ $EUID -eq 0 ]] || die "need root to install ${missing[*]} (or install them yourself)"
    command -v apt-get >/dev/null || die "no apt-get: install ${missing[*]} with your package manager"
    log "installing ${missing[*]} (apt-get)"
    # Package scripts must not start the system services: we start our own daemons below.
    # A policy-rc.d is only added when none exists, and only for the install.
    local policy=/usr/sbin/policy-rc.d added=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && added=1
    fi
    local rc=0
    { DEBIAN_FRONTEND=noninteractive apt-get update -q \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"; } \
        >"$STATE/apt.log" 2>&1 || rc=$?
    [[ $added -eq 1 ]] && rm -f "$policy"
    [[ $rc -eq 0 ]] || { tail -n 20 "$STATE/apt.log" >&2; die "apt-get failed (log: $STATE/apt.log)"; }
}

render_conf() {
    local node_line nodename gres_types="" node_gres=""
    # slurmd -C reports this machine's real CPU/socket/memory layout; a node line that
    # disagrees with it makes slurmd register the node as invalid.
    node_line="$(slurmd -C | head -n 1)"
    nodename="$(sed -E 's/^NodeName=([^ ]+).*/\1/' <<<"$node_line")"
    if [[ "$FAKE_GPUS" -gt 0 ]]; then
        mkdir -p "$STATE/dev"
        : >"$STATE/gres.conf"
        local i
        for ((i = 0; i < FAKE_GPUS; i++)); do
            # 195 is the nvidia major number; slurmd only stats these files.
            [[ -e "$STATE/dev/nvidia$i" ]] || mknod "$STATE/dev/nvidia$i" c 195 "$i"
        done
        echo "Name=gpu File=$STATE/dev/nvidia[0-$((FAKE_GPUS - 1))]" >"$STATE/gres.conf"
        gres_types="GresTypes=gpu"
        node_gres="Gres=gpu:$FAKE_GPUS"
    else
        rm -f "$STATE/gres.conf"
    fi
    sed -e "s|@STATE@|$STATE|g" -e "s|@NODENAME@|$nodename|g" -e "s|@NODE_LINE@|$node_line|" \
        -e "s|@CTLD_PORT@|$CTLD_PORT|" -e "s|@SLURMD_PORT@|$SLURMD_PORT|" \
        -e "s|@DEF_MEM_PER_CPU@|$DEF_MEM_PER_CPU|" -e "s|@KILL_WAIT@|$KILL_WAIT|" -e "s|@CRED_EXPIRE@|$CRED_EXPIRE|" \
        -e "s|@MIN_JOB_AGE@|$MIN_JOB_AGE|" \
        -e "s|@PARTITION@|$PARTITION|" -e "s|@OVERSUBSCRIBE@|$OVERSUBSCRIBE|" -e "s|@GRES_TYPES@|$gres_types|" -e "s|@NODE_GRES@|$node_gres|" \
        "$HERE/slurm.conf.in" >"$CONF"
}

start_munged() {
    running_pid munged >/dev/null && return 0
    local dir="$STATE/munge"
    mkdir -p "$dir"
    # A key of our own (munged insists it is readable by its user only).
    [[ -s "$dir/munge.key" ]] || mungekey --create --keyfile="$dir/munge.key" >/dev/null
    chown -R munge:munge "$dir"
    chmod 755 "$dir"  # clients need to reach the socket; the key itself is 0600
    chmod 600 "$dir/munge.key"
    runuser -u munge -- munged --socket="$dir/munge.socket.2" --key-file="$dir/munge.key" \
        --pid-file="$dir/munged.pid" --log-file="$dir/munged.log" --seed-file="$dir/munged.seed"
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local timeout="$1" what="$2" t0=$SECONDS
    shift 2
    until "$@" >/dev/null 2>&1; do
        ((SECONDS - t0 < timeout)) || return 1
        sleep 0.5
    done
    log "$what after $((SECONDS - t0)) s"
}

node_ready() {
    local state
    state="$(SLURM_CONF="$CONF" sinfo -h -N -o '%T' 2>/dev/null | head -n 1)"
    [[ "$state" == idle* || "$state" == mixed* || "$state" == allocated* ]]
}

# The state dir, 0755. It holds the config and munge key of daemons that run as root, so in
# a shared place like /tmp one that someone else made (or a symlink) is refused, not used.
make_state_dir() {
    mkdir -p "$(dirname "$STATE")"
    mkdir -m 755 "$STATE" 2>/dev/null || true
    [[ -d "$STATE" && ! -L "$STATE" && -O "$STATE" ]] \
        || die "$STATE is a symlink or not a directory owned by $(id -un); remove it or set SLURM_LOCAL_STATE"
    chmod 755 "$STATE"  # an existing dir too: munged must reach $STATE/munge
}

cmd_up() {
    # First: a state dir made by a non-root attempt would be refused by the root one after it.
    [[ $EUID -eq 0 ]] || die "the daemons run as root (SlurmUser=root); run as root"
    make_state_dir
    install_packages
    if running_pid slurmctld >/dev/null && running_pid slurmd >/dev/null && running_pid munged >/dev/null; then
        log "already up; SLURM_CONF=$CONF"
        return 0
    fi
    render_conf
    mkdir -p "$STATE/ctld" "$STATE/spool"
    start_munged
    wait_for 10 "munged ready" test -S "$STATE/munge/munge.socket.2" || die "munged did not start (see $STATE/munge/munged.log)"
    # -c: start from an empty job state, so jobs of an earlier session never reappear.
    running_pid slurmctld >/dev/null || slurmctld -c -f "$CONF"
    running_pid slurmd >/dev/null || slurmd -f "$CONF"
    if ! wait_for "$UP_TIMEOUT" "node ready" node_ready; then
        tail -n 20 "$STATE/slurmctld.log" "$STATE/slurmd.log" >&2 || true
        die "node not ready after ${UP_TIMEOUT}s"
    fi
    log "up; use: export SLURM_CONF=$CONF"
}

stop_daemon() {
    local name="$1" pid t0
    pid="$(running_pid "$name")" || { rm -f "$(pidfile "$name")"; return 0; }
    kill -TERM "$pid"
    t0=$SECONDS
    while kill -0 "$pid" 2>/dev/null; do
        if ((SECONDS - t0 >= 15)); then
            log "$name ($pid) ignored SIGTERM for 15 s; SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.2
    done
    rm -f "$(pidfile "$name")"
    log "stopped $name ($pid)"
}

cmd_down() {
    [[ -f "$CONF" ]] || { log "not up (no $CONF)"; return 0; }
    if running_pid slurmctld >/dev/null; then
        # Cancel jobs first: with proctrack/linuxproc their steps outlive slurmd otherwise.
        local jobs
        jobs="$(SLURM_CONF="$CONF" squeue -h -o %i 2>/dev/null || true)"
        if [[ -n "$jobs" ]]; then
            log "cancelling jobs: $(tr '\n' ' ' <<<"$jobs")"
            # shellcheck disable=SC2086  # one job id per word
            SLURM_CONF="$CONF" scancel $jobs || true
            wait_for $((KILL_WAIT + 15)) "jobs gone" test -z "$(SLURM_CONF="$CONF" squeue -h -o %i 2>/dev/null)" \
                || log "jobs still listed; stopping anyway"
        fi
    fi
    local d
    for d in "${DAEMONS[@]}"; do stop_daemon "$d"; done
}

cmd_status() {
    local d pid rc=0
    for d in "${DAEMONS[@]}"; do
        if pid="$(running_pid "$d")"; then echo "$d: running (pid $pid)"; else echo "$d: stopped"; rc=3; fi
    done
    if [[ $rc -eq 0 ]]; then
        echo "SLURM_CONF=$CONF"
        SLURM_CONF="$CONF" sinfo -N -o '%N %T %c %m %G' || rc=3
        SLURM_CONF="$CONF" squeue || rc=3
    fi
    return $rc
}

case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 2 ;;
esac
