"""SLURM: the tasks of an `srun` step inside an `sbatch` job join as ranks.

Needs the one-node cluster that scripts/setup-slurm.sh installs and starts (CI runs it).
"""

from __future__ import annotations

import select
import shutil
import subprocess
import sys
import textwrap
import time

import pytest

from tests.test_environment import JOB

pytestmark = [pytest.mark.timeout(120), pytest.mark.cluster]


@pytest.fixture(scope="module")
def slurm():
    if shutil.which("sbatch") is None:
        pytest.skip("SLURM is not installed (scripts/setup-slurm.sh installs and starts it; .ci/run does)")
    ready = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    if ready.returncode != 0 or not {"idle", "mixed", "allocated"} & set(ready.stdout.split()):
        pytest.skip(f"no SLURM node is up (sinfo: {ready.stdout.strip() or ready.stderr.strip()})")


def _submit(tmp_path, batch_lines: list[str]) -> tuple[str, str]:
    (tmp_path / "job.py").write_text(textwrap.dedent(JOB))
    batch = tmp_path / "batch.sh"
    batch.write_text("\n".join(["#!/bin/bash", *batch_lines, ""]))
    submitted = subprocess.run(
        ["sbatch", "--wait", "--parsable", "--chdir", str(tmp_path), "-o", str(tmp_path / "out.txt"), str(batch)],
        capture_output=True,
        text=True,
        timeout=150,
    )
    job_id = submitted.stdout.strip().split(";")[0]
    try:
        return job_id, (tmp_path / "out.txt").read_text()
    finally:
        if job_id:  # never leave a job behind, whatever happened
            subprocess.run(["scancel", job_id], capture_output=True)
            queue = subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True).stdout
            assert job_id not in queue or "CG" in queue


def test_srun_tasks_inside_sbatch_join_and_every_task_gets_every_value(slurm, tmp_path):
    _, output = _submit(
        tmp_path,
        ["#SBATCH --ntasks=2 --overcommit --time=5", f"srun --kill-on-bad-exit=1 {sys.executable} job.py"],
    )
    for rank in (0, 1):
        assert f"rank {rank} got [(0, 2, 2), (10, 2, 2)]" in output, output


def test_the_batch_script_itself_launches_locally(slurm, tmp_path):
    """In the batch script (not an srun step) launch starts its own ranks."""
    _, output = _submit(tmp_path, ["#SBATCH --ntasks=1 --cpus-per-task=2 --time=5", f"{sys.executable} job.py"])
    assert "got [(0, 1, 1)]" in output, output


# -- submission from outside the cluster (cluster="slurm", submitit) -----------------------------

TWO_TASKS = {"n_procs": 2, "time": 5, "slurm_additional_parameters": {"overcommit": True}}


def _in_queue(job_id: str) -> bool:
    queue = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout
    return bool(queue.strip()) and "COMPLETING" not in queue


def _wait_until_gone(job_id: str, seconds: float = 30) -> bool:
    """Poll squeue (SLURM offers no event to wait on) until the job has left the queue."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not _in_queue(job_id):
            return True
        select.select([], [], [], 0.2)
    return False


def _rank_value(scale):
    import os

    import phalanx as px

    if os.environ.get("PHALANX_TEST_FAIL") == str(px.get_rank()):
        raise ValueError(f"task {px.get_rank()} failed on purpose")
    return px.get_rank() * scale, px.get_world_size(), px.all_reduce(1, op="sum")


def test_submitted_job_returns_every_rank_value(slurm, tmp_path):
    import phalanx as px

    platform = px.Platform(cluster="slurm", log_dir=str(tmp_path), **TWO_TASKS)
    assert px.launch(_rank_value, 10, platform=platform) == [(0, 2, 2), (10, 2, 2)]


def test_failing_task_is_reported_with_its_remote_traceback(slurm, tmp_path, monkeypatch):
    import phalanx as px

    monkeypatch.setenv("PHALANX_TEST_FAIL", "1")  # the job inherits the submitting environment
    with pytest.raises(px.WorkerError) as info:
        px.launch(_rank_value, 10, platform=px.Platform(cluster="slurm", log_dir=str(tmp_path), **TWO_TASKS))
    assert info.value.rank == 1 and info.value.exc_type == "ValueError"
    assert "task 1 failed on purpose" in info.value.traceback


def test_submit_returns_a_handle_at_once(slurm, tmp_path):
    import phalanx as px

    job = px.submit(_rank_value, 3, platform=px.Platform(cluster="slurm", log_dir=str(tmp_path), **TWO_TASKS))
    assert job.job_id.isdigit()
    assert job.result() == [(0, 2, 2), (3, 2, 2)]
    assert job.done() and job.stdout_path.exists()
    assert _wait_until_gone(job.job_id)


CTRL_C = """
import os, sys, phalanx as px

def wait_forever(fifo):
    with open(fifo, "w") as signal_ready:
        signal_ready.write(os.environ["SLURM_JOB_ID"])
    import threading
    threading.Event().wait()

platform = px.Platform(cluster="slurm", n_procs=1, time=5, log_dir=sys.argv[2])
px.launch(wait_forever, sys.argv[1], platform=platform)
"""


def test_ctrl_c_while_waiting_cancels_the_job(slurm, tmp_path):
    import os
    import signal

    fifo = tmp_path / "ready"
    os.mkfifo(fifo)
    caller = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(CTRL_C), str(fifo), str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with open(fifo) as ready:  # blocks until the job runs and opens the pipe
            job_id = ready.read().strip()
        caller.send_signal(signal.SIGINT)
        _, stderr = caller.communicate(timeout=60)
    finally:
        caller.kill()
    assert "KeyboardInterrupt" in stderr
    assert _wait_until_gone(job_id), f"job {job_id} still in the queue after Ctrl-C"


def _resumable(checkpoint, fifo, steps):
    """Counts steps in a Context; the first run stops at step 3 and waits for the preemption."""
    import phalanx as px

    ctx = px.Context(step=0, runs=0)
    ctx.load(checkpoint, missing_ok=True)
    ctx.runs += 1
    started_at = ctx.step
    while ctx.step < steps:
        ctx.step += 1
        ctx.save(checkpoint)
        if ctx.runs == 1 and ctx.step == 3:
            with open(fifo, "w") as ready:  # tell the test the job is ready to be preempted
                ready.write("3")
            import threading

            threading.Event().wait()  # submitit's signal handler requeues the job from here
    return started_at, ctx.step, ctx.runs


def _make_eligible_once_requeued(job_id: str, seconds: float = 60) -> None:
    """SLURM holds a requeued job until a later begin time; let it start now instead."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        state = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout
        if "PENDING" in state:
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], capture_output=True)
            return
        select.select([], [], [], 0.2)
    raise AssertionError(f"job {job_id} was not requeued within {seconds} s")


def test_preempted_job_is_requeued_and_resumes_from_its_checkpoint(slurm, tmp_path):
    import os

    import phalanx as px

    fifo = tmp_path / "ready"
    os.mkfifo(fifo)
    platform = px.Platform(cluster="slurm", n_procs=1, time=10, requeue=True, log_dir=str(tmp_path))
    job = px.submit(_resumable, str(tmp_path / "ckpt.pt"), str(fifo), 6, platform=platform)
    try:
        with open(fifo) as ready:
            assert ready.read() == "3"
        # What SLURM sends before preempting a job (submitit asks for SIGUSR2).
        subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True)
        _make_eligible_once_requeued(job.job_id)
        assert job.result() == [(3, 6, 2)]  # the second run started at step 3, ran to 6
    finally:
        job.cancel()
