#!/usr/bin/env bash
# Install and start a one-node SLURM cluster with job accounting (slurmdbd on MariaDB) on this
# machine, for the SLURM tests and for submitit (which needs `sacct`). Debian packages; needs root
# (CI runs as root). Idempotent: packages, the munge key, the database and the accounting cluster
# are only created when missing, config files only rewritten when their content changes, and a
# daemon is only started when it is not running, so a second run takes a few seconds.
# The recipe and its pitfalls are in /work/shared/CLUSTERS.md (SLURM section).
# Stop everything again with scripts/stop-slurm.sh.
set -euo pipefail

if [ "$(id -u)" != 0 ]; then
    echo "setup-slurm.sh: not root, so SLURM is not installed or started; the SLURM tests will skip" >&2
    exit 0
fi

CLUSTER=phalanx
PARTITION=debug
NODE=$(hostname -s)
CPUS=$(nproc)
LOG_DIR=/var/log/slurm
DB_SOCKET=/run/mysqld/mysqld.sock
DB_NAME=slurm_acct_db
DB_USER=slurm
# MariaDB runs with --skip-networking: only local processes reach it through the socket.
DB_PASS=slurmdbd-local-only
SLURM_CONF=/etc/slurm/slurm.conf
SLURMDBD_CONF=/etc/slurm/slurmdbd.conf

# ---------------------------------------------------------------------------------------------
# Helpers

# A live process of that exact name. PID 1 here reaps zombies late, so a plain `pgrep -x` can
# match a daemon that already died: only count running, sleeping or uninterruptible ones.
running() { pgrep -x -r R,S,D "$1" >/dev/null; }

fail() { # fail MESSAGE [LOGFILE...]: print the message and the end of each log, exit non-zero
    local message=$1 log
    shift
    echo "setup-slurm.sh: $message" >&2
    for log in "$@"; do
        if [ -s "$log" ]; then
            echo "--- last lines of $log:" >&2
            tail -n 25 "$log" >&2
        fi
    done
    exit 1
}

wait_for() { # wait_for SECONDS WHAT LOGFILE COMMAND...: poll COMMAND every 0.2 s until it succeeds
    local seconds=$1 what=$2 log=$3
    shift 3
    local deadline=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$deadline" ] || fail "timed out after ${seconds}s waiting for $what" "$log"
        sleep 0.2
    done
}

write_if_changed() { # write_if_changed PATH MODE: stdin to PATH unless it holds that already; 0 if written
    local path=$1 mode=$2 new
    new=$(mktemp)
    cat >"$new"
    if [ -f "$path" ] && cmp -s "$new" "$path"; then
        rm -f "$new"
        chmod "$mode" "$path"
        return 1
    fi
    install -o root -g root -m "$mode" "$new" "$path"
    rm -f "$new"
}

stop_daemon() { # stop_daemon NAME: TERM, wait up to 10 s, then KILL (used when a config changed)
    local name=$1 i
    pkill -TERM -x -r R,S,D "$name" || return 0
    for ((i = 0; i < 50; i++)); do
        running "$name" || return 0
        sleep 0.2
    done
    pkill -KILL -x -r R,S,D "$name" || true
}

# ---------------------------------------------------------------------------------------------
# Packages (nothing starts on install here; `apt-get update` only when something is missing)

packages=(slurm-wlm slurm-client slurmdbd munge mariadb-server)
missing=()
for package in "${packages[@]}"; do
    # "ii" = installed; `dpkg -s` would also accept a removed package whose config files remain
    [ "$(dpkg-query -W -f='${db:Status-Abbrev}' "$package" 2>/dev/null)" = "ii " ] || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup-slurm.sh: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Another apt run (scripts/setup-clusters.sh) may hold the lock: wait for it instead of failing.
    apt-get -o DPkg::Lock::Timeout=300 update -qq
    apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# ---------------------------------------------------------------------------------------------
# Configuration

# munge: a key readable by munge only. Debian's munge package already creates one (128 bytes) on
# install; a 1024-byte one is written only where none exists.
install -d -o munge -g munge -m 700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge/munge.key
chmod 400 /etc/munge/munge.key

