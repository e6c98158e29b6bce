"""Fault tests: on top of the no-leftover-process check, nothing else may leak either.

Every test here is checked for the resources a launch uses, counted before and after it in
the test process: open file descriptors, listening sockets, shared memory files of phalanx
(`/dev/shm/phalanx-<pid>-*`) and torch, and phalanx's temporary files.
"""

from __future__ import annotations

import glob
import os
import tempfile
import time

import pytest

import phalanx as px

_SHARED_MEMORY_PATTERNS = ("/dev/shm/phalanx-*", "/dev/shm/torch_*")


def listening_socket_count(pid: int | str = "self") -> int:
    """Listening TCP sockets held by one process (inodes of its fds found as LISTEN in /proc/net)."""
    inodes = set()
    for fd in glob.glob(f"/proc/{pid}/fd/*"):
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    listening = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # state LISTEN, inode
                listening += 1
    return listening


def resource_counts() -> dict[str, int]:
    """What a leak would raise: descriptors, listening sockets, shared memory and temporary files."""
    return {
        "open file descriptors": len(os.listdir("/proc/self/fd")),
        "listening sockets": listening_socket_count(),
        "shared memory files": sum(len(glob.glob(pattern)) for pattern in _SHARED_MEMORY_PATTERNS),
        "temporary files": len(glob.glob(os.path.join(tempfile.gettempdir(), "phalanx*"))),
    }


@pytest.fixture(scope="session")
def warm_launcher():
    """One launch before any count, so that the zygote phalanx keeps (and its sockets) is there."""
    px.launch(int, platform=px.Platform(device="cpu", n_procs=1))


@pytest.fixture(autouse=True)
def nothing_leaks(warm_launcher):
    before = resource_counts()
    yield
    deadline = time.monotonic() + 5  # descriptors of just-reaped workers close as their threads finish
    while (after := resource_counts()) != before and time.monotonic() < deadline:
        time.sleep(0.05)
    leaked = {name: after[name] - before[name] for name in before if after[name] > before[name]}
    assert not leaked, f"resources leaked by this test: {leaked} (before {before}, after {after})"
