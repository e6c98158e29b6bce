"""Fault tests: on top of the no-leftover-process check, nothing else may leak either.

Every test here is checked for the resources a launch uses, counted before and after it by
`bench/soak.py`'s `counts()` (the soak counts the same things over 200 launches): live
processes, open file descriptors, listening sockets, shared memory files of phalanx
(`/dev/shm/phalanx-<pid>-*`) and torch, and phalanx's temporary files.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest

import phalanx as px


def _load_soak():
    path = Path(__file__).resolve().parents[2] / "bench" / "soak.py"
    spec = importlib.util.spec_from_file_location("phalanx_bench_soak", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


resource_counts = _load_soak().counts


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
