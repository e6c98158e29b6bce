#!/usr/bin/env bash
# Stop the one-node SLURM cluster that scripts/setup-slurm.sh started: cancel every job, then stop
# slurmd, slurmctld, slurmdbd, mariadbd and munged (the reverse of the start order). Does nothing
# for a daemon that is not running, so it never fails because things are already stopped.
# Configuration, the accounting database and the packages stay: setup-slurm.sh starts it all again.
set -euo pipefail

if [ "$(id -u)" != 0 ]; then
    echo "stop-slurm.sh: needs root" >&2
    exit 1
fi

# A live process of that exact name (PID 1 here reaps zombies late: skip dead ones).
running() { pgrep -x -r R,S,D "$1" >/dev/null; }

stop() { # stop NAME [SECONDS]: SIGTERM, wait (10 s unless told), then SIGKILL
    local name=$1 seconds=${2:-10} i
    running "$name" || return 0
    pkill -TERM -x -r R,S,D "$name" || true
    for ((i = 0; i < seconds * 5; i++)); do
        running "$name" || {
            echo "stopped $name"
            return 0
        }
        sleep 0.2
    done
    pkill -KILL -x -r R,S,D "$name" || true
    echo "killed $name (it did not stop within ${seconds}s)"
}

# Cancel every job while slurmctld and slurmd can still end them, and wait until they are gone
# (KillWait=2: SIGKILL 2 s after SIGTERM), so that no task outlives its slurmd.
if running slurmctld && command -v squeue >/dev/null; then
    mapfile -t jobs < <(squeue -h -o %A 2>/dev/null || true)
    if [ ${#jobs[@]} -gt 0 ]; then
        scancel "${jobs[@]}" || true
        for ((i = 0; i < 75; i++)); do
            [ -z "$(squeue -h -o %A 2>/dev/null || true)" ] && break
            sleep 0.2
        done
        echo "cancelled jobs ${jobs[*]}"
    fi
fi

stop slurmd
# Job steps of a slurmd that died earlier survive it: end them too.
stop slurmstepd 5
stop slurmctld
stop slurmdbd
stop mariadbd 30 # a clean InnoDB shutdown can take a few seconds
stop munged
