#!/usr/bin/env bash
# A single-node Slurm on this machine for tests/test_sweep.py: installs slurm-wlm and munge,
# writes a minimal slurm.conf for localhost under $HYDRABENCH_SLURM_DIR, creates a munge key if
# there is none, starts munged, slurmctld and slurmd, and waits until the node is idle.
#
# Clients find the cluster through SLURM_CONF=$HYDRABENCH_SLURM_DIR/slurm.conf (the system's
# /etc/slurm is left alone). Idempotent: when that cluster already runs this configuration, it
# exits at once.
# `.ci/slurm-up.sh down` stops the daemons it started. Needs root (apt-get, daemons as root).
set -euo pipefail

DIR=${HYDRABENCH_SLURM_DIR:-/tmp/hydrabench-slurm}
CONF=$DIR/slurm.conf
export SLURM_CONF=$CONF

fail() { echo "slurm-up: $*" >&2; exit 1; }

node_idle() { sinfo -h -N -n localhost -o %T 2>/dev/null | grep -qxE 'idle|mixed|allocated'; }

stop() {  # $1: pid file of a daemon this script started
    if [[ -f $1 ]]; then kill "$(cat "$1")" 2>/dev/null || true; fi
    rm -f "$1"
}

if [[ ${1:-} == down ]]; then
    stop "$DIR/slurmd.pid"
    stop "$DIR/slurmctld.pid"
    # munged only when this script started it: another service may rely on a running one.
    [[ -f $DIR/munged.started ]] && stop /run/munge/munged.pid && rm -f "$DIR/munged.started"
    exit 0
fi

[[ $(id -u) == 0 ]] || fail "needs root: it installs packages and runs the daemons as root"
mkdir -p "$DIR"
# Two test sessions starting the cluster at once would race for the same ports. The daemons
# started below get `9>&-`: holding the lock's descriptor, they would hold the lock for ever.
exec 9>"$DIR/.lock"
flock 9

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends slurm-wlm munge \
        >"$DIR/apt.log" 2>&1 || { tail -n 5 "$DIR/apt.log" >&2; fail "apt-get install failed"; }
fi

# munge authenticates every Slurm RPC; the package's postinst usually creates the key already.
if [[ ! -s /etc/munge/munge.key ]]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
fi
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged 9>&- || fail "munged did not start (see /var/log/munge)"
    touch "$DIR/munged.started"
    for _ in $(seq 20); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.5; done
    munge -n | unmunge >/dev/null || fail "munge does not answer"
fi

# Leave headroom for the daemons and the test process itself: jobs are refused memory beyond it.
total_mb=$(free -m | awk '/^Mem:/ {print $2}')
real_mb=$(( total_mb > 4096 ? total_mb - 2048 : total_mb / 2 ))
mkdir -p "$DIR/state" "$DIR/spool"
# The machine's own core count: `nproc` would follow OMP_NUM_THREADS (tests set it to 1), and a
# node of 1 CPU leaves a 2-task job pending for ever.
cores=$(getconf _NPROCESSORS_ONLN)
cat >"$CONF.new" <<EOF
ClusterName=hydrabench
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
# No cgroups in containers: plain process tracking, no task binding or accounting.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MpiDefault=none
ReturnToService=2
SlurmdTimeout=60
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cores RealMemory=$real_mb State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF

# Reuse a running cluster only when it runs this very configuration (one left by an earlier
# session may have another node size); otherwise start afresh.
if cmp -s "$CONF.new" "$CONF" && node_idle; then
    rm -f "$CONF.new"
    echo "slurm-up: already running (SLURM_CONF=$CONF)"
    exit 0
fi
mv "$CONF.new" "$CONF"
stop "$DIR/slurmd.pid"
stop "$DIR/slurmctld.pid"
sleep 1
slurmctld -i 9>&- || { tail -n 5 "$DIR/slurmctld.log" >&2; fail "slurmctld did not start"; }
slurmd -N localhost 9>&- || { tail -n 5 "$DIR/slurmd.log" >&2; fail "slurmd did not start"; }

for _ in $(seq 60); do
    if node_idle; then
        echo "slurm-up: node localhost idle (SLURM_CONF=$CONF)"
        exit 0
    fi
    sleep 1
done
sinfo -N -l >&2 || true
tail -n 5 "$DIR/slurmctld.log" "$DIR/slurmd.log" >&2 || true
fail "node localhost not idle after 60 s"
