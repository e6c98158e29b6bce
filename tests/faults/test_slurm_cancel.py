"""A SLURM job cancelled from outside (scancel): the caller gets an error saying so, and nothing runs on."""

from __future__ import annotations

import os
import subprocess
import threading
import time

import pytest

import phalanx as px
from tests.test_slurm import _wait_until_gone, slurm  # noqa: F401  (the fixture)

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(150)]


def _tell_then_wait(fifo: str) -> None:
    with open(fifo, "w") as ready:
        ready.write(os.environ["SLURM_JOB_ID"])
    threading.Event().wait()


def test_a_job_cancelled_from_outside_raises_in_the_caller_and_leaves_the_queue(slurm, tmp_path):  # noqa: F811
    fifo = tmp_path / "ready"
    os.mkfifo(fifo)
    platform = px.Platform(cluster="slurm", n_procs=1, time=5, log_dir=str(tmp_path))
    job = px.submit(_tell_then_wait, str(fifo), platform=platform)
    with open(fifo) as ready:  # blocks until the job runs
        assert ready.read().strip() == job.job_id
    subprocess.run(["scancel", job.job_id], check=True, timeout=30)
    start = time.monotonic()
    with pytest.raises(px.PhalanxError) as info:
        job.result()
    assert time.monotonic() - start < 60
    assert job.job_id in str(info.value) and "CANCELLED" in str(info.value)
    assert _wait_until_gone(job.job_id)
