"""Soak: many launches, a random share of them faulty, and a count of everything left behind.

Each launch runs 2 ranks. A faulty one has rank 1 raise, call os._exit, get killed by
SIGKILL, or hang (the others wait in a barrier; `Platform(timeout=1)` ends it with a
HangError). Before and after, the script counts what a leak would raise: live processes
under this one (the zygote phalanx keeps excepted), its open file descriptors, its listening
sockets, shared memory files of phalanx and torch, and phalanx's temporary files. Every
count must be zero, and every launch must end the way its fault says.

    python bench/soak.py                       # 200 launches, 20% faulty
    python bench/soak.py --launches 20         # the short version the test suite runs
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import random
import signal
import sys
import tempfile
import time

import psutil

import phalanx as px
from phalanx.runners import zygote

FAULTS = ("raise", "exit", "kill", "hang")


def _job(fault: str | None) -> int:
    if fault is not None and px.get_rank() == 1:
        if fault == "raise":
            raise ValueError("injected")
        if fault == "exit":
            os._exit(3)
        if fault == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        while True:  # hang: never reaches the barrier
            time.sleep(0.05)
    px.barrier()
    return px.get_rank()


def _listening_sockets(pids: list[int]) -> int:
    inodes = set()
    for pid in pids:
        for fd in glob.glob(f"/proc/{pid}/fd/*"):
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            count += sum(1 for line in list(lines)[1:] if line.split()[3] == "0A" and line.split()[9] in inodes)
    return count


def _alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def counts() -> dict[str, int]:
    children = psutil.Process().children(recursive=True)
    helpers = set(zygote.helper_pids())  # after the children: a zygote started in between is one
    live = [p.pid for p in children if p.pid not in helpers and _alive(p)]
    return {
        "processes": len(live),
        "file descriptors": len(os.listdir("/proc/self/fd")),
        "listening ports": _listening_sockets([os.getpid(), *live]),
        "shared memory files": len(glob.glob("/dev/shm/phalanx-*")) + len(glob.glob("/dev/shm/torch_*")),
        "temporary files": len(glob.glob(os.path.join(tempfile.gettempdir(), "phalanx*"))),
    }


def _outcome_matches(fault: str | None, outcome: object) -> bool:
    if fault is None:
        return outcome == [0, 1]
    if fault == "hang":
        return isinstance(outcome, px.HangError) and outcome.never_arrived == [1]
    if not isinstance(outcome, px.WorkerError) or outcome.rank != 1:
        return False
    return {"raise": outcome.exc_type == "ValueError", "exit": outcome.exit_code == 3}.get(
        fault, outcome.signal_name == "SIGKILL"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description="launch soak with injected faults")
    parser.add_argument("--launches", type=int, default=200)
    parser.add_argument("--faulty", type=float, default=0.2, help="share of faulty launches")
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args()
    platform = px.Platform(device="cpu", n_procs=2, timeout=1)
    px.launch(_job, None, platform=platform)  # the zygote phalanx keeps is there before counting
    before = counts()
    chooser = random.Random(options.seed)
    # A random `faulty` share of the launches, the kinds taking turns so that each one occurs.
    chosen = chooser.sample(range(options.launches), round(options.launches * options.faulty))
    faults: list[str | None] = [None] * options.launches
    for turn, index in enumerate(chosen):
        faults[index] = FAULTS[turn % len(FAULTS)]
    wrong = []
    start = time.monotonic()
    for index, fault in enumerate(faults):
        try:
            outcome: object = px.launch(_job, fault, platform=platform)
        except px.WorkerError as error:
            outcome = error
        if not _outcome_matches(fault, outcome):
            wrong.append((index, fault, repr(outcome)[:200]))
    elapsed = time.monotonic() - start
    deadline = time.monotonic() + 5  # the last workers' exits are still being reported
    while (after := counts()) != before and time.monotonic() < deadline:
        time.sleep(0.05)
    leaked = {name: after[name] - before[name] for name in before}
    tally = collections.Counter(fault for fault in faults if fault is not None)
    kinds = ", ".join(f"{kind} {tally[kind]}" for kind in FAULTS)
    leaks = ", ".join(f"{name} {count}" for name, count in leaked.items())
    print(
        f"{options.launches} launches ({sum(tally.values())} faulty: {kinds}) in {elapsed:.1f} s; "
        f"wrong outcomes {len(wrong)}; leaked: {leaks}"
    )
    for index, fault, outcome in wrong:
        print(f"  launch {index} ({fault or 'no fault'}) ended with {outcome}", file=sys.stderr)
    return 1 if wrong or any(leaked.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
