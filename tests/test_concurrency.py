"""Several launches at the same moment, from different processes, never collide on a port."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(120)

JOB = """
import sys, phalanx as px
sys.stdin.readline()  # every job starts on the same signal
print(px.launch(lambda: px.all_reduce(px.get_rank() + 1, op="sum"), platform=px.Platform(device="cpu", n_procs=2)))
"""


def test_simultaneous_launches_from_separate_processes_all_succeed():
    jobs = [
        subprocess.Popen(
            [sys.executable, "-c", JOB],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(6)
    ]
    for job in jobs:  # release them together, once all are waiting
        job.stdin.write("go\n")
        job.stdin.flush()
    for job in jobs:
        out, err = job.communicate(timeout=100)
        assert job.returncode == 0, err
        assert out.strip() == "[3, 3]"


def test_no_fixed_default_port():
    import phalanx as px

    ports = {
        px.launch(lambda: __import__("os").environ["MASTER_PORT"], platform=px.Platform(device="cpu"))[0]
        for _ in range(3)
    }
    assert len(ports) > 1, f"every launch used port {ports}: a fixed default port collides with a second job"