install -d -m 755 /etc/slurm "$LOG_DIR" /var/spool/slurmd
install -d -m 700 /var/spool/slurmctld
install -d -o mysql -g mysql -m 755 /run/mysqld /var/log/mysql
# munged and mariadbd open their logs as their own users; we append their startup output to the
# same files as root, so create them with the right owner first (munged refuses a root-owned log).
touch /var/log/munge/munged.log /var/log/mysql/error.log
chown munge:munge /var/log/munge/munged.log
chown mysql:mysql /var/log/mysql/error.log

# The daemons run as root (SlurmUser=root). The node is reached at localhost so that the
# machine's hostname need not resolve; the node name itself must be `hostname -s` (slurmd's name).
slurm_changed=0
write_if_changed "$SLURM_CONF" 644 <<EOF && slurm_changed=1
# Written by scripts/setup-slurm.sh: a one-node cluster for tests. Edits are overwritten.
ClusterName=$CLUSTER
SlurmctldHost=$NODE(localhost)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
SlurmctldPort=6817
SlurmdPort=6818
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups here: track tasks through /proc, bind nothing, gather no usage
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# A node that was down comes back as soon as its slurmd registers again
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
Waittime=0
# submitit ignores SIGTERM: SIGKILL 2 s after it instead of the default 30 s
KillWait=2
# Finished jobs leave squeue after 5 s (sacct keeps them)
MinJobAge=5
# submitit needs job accounting (sacct)
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobCompType=jobcomp/none
# No mail on this machine (silences "Configured MailProg is invalid")
MailProg=/bin/true
NodeName=$NODE NodeAddr=localhost CPUs=$CPUS State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF

dbd_changed=0
write_if_changed "$SLURMDBD_CONF" 600 <<EOF && dbd_changed=1
# Written by scripts/setup-slurm.sh. Edits are overwritten.
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
DebugLevel=info
LogFile=$LOG_DIR/slurmdbd.log
PidFile=/run/slurmdbd.pid
StorageType=accounting_storage/mysql
# "localhost" makes the client library use the default socket, $DB_SOCKET
StorageHost=localhost
StorageLoc=$DB_NAME
StorageUser=$DB_USER
StoragePass=$DB_PASS
EOF

# A daemon that runs with an old configuration is restarted below.
if [ "$dbd_changed" = 1 ] && running slurmdbd; then
    echo "setup-slurm.sh: slurmdbd.conf changed, restarting slurmdbd"
    stop_daemon slurmdbd
fi
if [ "$slurm_changed" = 1 ] && { running slurmctld || running slurmd; }; then
    echo "setup-slurm.sh: slurm.conf changed, restarting slurmctld and slurmd"
    stop_daemon slurmd
    stop_daemon slurmctld
fi

# ---------------------------------------------------------------------------------------------
# Daemons, in order: munged, mariadbd, slurmdbd, slurmctld, slurmd. Each one's output goes to its
# log (never to our stdout, which a caller may be reading to its end).

# munged (a dead one makes srun hang rather than fail)
if ! running munged; then
    # --force: start even if a dead munged left its socket or pid file behind
    runuser -u munge -- /usr/sbin/munged --force </dev/null >>/var/log/munge/munged.log 2>&1 \
        || fail "munged did not start" /var/log/munge/munged.log
fi
munge_works() { munge -n </dev/null | unmunge; }
wait_for 20 "munged" /var/log/munge/munged.log munge_works

# mariadbd (not a service here: started by hand, socket only)
if [ ! -d /var/lib/mysql/mysql ]; then # the package normally creates the system tables
    mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/var/log/mysql/install.log 2>&1 \
        || fail "mariadb-install-db failed" /var/log/mysql/install.log
fi
if ! running mariadbd; then
    setsid -f mariadbd --user=mysql --skip-networking --socket="$DB_SOCKET" \
        --log-error=/var/log/mysql/error.log </dev/null >>/var/log/mysql/error.log 2>&1
fi
sql() { mariadb --socket="$DB_SOCKET" -N -B -e "$1"; }
wait_for 60 "MariaDB" /var/log/mysql/error.log sql 'select 1'
if [ -z "$(sql "select 1 from mysql.user where user = '$DB_USER' and host = 'localhost'")" ]; then
    sql "create database if not exists $DB_NAME;
         create user if not exists '$DB_USER'@'localhost' identified by '$DB_PASS';
         grant all on $DB_NAME.* to '$DB_USER'@'localhost';"
fi

