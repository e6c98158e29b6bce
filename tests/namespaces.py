"""Hosts made with network namespaces, for the tests that need a machine of their own.

Every process that uses a namespace's addresses runs inside it (`ip netns exec`); the
addresses are used nowhere else. `ip netns exec NAME` also mounts the files of
`/etc/netns/NAME/` over those of `/etc/` (resolv.conf, hosts) for the command it runs, which is
how a test gives a host a name service of its own.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

ETC_NETNS = Path("/etc/netns")


def ip(*arguments: str) -> None:
    subprocess.run(["ip", *arguments], check=True, capture_output=True, text=True)


def require_namespaces() -> None:
    """Skip (a failure in CI, see conftest) where namespaces cannot be made."""
    if shutil.which("ip") is None or subprocess.run(["ip", "netns", "list"], capture_output=True).returncode != 0:
        pytest.skip("`ip netns` is not available here (iproute2 missing, or no CAP_SYS_ADMIN)")


def remove_host(name: str) -> None:
    """Kill every process in the namespace, then delete it and its /etc/netns files."""
    pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    shutil.rmtree(ETC_NETNS / name, ignore_errors=True)


@contextlib.contextmanager
def one_host(tag: str = "phx") -> Iterator[str]:
    """A network namespace with loopback up: a machine whose ports are the test's alone."""
    require_namespaces()
    name = f"{tag}-{uuid.uuid4().hex[:6]}"
    try:
        ip("netns", "add", name)
        ip("-n", name, "link", "set", "lo", "up")
    except subprocess.CalledProcessError as error:
        remove_host(name)
        pytest.skip(f"cannot make a network namespace here: {error.stderr.strip()}")
    try:
        yield name
    finally:
        remove_host(name)
