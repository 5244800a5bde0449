#!/usr/bin/env bash
# A throw-away single-node SLURM cluster from the Debian packages, for testing the SLURM profile.
#
#   tests/slurm/cluster.sh up STATE_DIR     start munged, mariadbd, slurmdbd, slurmctld, slurmd
#   tests/slurm/cluster.sh env STATE_DIR    print the exports that point SLURM clients at it
#   tests/slurm/cluster.sh down STATE_DIR   stop exactly the daemons 'up' started, by their PIDs
#
# Everything (configs, spool, state, the MariaDB data, logs, PID files) lives in STATE_DIR, on
# ports that are not SLURM's defaults; the one thing outside it is a link /etc/slurm/slurm.conf to
# STATE_DIR's config (srun inside a Snakemake job only finds the config there), made only when
# no such file exists and removed by 'down'. /etc/mysql is not touched. Needs root (slurmd runs
# jobs as their user) and the packages slurmctld slurmd slurm-client slurmdbd munge
# mariadb-server. 'up' records each daemon's PID in STATE_DIR/pids/<name>; 'down' signals only
# those PIDs (TERM, then KILL after a grace period) and never kills by name.
set -euo pipefail

CTLD_PORT=${SAEFT_SLURM_CTLD_PORT:-16817}
SLURMD_PORT=${SAEFT_SLURM_SLURMD_PORT:-16818}
DBD_PORT=${SAEFT_SLURM_DBD_PORT:-16819}
DB_PORT=${SAEFT_SLURM_DB_PORT:-16306}
CLUSTER=saeft
ACCOUNT=saeft_test
PARTITION=debug
SYSTEM_CONF=/etc/slurm/slurm.conf

die() { echo "cluster.sh: $*" >&2; exit 1; }
log() { echo "cluster.sh: $*" >&2; }

usage() { sed -n '2,6p' "$0" >&2; exit 2; }

