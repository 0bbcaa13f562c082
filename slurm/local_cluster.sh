#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine (controller + compute node on localhost), for tests and demos.
#
#   slurm/local_cluster.sh install   # apt-get install slurm-wlm + munge when missing (needs root and apt)
#   slurm/local_cluster.sh start     # write slurm.conf, start munged, slurmctld, slurmd; wait for the node (idempotent)
#   slurm/local_cluster.sh status    # daemons and `sinfo`; exit 0 only when the node takes jobs
#   slurm/local_cluster.sh stop      # stop the daemons this script starts
#
# No systemd needed: the daemons are started directly (works in a fresh Debian/Ubuntu container). Environment:
#   SLURM_CONF_DIR   where slurm.conf goes (default /etc/slurm, where Debian's and Ubuntu's binaries look)
#   SLURM_STATE_DIR  controller and node state (default /var/spool/slurm-local)
#   SLURM_LOG_DIR    daemon logs (default /var/log/slurm-local)
#   SLURM_MEM_MARGIN_MB  memory left out of the node's RealMemory (default 10% of MemTotal, at least 512)
#   SLURM_WAIT_S     how long `start` waits for the node to become idle (default 60)
#   SLURM_FORCE=1    overwrite a slurm.conf this script did not write (refused otherwise)
# With SLURM_CONF_DIR other than /etc/slurm, export SLURM_CONF=$SLURM_CONF_DIR/slurm.conf for sbatch & co.
set -euo pipefail

CONF_DIR=${SLURM_CONF_DIR:-/etc/slurm}
CONF=$CONF_DIR/slurm.conf
STATE_DIR=${SLURM_STATE_DIR:-/var/spool/slurm-local}
LOG_DIR=${SLURM_LOG_DIR:-/var/log/slurm-local}
RUN_DIR=/run/slurm-local
WAIT_S=${SLURM_WAIT_S:-60}
MUNGE_KEY=/etc/munge/munge.key
MUNGE_SOCKET_DIR=/run/munge
NODE=$(hostname -s)

say() { echo "local_cluster: $*" >&2; }
die() {
    say "error: $*"
    exit 1
}
as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo > /dev/null; then sudo -n "$@"; else
        die "needs root (or passwordless sudo) for: $*"
    fi
}
# Our daemons, found by their pid files (never by name: other clusters may run on the same host).
pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2> /dev/null; }
installed() { command -v slurmctld > /dev/null && command -v slurmd > /dev/null && command -v sbatch > /dev/null &&
    command -v munged > /dev/null; }

cmd_install() {
    if installed; then
        say "slurm and munge already installed ($(slurmctld -V))"
        return 0
    fi
    command -v apt-get > /dev/null || die "slurm is not installed and there is no apt-get to install it"
    say "installing slurm-wlm and munge with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    # Keep the packages' maintainer scripts from starting services (no init system in containers).
    local policy=/usr/sbin/policy-rc.d created_policy=0
    if [ ! -e $policy ]; then
        printf '#!/bin/sh\nexit 101\n' | as_root tee $policy > /dev/null
        as_root chmod +x $policy
        created_policy=1
    fi
    local rc=0
    { as_root apt-get update -qq && as_root apt-get install -y -qq --no-install-recommends slurm-wlm munge; } ||
        rc=$?
    [ $created_policy = 1 ] && as_root rm -f $policy
    [ $rc = 0 ] || die "apt-get install slurm-wlm munge failed (exit $rc)"
    installed || die "slurm-wlm installed but slurmctld/slurmd/sbatch/munged are not on PATH"
    say "installed $(slurmctld -V)"
}

real_memory_mb() {
    local total_kb total_mb margin
    total_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
    total_mb=$((total_kb / 1024))
    margin=${SLURM_MEM_MARGIN_MB:-$((total_mb / 10))}
    [ "$margin" -lt 512 ] && margin=512
    echo $((total_mb > margin + 256 ? total_mb - margin : 256))
}

write_conf() {
    # Prints "changed" when slurm.conf was (re)written.
    local cpus mem tmp
    cpus=$(nproc)
    mem=$(real_memory_mb)
    tmp=$(mktemp)
    cat > "$tmp" << EOF
# Written by slurm/local_cluster.sh: a one-node cluster on $NODE. Rewritten by \`start\` when it changes.
ClusterName=local
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
ReturnToService=2
# Requeued/killed jobs: short grace between SIGTERM and SIGKILL; finished jobs stay visible to scontrol 10 min.
KillWait=10
MinJobAge=600
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/d
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
    if [ -f "$CONF" ] && cmp -s "$tmp" "$CONF"; then
        rm -f "$tmp"
        return 0
    fi
    if [ -f "$CONF" ] && ! head -n1 "$CONF" | grep -q "Written by slurm/local_cluster.sh" && [ -z "${SLURM_FORCE:-}" ]; then
        rm -f "$tmp"
        die "$CONF exists and was not written by this script; not overwriting a real cluster's config" \
            "(set SLURM_CONF_DIR to another directory, or SLURM_FORCE=1 to overwrite)"
    fi
    as_root mkdir -p "$CONF_DIR"
    as_root cp "$tmp" "$CONF"
    as_root chmod 644 "$CONF"
    rm -f "$tmp"
    echo changed
}

munge_ok() { munge -n < /dev/null 2> /dev/null | unmunge > /dev/null 2>&1; }