# slurmdbd (creates its tables on first start, some seconds)
if ! running slurmdbd; then
    slurmdbd </dev/null >>"$LOG_DIR/slurmdbd.log" 2>&1 || fail "slurmdbd did not start" "$LOG_DIR/slurmdbd.log"
fi
wait_for 90 "slurmdbd" "$LOG_DIR/slurmdbd.log" sacctmgr -i list cluster

# The cluster must exist in accounting before slurmctld registers with it.
if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
    sacctmgr -i add cluster "$CLUSTER" >/dev/null || fail "sacctmgr add cluster $CLUSTER failed" "$LOG_DIR/slurmdbd.log"
    # A slurmctld that was running without its cluster registered does not pick it up by itself.
    if running slurmctld; then
        stop_daemon slurmctld
    fi
fi

# slurmctld
if ! running slurmctld; then
    slurmctld </dev/null >>"$LOG_DIR/slurmctld.log" 2>&1 || fail "slurmctld did not start" "$LOG_DIR/slurmctld.log"
fi
ctld_up() { scontrol ping | grep -q UP; }
wait_for 30 "slurmctld" "$LOG_DIR/slurmctld.log" ctld_up

# slurmd (started after libpmix is installed, so that srun --mpi=pmix works)
if ! running slurmd; then
    slurmd </dev/null >>"$LOG_DIR/slurmd.log" 2>&1 || fail "slurmd did not start" "$LOG_DIR/slurmd.log"
fi

# Wait for the node to be usable. A node that answers but is down or drained (left so by an earlier
# run, e.g. "Kill task failed") is resumed; one that does not answer yet ("*" suffix) is waited
# for: with ReturnToService=2 it comes back when slurmd registers. "completing" clears once slurmd
# has told slurmctld that the jobs of a dead slurmd are gone.
node_state() { sinfo -h -N -n "$NODE" -o %T 2>/dev/null | head -1; }
deadline=$((SECONDS + 60))
last_resume=-10
while :; do
    state=$(node_state)
    case $state in
        idle | mixed | allocated) break ;;
        down | drained | draining | fail | failing)
            if [ $((SECONDS - last_resume)) -ge 5 ]; then
                scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
                last_resume=$SECONDS
            fi
            ;;
    esac
    running slurmd || fail "slurmd died (node state: ${state:-none})" "$LOG_DIR/slurmd.log"
    [ "$SECONDS" -lt "$deadline" ] \
        || fail "node $NODE is not idle after 60 s (state: ${state:-none})" "$LOG_DIR/slurmd.log" "$LOG_DIR/slurmctld.log"
    sleep 0.2
done

# ---------------------------------------------------------------------------------------------
# Smoke test: two tasks on one node (--overcommit: more tasks than free CPUs), then accounting.
# A node fully allocated by someone's job would make srun wait, so then it is skipped.

if [ "$state" = allocated ]; then
    echo "setup-slurm.sh: node $NODE is fully allocated by running jobs, smoke test skipped"
else
    # shellcheck disable=SC2016 # $SLURM_JOB_ID is expanded by the task's shell
    out=$(timeout 60 srun -N1 -n2 --overcommit --time=1 --job-name=setup-slurm-check --chdir=/tmp \
        sh -c 'echo "$SLURM_JOB_ID $(hostname)"' 2>&1) \
        || fail "srun failed: $out" "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log"
    [ "$(printf '%s\n' "$out" | wc -l)" = 2 ] || fail "srun -n2 printed something else than two lines: $out"
    job=$(printf '%s\n' "$out" | head -1 | cut -d' ' -f1)
    # The job record reaches slurmdbd asynchronously: poll until it says COMPLETED.
    deadline=$((SECONDS + 20))
    until [ "$(sacct -n -X -P -j "$job" -o State 2>&1)" = COMPLETED ]; do
        [ "$SECONDS" -lt "$deadline" ] || fail "sacct does not show job $job COMPLETED after 20 s: $(
            sacct -n -X -P -j "$job" -o JobID,State 2>&1)" "$LOG_DIR/slurmdbd.log" "$LOG_DIR/slurmctld.log"
        sleep 0.2
    done
fi

echo "SLURM ready in ${SECONDS}s: $(sinfo -V), accounting via slurmdbd on MariaDB" \
    "$(mariadbd --version | grep -o 'Ver [^ ]*' | cut -d' ' -f2), cluster $CLUSTER," \
    "node $NODE ($CPUS CPUs, $(node_state)), partition $PARTITION (default)"