[[ $# -eq 2 ]] || usage
action=$1
state=$(realpath -m "$2")

# Wait until a command succeeds (up to $1 seconds), failing with the last daemon log otherwise.
wait_for() {
    local seconds=$1 what=$2 logfile=$3; shift 3
    local deadline=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            log "$what did not come up within ${seconds}s; last lines of $logfile:"
            tail -n 30 "$logfile" >&2 || true
            return 1
        fi
        sleep 0.5
    done
}

# Start a daemon in the foreground mode, in the background of this shell, and record its PID.
# The command must exec the daemon itself (no wrapper that forks), so that $! is the daemon.
start() {
    local name=$1; shift
    "$@" >"$state/log/$name.out" 2>&1 &
    echo $! >"$state/pids/$name"
    log "started $name (pid $!)"
}

alive() { [[ -f "$state/pids/$1" ]] && kill -0 "$(cat "$state/pids/$1")" 2>/dev/null; }

print_env() {
    echo "export SLURM_CONF=$state/etc/slurm.conf"
    echo "export SAEFT_SLURM_ACCOUNT=$ACCOUNT SAEFT_SLURM_PARTITION=$PARTITION"
}

write_configs() {
    local host cpus mem
    host=$(hostname -s)
    cpus=$(nproc)
    # The node advertises 100 GB whatever it has (SlurmdParameters=config_overrides), so that the
    # project profile's memory requests (up to 32 GB) are schedulable on a small test machine;
    # nothing enforces memory here (no cgroups), the test jobs are small.
    mem=100000
    cat >"$state/etc/slurm.conf" <<EOF
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket=$state/munge/munge.socket
CredType=cred/munge
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/spool/%n
SlurmctldPidFile=$state/run/slurmctld.pid
SlurmdPidFile=$state/run/slurmd.pid
SlurmctldLogFile=$state/log/slurmctld.log
SlurmdLogFile=$state/log/slurmd.log
# No cgroups in containers: track processes by parent PID, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
SlurmdParameters=config_overrides
# Cores and memory are the consumable resources; without DefMemPerCPU a job that names no
# memory takes the whole node and jobs run one at a time.
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
# Keep finished jobs visible to squeue/scontrol for 5 minutes.
MinJobAge=300
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
# For slurmdbd this is the munge socket that accounting connections authenticate with.
AccountingStoragePass=$state/munge/munge.socket
JobCompType=jobcomp/none
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    cat >"$state/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$state/munge/munge.socket
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$state/run/slurmdbd.pid
LogFile=$state/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=saeft-test
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$state/etc/slurmdbd.conf"
}

# A link left by a test cluster that was killed before its 'down' (all its daemons gone).
remove_stale_link() {
    [[ -L $SYSTEM_CONF ]] || return 0
    local target other name
    target=$(readlink "$SYSTEM_CONF")
    other=${target%/etc/slurm.conf}
    [[ $target == */etc/slurm.conf && -f $other/pids/system_conf_link ]] || return 0
    for name in slurmd slurmctld slurmdbd mariadbd munged; do
        if [[ -f $other/pids/$name ]] && kill -0 "$(cat "$other/pids/$name")" 2>/dev/null; then
            return 0  # that cluster still runs
        fi
    done
    rm -f "$SYSTEM_CONF" "$other/pids/system_conf_link"
    log "removed the stale link $SYSTEM_CONF of the stopped test cluster in $other"
}

up() {
    # A failed bring-up stops what it had started.
    trap 'log "bring-up failed; stopping what was started"; down' ERR
    for bin in munged mariadbd mariadb-install-db slurmdbd slurmctld slurmd sacctmgr sbatch sacct; do
        command -v "$bin" >/dev/null || [[ -x /usr/sbin/$bin ]] || die "$bin not found: apt-get install slurmctld slurmd slurm-client slurmdbd munge mariadb-server"
    done
    [[ $(id -u) -eq 0 ]] || die "must run as root (slurmd runs jobs as their users)"
    [[ ! -d "$state/pids" ]] || die "$state already holds a cluster; run 'down' first"
    mkdir -p "$state"/{etc,pids,log,run,ctld,spool,munge,mysql}
    chmod 755 "$state"
    # munged and mariadbd run as their own users: every folder above STATE_DIR must let them through.
    for user in munge mysql; do
        setpriv --reuid="$user" --regid="$user" --init-groups test -x "$state" ||
            { rm -rf "$state"/{etc,pids,log,run,ctld,spool,munge,mysql}; die "the $user user cannot reach $state; pick a STATE_DIR below a world-traversable folder such as /tmp"; }
    done
    export SLURM_CONF=$state/etc/slurm.conf
    write_configs
    # The SLURM executor plugin removes SLURM_* variables (SLURM_CONF too) before the srun inside
    # each job, so srun must find the config at its default path: link it there, unless the
    # machine has a config of its own (then this script is not the right tool there).
    remove_stale_link
    if [[ -e $SYSTEM_CONF || -L $SYSTEM_CONF ]]; then
        die "$SYSTEM_CONF exists; this test cluster needs that path for its own config"
    fi
    mkdir -p "$(dirname "$SYSTEM_CONF")"
    ln -s "$SLURM_CONF" "$SYSTEM_CONF"
    echo "$SYSTEM_CONF" >"$state/pids/system_conf_link"

    # munged refuses to run as root; setpriv execs it as the munge user (so $! is munged).
    chown munge:munge "$state/munge"
    start munged setpriv --reuid=munge --regid=munge --init-groups \
        /usr/sbin/munged --foreground --socket="$state/munge/munge.socket" --key-file=/etc/munge/munge.key \
        --pid-file="$state/munge/munged.pid" --seed-file="$state/munge/seed" --log-file="$state/munge/munged.log"
    wait_for 20 munged "$state/log/munged.out" munge -S "$state/munge/munge.socket" -n

    # MariaDB on a private data directory and TCP port, for slurmdbd's accounting.
    chown mysql:mysql "$state/mysql"
    mariadb-install-db --user=mysql --datadir="$state/mysql/data" --auth-root-authentication-method=socket \
        --skip-test-db >"$state/log/mariadb-install.out" 2>&1 || { tail "$state/log/mariadb-install.out" >&2; die "mariadb-install-db failed"; }
    start mariadbd /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$state/mysql/data" \
        --socket="$state/mysql/mysql.sock" --port="$DB_PORT" --bind-address=127.0.0.1 \
        --pid-file="$state/mysql/mariadbd.pid" --log-error="$state/log/mariadbd.log" \
        --innodb-buffer-pool-size=64M --innodb-log-file-size=16M
    wait_for 60 mariadbd "$state/log/mariadbd.log" mariadb --no-defaults --socket="$state/mysql/mysql.sock" -uroot -e "SELECT 1"
    mariadb --no-defaults --socket="$state/mysql/mysql.sock" -uroot <<EOF
CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY 'saeft-test';
CREATE USER 'slurm'@'localhost' IDENTIFIED BY 'saeft-test';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
EOF

    # slurmdbd reads slurmdbd.conf from the folder of $SLURM_CONF.
    start slurmdbd /usr/sbin/slurmdbd -D
    wait_for 60 slurmdbd "$state/log/slurmdbd.log" sacctmgr -n list cluster
    # The cluster, an account and root's association, before slurmctld registers.
    sacctmgr -i add cluster "$CLUSTER" >/dev/null
    sacctmgr -i add account "$ACCOUNT" cluster="$CLUSTER" description=saeft-tests organization=saeft >/dev/null
    sacctmgr -i add user "$(id -un)" account="$ACCOUNT" cluster="$CLUSTER" defaultaccount="$ACCOUNT" >/dev/null

    start slurmctld /usr/sbin/slurmctld -D -i -f "$SLURM_CONF"
    wait_for 60 slurmctld "$state/log/slurmctld.log" scontrol ping
    start slurmd /usr/sbin/slurmd -D -f "$SLURM_CONF"
    wait_for 60 "slurmd (node idle)" "$state/log/slurmd.log" \
        bash -c "sinfo -h -N -o %T | grep -qx idle"
    trap - ERR
    log "cluster up: SLURM_CONF=$SLURM_CONF, account $ACCOUNT, partition $PARTITION"
}

down() {
    [[ -d "$state/pids" ]] || { log "no cluster recorded in $state"; return 0; }
    # Reverse start order: the node, the controller, accounting, its database, authentication.
    local name pid waited
    for name in slurmd slurmctld slurmdbd mariadbd munged; do
        [[ -f "$state/pids/$name" ]] || continue
        pid=$(cat "$state/pids/$name")
        if kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid" 2>/dev/null || true
            waited=0
            while kill -0 "$pid" 2>/dev/null && ((waited < 150)); do sleep 0.1; waited=$((waited + 1)); done
            if kill -0 "$pid" 2>/dev/null; then
                log "$name (pid $pid) ignored SIGTERM for 15s; sending SIGKILL"
                kill -KILL "$pid" 2>/dev/null || true
            fi
            log "stopped $name (pid $pid)"
        fi
        rm -f "$state/pids/$name"
    done
    # The /etc/slurm/slurm.conf link 'up' made, only if it still points into this state folder.
    if [[ -f "$state/pids/system_conf_link" ]]; then
        if [[ $(readlink "$SYSTEM_CONF" || true) == "$state/etc/slurm.conf" ]]; then
            rm -f "$SYSTEM_CONF"
            log "removed the link $SYSTEM_CONF"
        fi
        rm -f "$state/pids/system_conf_link"
    fi
    rmdir "$state/pids"
}

case $action in
    up) up ;;
    down) down ;;
    env) print_env ;;
    *) usage ;;
esac