start_munge() {
    if munge_ok; then return 0; fi
    id munge > /dev/null 2>&1 || die "no 'munge' user (is the munge package installed?)"
    as_root mkdir -p /etc/munge /var/lib/munge /var/log/munge $MUNGE_SOCKET_DIR
    if [ ! -s $MUNGE_KEY ]; then
        say "creating $MUNGE_KEY"
        if command -v mungekey > /dev/null; then
            as_root mungekey --create --keyfile=$MUNGE_KEY --force
        else
            as_root dd if=/dev/urandom of=$MUNGE_KEY bs=1 count=1024 status=none
        fi
    fi
    as_root chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge $MUNGE_SOCKET_DIR
    as_root chmod 700 /etc/munge /var/lib/munge /var/log/munge
    as_root chmod 755 $MUNGE_SOCKET_DIR
    as_root chmod 400 $MUNGE_KEY
    say "starting munged"
    # A stale pid file or socket from a previous (killed) munged makes the new one refuse to start.
    if [ -f $MUNGE_SOCKET_DIR/munged.pid ] && ! kill -0 "$(cat $MUNGE_SOCKET_DIR/munged.pid)" 2> /dev/null; then
        as_root rm -f $MUNGE_SOCKET_DIR/munged.pid $MUNGE_SOCKET_DIR/munge.socket.2 \
            $MUNGE_SOCKET_DIR/munge.socket.2.lock
    fi
    as_root runuser -u munge -- munged --pid-file=$MUNGE_SOCKET_DIR/munged.pid ||
        die "munged failed to start (see /var/log/munge/munged.log)"
    for _ in $(seq 50); do
        munge_ok && return 0
        sleep 0.1
    done
    die "munged started but munge/unmunge does not work (see /var/log/munge/munged.log)"
}

node_state() { sinfo -h -N -n "$NODE" -o '%T' 2> /dev/null | head -n1; }
node_ready() {
    case "$(node_state)" in
    idle | mixed | allocated | completing) return 0 ;;
    *) return 1 ;;
    esac
}

wait_ready() {
    local state=""
    for _ in $(seq $((WAIT_S * 2))); do
        state=$(node_state)
        case "$state" in
        idle | mixed | allocated | completing)
            say "node $NODE is $state"
            return 0
            ;;
        drain* | down* | fail*)
            # ReturnToService=2 brings a node back once it registers with a valid config; a drained node
            # (e.g. after a config change) is resumed here once.
            as_root scontrol update NodeName="$NODE" State=RESUME > /dev/null 2>&1 || true
            ;;
        esac
        sleep 0.5
    done
    say "node $NODE not ready after ${WAIT_S}s (state: ${state:-none}); reason: $(sinfo -h -R -o '%E' 2> /dev/null)"
    say "logs: $LOG_DIR/slurmctld.log $LOG_DIR/slurmd.log"
    return 1
}

cmd_start() {
    installed || die "slurm is not installed; run: $0 install"
    local changed
    changed=$(write_conf)
    if [ -z "$changed" ] && pid_alive $RUN_DIR/slurmctld.pid && pid_alive $RUN_DIR/slurmd.pid && munge_ok &&
        node_ready; then
        say "already running (node $NODE is $(node_state))"
        return 0
    fi
    if [ -n "$changed" ]; then
        say "wrote $CONF"
        # The daemons read slurm.conf at start: restart the ones running with the old one.
        stop_daemons
    fi
    as_root mkdir -p "$STATE_DIR/ctld" "$STATE_DIR/d" "$LOG_DIR" "$RUN_DIR"
    start_munge
    if ! pid_alive $RUN_DIR/slurmctld.pid; then
        say "starting slurmctld"
        as_root slurmctld || die "slurmctld failed to start (see $LOG_DIR/slurmctld.log)"
    fi
    for _ in $(seq 100); do
        scontrol ping 2> /dev/null | grep -q UP && break
        sleep 0.2
    done
    if ! pid_alive $RUN_DIR/slurmd.pid; then
        say "starting slurmd"
        as_root slurmd || die "slurmd failed to start (see $LOG_DIR/slurmd.log)"
    fi
    wait_ready
}

stop_one() {
    local name=$1 pidfile=$RUN_DIR/$1.pid pid
    pid_alive "$pidfile" || return 0
    pid=$(cat "$pidfile")
    say "stopping $name ($pid)"
    as_root kill "$pid"
    for _ in $(seq 100); do
        kill -0 "$pid" 2> /dev/null || return 0
        sleep 0.1
    done
    as_root kill -9 "$pid" 2> /dev/null || true
}

stop_daemons() {
    stop_one slurmd
    stop_one slurmctld
}

cmd_stop() {
    stop_daemons
    if [ -f $MUNGE_SOCKET_DIR/munged.pid ] && kill -0 "$(cat $MUNGE_SOCKET_DIR/munged.pid)" 2> /dev/null; then
        say "stopping munged"
        as_root runuser -u munge -- munged --stop > /dev/null 2>&1 || as_root kill "$(cat $MUNGE_SOCKET_DIR/munged.pid)"
    fi
}

cmd_status() {
    local rc=0
    for d in slurmctld slurmd; do
        if pid_alive $RUN_DIR/$d.pid; then echo "$d: running (pid $(cat $RUN_DIR/$d.pid))"; else
            echo "$d: stopped"
            rc=1
        fi
    done
    if munge_ok; then echo "munged: running"; else
        echo "munged: stopped"
        rc=1
    fi
    if [ $rc = 0 ]; then
        sinfo
        node_ready || rc=1
    fi
    return $rc
}

case "${1:-}" in
install) cmd_install ;;
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
restart)
    cmd_stop
    cmd_start
    ;;
*)
    echo "usage: $0 {install|start|stop|status|restart}" >&2
    exit 2
    ;;
esac
