#!/usr/bin/env bash
# A single-node SLURM cluster with accounting (sacct), from Debian's packages, for the
# tests and for trying Calypso's `slurm` executor on one machine. Needs root.
#
#   deploy/slurm/single-node.sh start   # install if needed, configure, start; idempotent
#   deploy/slurm/single-node.sh stop
#
# munge (authentication), MariaDB + slurmdbd (accounting, so `sacct` works),
# slurmctld and slurmd for this host, one partition `calypso` with every core.
set -euo pipefail
STATE=${CALYPSO_SLURM_STATE:-/var/lib/calypso-slurm}
HOST=$(hostname -s)
CPUS=$(nproc)
MEMORY=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))

install_packages() {
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurm-wlm)
    command -v munged >/dev/null || missing+=(munge)
    command -v slurmdbd >/dev/null || missing+=(slurmdbd)
    command -v mariadbd >/dev/null || command -v mysqld >/dev/null || missing+=(mariadb-server)
    if ((${#missing[@]})); then
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null \
            || { apt-get update >/dev/null && apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null; }
    fi
}

configure() {
    mkdir -p "$STATE"/{ctld,slurmd,log} /etc/slurm
    cat > /etc/slurm/slurm.conf <<CONF
ClusterName=calypso
SlurmctldHost=$HOST
AuthType=auth/munge
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
MpiDefault=none
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
NodeName=$HOST CPUs=$CPUS RealMemory=$MEMORY State=UNKNOWN
PartitionName=calypso Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
    cat > /etc/slurm/slurmdbd.conf <<CONF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=calypso
StorageLoc=slurm_acct_db
LogFile=$STATE/log/slurmdbd.log
PidFile=$STATE/slurmdbd.pid
CONF
    chmod 600 /etc/slurm/slurmdbd.conf
}

wait_for() {  # command, what
    for _ in $(seq 60); do
        if eval "$1" >/dev/null 2>&1; then return 0; fi
        sleep 1
    done
    echo "single-node SLURM: $2 did not come up (logs in $STATE/log)" >&2
    return 1
}

start() {
    install_packages
    configure
    mkdir -p /run/munge && chown munge:munge /run/munge
    pgrep -x munged >/dev/null || (setsid runuser -u munge -- /usr/sbin/munged -F >"$STATE/log/munged.out" 2>&1 &)
    wait_for "munge -n | unmunge" "munge"
    if ! pgrep -x mariadbd >/dev/null && ! pgrep -x mysqld >/dev/null; then
        mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
        (mysqld_safe >/dev/null 2>&1 &)
    fi
    wait_for "mysql -e 'SELECT 1'" "MariaDB"
    mysql -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'calypso';
              GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
    pgrep -x slurmdbd >/dev/null || slurmdbd
    wait_for "sacctmgr -n show cluster" "slurmdbd"
    sacctmgr -i add cluster calypso >/dev/null 2>&1 || true
    pgrep -x slurmctld >/dev/null || slurmctld
    wait_for "scontrol ping | grep -q UP" "slurmctld"
    pgrep -x slurmd >/dev/null || slurmd
    wait_for "sinfo -h -o %T | grep -Eq 'idle|mixed|alloc'" "slurmd"
    scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true
    echo "single-node SLURM up: partition calypso, $CPUS CPUs, $MEMORY MB on $HOST"
}

stop() {
    # A job still running keeps slurmd in its shutdown for as long as the job lasts (its
    # step retries its completion against a stopped slurmctld): a start meanwhile finds
    # that slurmd, starts none, and the node goes down when it ends. So: jobs cancelled
    # first, then each daemon stopped and waited for.
    scancel --partition=calypso >/dev/null 2>&1 || true
    pkill -x slurmd || true
    pkill -x slurmctld || true
    pkill -x slurmdbd || true
    for _ in $(seq 1 40); do
        pgrep -x 'slurmd|slurmctld|slurmdbd' >/dev/null || return 0
        sleep 0.5
    done
    pkill -9 -x 'slurmd|slurmctld|slurmdbd' || true
}

"${1:-start}"
