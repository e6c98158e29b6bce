"""SLURM: the tasks of an `srun` step inside an `sbatch` job join as ranks.

Needs the one-node cluster that scripts/setup-slurm.sh installs and starts (CI runs it).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import pwd
import select
import shutil
import stat
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest

from tests.test_environment import JOB

# Every test that needs the real cluster says so with `cluster`; the others check phalanx's
# decisions on a stand-in for submitit's job handle.
pytestmark = [pytest.mark.timeout(120)]
cluster = pytest.mark.cluster


@pytest.fixture(scope="module")
def slurm():
    if shutil.which("sbatch") is None:
        pytest.skip("SLURM is not installed (scripts/setup-slurm.sh installs and starts it; .ci/run does)")
    ready = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    # sinfo flags a state with a suffix ("mixed-": planned by the backfill scheduler): still up.
    states = {state.rstrip("*~#!%$@^-") for state in ready.stdout.split()}
    if ready.returncode != 0 or not {"idle", "mixed", "allocated"} & states:
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


@cluster
def test_srun_tasks_inside_sbatch_join_and_every_task_gets_every_value(slurm, tmp_path):
    _, output = _submit(
        tmp_path,
        ["#SBATCH --ntasks=2 --overcommit --time=5", f"srun --kill-on-bad-exit=1 {sys.executable} job.py"],
    )
    for rank in (0, 1):
        assert f"rank {rank} got [(0, 2, 2), (10, 2, 2)]" in output, output


@cluster
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


@cluster
def test_submitted_job_returns_every_rank_value(slurm, tmp_path):
    import phalanx as px

    platform = px.Platform(cluster="slurm", log_dir=str(tmp_path), **TWO_TASKS)
    assert px.launch(_rank_value, 10, platform=platform) == [(0, 2, 2), (10, 2, 2)]


@cluster
def test_failing_task_is_reported_with_its_remote_traceback(slurm, tmp_path, monkeypatch):
    import phalanx as px

    monkeypatch.setenv("PHALANX_TEST_FAIL", "1")  # the job inherits the submitting environment
    with pytest.raises(px.WorkerError) as info:
        px.launch(_rank_value, 10, platform=px.Platform(cluster="slurm", log_dir=str(tmp_path), **TWO_TASKS))
    assert info.value.rank == 1 and info.value.exc_type == "ValueError"
    assert "task 1 failed on purpose" in info.value.traceback


def _fail_on_the_first_try():
    import phalanx as px

    if px.get_restart_count() == 0:
        raise ValueError(f"task {px.get_rank()} fails on try 0")
    return px.get_restart_count()


@cluster
def test_a_failed_job_is_submitted_again_with_the_restart_count_in_every_task(slurm, tmp_path):
    """launch's restart policy holds for SLURM too: the second submission's tasks know they are try 1."""
    import phalanx as px

    platform = px.Platform(cluster="slurm", max_restarts=1, log_dir=str(tmp_path), **TWO_TASKS)
    assert px.launch(_fail_on_the_first_try, platform=platform) == [1, 1]


@cluster
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


@cluster
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


def _read_when_ready(fifo: Path, job, seconds: float = 90) -> str:
    """What the job writes into `fifo`; fails, naming the job's state, if the job ends first."""
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO no writer has opened yet is not readable
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if select.select([fd], [], [], 1.0)[0]:
                return os.read(fd, 64).decode()
            if job.done():
                raise AssertionError(f"job {job.job_id} ended ({job.state}) before it wrote to {fifo}")
        raise AssertionError(f"job {job.job_id} did not write to {fifo} within {seconds} s ({job.state})")
    finally:
        os.close(fd)


def _make_eligible_once_requeued(job_id: str, seconds: float = 60) -> None:
    """SLURM holds a requeued job for about two minutes; let it start now instead, but not too soon.

    slurmd refuses to launch a job again within the same second (SLURM's clock has whole
    seconds) as the one in which it revoked the job's credential, when the requeue ended the
    first run; the job then fails for good ("Job credential revoked"). The revocation is over
    once the job is pending again, so a start from the next second on is safe; SLURM's own hold
    exists for exactly this. (A start time in the future would wait for the backfill scheduler.)
    """
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        state = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout
        if "PENDING" in state:
            select.select([], [], [], math.floor(time.time()) + 1.05 - time.time())  # into the next second
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], capture_output=True)
            return
        select.select([], [], [], 0.2)
    raise AssertionError(f"job {job_id} was not requeued within {seconds} s")


@cluster
def test_preempted_job_is_requeued_and_resumes_from_its_checkpoint(slurm, tmp_path):
    import phalanx as px

    fifo = tmp_path / "ready"
    os.mkfifo(fifo)
    platform = px.Platform(cluster="slurm", n_procs=1, time=10, requeue=True, log_dir=str(tmp_path))
    job = px.submit(_resumable, str(tmp_path / "ckpt.pt"), str(fifo), 6, platform=platform)
    try:
        assert _read_when_ready(fifo, job) == "3"
        # What SLURM sends before preempting a job (submitit asks for SIGUSR2).
        subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True)
        _make_eligible_once_requeued(job.job_id)
        assert job.result() == [(3, 6, 2)]  # the second run started at step 3, ran to 6
    finally:
        job.cancel()


# -- the job secret --------------------------------------------------------------------------------


def _secret_digest():
    """A hash of this task's job secret: the test compares them without the secret reaching a log."""
    import hashlib
    import os

    secret = os.environ.get("PHALANX_JOB_SECRET")
    return None if secret is None else hashlib.sha256(secret.encode()).hexdigest()


@cluster
def test_every_task_of_a_job_has_the_same_secret_and_every_job_its_own(slurm, tmp_path, monkeypatch):
    import phalanx as px

    monkeypatch.delenv("PHALANX_JOB_SECRET", raising=False)  # the job inherits the caller's environment
    monkeypatch.delenv("PHALANX_JOB_SECRET_FILE", raising=False)
    platform = px.Platform(cluster="slurm", log_dir=str(tmp_path), **TWO_TASKS)
    first, second = px.submit(_secret_digest, platform=platform), px.submit(_secret_digest, platform=platform)
    assert "PHALANX_JOB_SECRET" not in os.environ  # the caller's side never holds it
    first_digests, second_digests = first.result(), second.result()
    assert first_digests[0] is not None and first_digests == [first_digests[0]] * 2
    assert second_digests == [second_digests[0]] * 2 and second_digests[0] != first_digests[0]
    # It is the secret that travelled in the job's pickle (in the private folder), and only there.
    secret = first._job.submission().function.secret.hex()
    assert hashlib.sha256(secret.encode()).hexdigest() == first_digests[0]
    for path in first.folder.iterdir():
        if not path.name.endswith("_submitted.pkl") and path.is_file():
            assert secret not in path.read_text(errors="replace"), f"the job secret is in {path}"


# -- failure records: JSON from the tasks, nothing planted is run ------------------------------------


class _Plant:
    """Unpickling this creates the marker file: what a stranger would plant to run code in the caller."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def _plant_records(folder: Path, job_id: str, marker: Path) -> list[Path]:
    """A pickle named like a record, a pickle with the new suffix, a JSON file that is no record,
    a well-formed record that another user owns, and a symbolic link: none may be used."""
    nobody = pwd.getpwnam("nobody")
    record = {
        "rank": 9, "exc_type": "ValueError", "message": "forged", "traceback": "forged", "time": 0.0,
        "exit_code": None, "signal_name": None, "during": "run",
    }  # fmt: skip
    planted = {
        f"{job_id}_rank5_failure.pkl": pickle.dumps(_Plant(marker)),
        f"{job_id}_rank6_failure.json": pickle.dumps(_Plant(marker)),
        f"{job_id}_rank7_failure.json": json.dumps({"py/reduce": [{"py/function": "builtins.open"}, [str(marker)]]}),
        f"{job_id}_rank9_failure.json": json.dumps(record),
    }
    paths = []
    for name, data in planted.items():
        path = folder / name
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
        paths.append(path)
    os.chown(paths[-1], nobody.pw_uid, nobody.pw_gid)
    link = folder / f"{job_id}_rank8_failure.json"
    link.symlink_to(paths[-1])
    return [*paths, link]


def _assert_refused(message: str, planted: list[Path], marker: Path) -> None:
    assert not marker.exists(), "a planted failure record ran code in the caller"
    for path in planted:
        assert str(path) in message, f"{path.name} is not reported in:\n{message}"
    assert "forged" not in message.split("Traceback")[0]  # the other user's record was not believed


@cluster
def test_a_planted_failure_record_runs_nothing_and_is_named(slurm, tmp_path, monkeypatch):
    import phalanx as px

    monkeypatch.setenv("PHALANX_TEST_FAIL", "1")
    marker = tmp_path / "planted-code-ran"
    job = px.submit(_rank_value, 10, platform=px.Platform(cluster="slurm", log_dir=str(tmp_path), **TWO_TASKS))
    planted = _plant_records(job.folder, job.job_id, marker)
    with pytest.raises(px.WorkerError) as info:
        job.result()
    assert info.value.rank == 1 and "task 1 failed on purpose" in info.value.traceback  # the real record
    _assert_refused(str(info.value), planted, marker)
    assert stat.S_IMODE(job.folder.stat().st_mode) == 0o700
    (record,) = job.folder.glob(f"{job.job_id}_rank1_failure.json")
    assert stat.S_IMODE(record.stat().st_mode) == 0o600
    assert json.loads(record.read_text())["exc_type"] == "ValueError"


class _SubmititJob:
    """A stand-in for submitit's job handle: `results()` gives (or raises) each outcome in turn."""

    num_tasks = 1

    def __init__(self, folder: Path, outcomes: list, state: str = "FAILED") -> None:
        self.job_id = "4242"
        self.outcomes = list(outcomes)
        self.paths = types.SimpleNamespace(
            stdout=folder / "4242_0_log.out",
            stderr=folder / "4242_0_log.err",
            result_pickle=folder / "4242_0_result.pkl",
        )
        self.cleared = 0
        self.watcher = types.SimpleNamespace(clear=self._clear)
        self.state = state

    def _clear(self) -> None:
        self.cleared += 1

    def results(self):
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def get_info(self) -> dict:
        return {"State": self.state}

    def task(self, task_id: int):
        return self


def _handle(monkeypatch, tmp_path, outcomes: list, controller: list[tuple], state: str = "FAILED"):
    """A `SlurmJob` on the stand-in; `controller` lists squeue's answers (state, run start), one per call."""
    from phalanx.runners import slurm as runner

    folder = tmp_path / "slurm"
    folder.mkdir(mode=0o700)
    job = runner.SlurmJob(_SubmititJob(folder, outcomes, state), folder, gather=True)
    answers = iter(controller)
    monkeypatch.setattr(job, "_controller_state", lambda: next(answers))
    monkeypatch.setattr(job, "_runs", lambda: [])
    monkeypatch.setattr(runner, "_POLL_SECONDS", 0.0)
    return job


def test_planted_failure_records_are_named_and_never_run(tmp_path, monkeypatch):
    from submitit.core.utils import FailedJobError

    import phalanx as px

    marker = tmp_path / "planted-code-ran"
    job = _handle(monkeypatch, tmp_path, [FailedJobError("the task raised")], [("FAILED", None)])
    planted = _plant_records(job.folder, job.job_id, marker)
    with pytest.raises(px.LaunchError) as info:  # no record of this user's tasks: the job just failed
        job.result()
    _assert_refused(str(info.value), planted, marker)


def test_a_job_folder_that_others_can_write_is_refused_before_anything_is_read(tmp_path, monkeypatch):
    import phalanx as px

    job = _handle(monkeypatch, tmp_path, [AssertionError("submitit must not be asked")], [])
    job.folder.chmod(0o777)
    with pytest.raises(px.UntrustedFileError, match="chmod go-w"):
        job.result()


def test_the_job_folder_is_made_private(tmp_path):
    from phalanx.runners.slurm import _private_folder

    folder = tmp_path / "logs" / "slurm"
    _private_folder(folder)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    folder.chmod(0o755)  # an existing folder of an older phalanx
    _private_folder(folder)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700


# -- a requeued job is not over while SLURM still holds it -------------------------------------------


@pytest.mark.parametrize(
    ("state", "run_started", "result_written", "verdict"),
    [
        ("PENDING", None, None, "queued"),
        ("REQUEUED", None, 100.0, "queued"),
        ("REQUEUE_HOLD", None, None, "queued"),
        ("RUNNING", 200.0, None, "queued"),  # no result yet: accounting's "ended" was an earlier run
        ("RUNNING", 200.0, 100.0, "queued"),  # the error is an earlier run's
        ("RUNNING", 200.0, 200.5, "ended"),  # this run's own result
        ("SUSPENDED", 200.0, None, "queued"),
        ("COMPLETING", 200.0, 200.5, "settling"),
        ("COMPLETED", None, 100.0, "ended"),
        ("FAILED", None, 100.0, "ended"),
        ("NODE_FAIL", None, None, "ended"),
        ("CANCELLED by 0", None, None, "ended"),
        (None, None, None, "ended"),
        ("", None, None, "ended"),
    ],
)
def test_what_the_controller_says_decides_whether_a_job_ended(state, run_started, result_written, verdict):
    from phalanx.runners.slurm import _queue_verdict

    assert _queue_verdict(state, run_started, result_written) == verdict


def test_a_job_that_slurm_requeued_after_accounting_showed_it_ended_is_waited_for(tmp_path, monkeypatch):
    """sacct shows NODE_FAIL for the first run of a job that SLURM requeued; squeue has it pending."""
    from submitit.core.utils import UncompletedJobError

    no_output = UncompletedJobError("Job 4242 (task: 0) has not produced any output (state: NODE_FAIL)")
    outcomes = [no_output, no_output, [[(0, 1, 1)]]]
    job = _handle(monkeypatch, tmp_path, outcomes, [("PENDING", None), ("RUNNING", time.time())], state="NODE_FAIL")
    assert job.result() == [(0, 1, 1)]
    assert job._job.cleared == 2  # submitit was made to read SLURM's state again each time


def test_a_job_whose_run_left_an_error_but_that_slurm_requeued_is_waited_for(tmp_path, monkeypatch):
    """The first run's error result is on disk, and SLURM runs the job again: the next run decides."""
    from submitit.core.utils import FailedJobError

    first_run = FailedJobError("Job (task=0) failed during processing")
    outcomes = [first_run, first_run, first_run, [[(0, 1, 1)]]]
    started = time.time()
    controller = [("COMPLETING", started - 5), ("PENDING", None), ("RUNNING", started + 60)]
    job = _handle(monkeypatch, tmp_path, outcomes, controller)
    job._job.paths.result_pickle.write_bytes(b"the first run's error")
    assert job.result() == [(0, 1, 1)]


def test_a_running_job_whose_run_failed_is_reported_at_once(tmp_path, monkeypatch):
    from submitit.core.utils import FailedJobError

    import phalanx as px

    job = _handle(monkeypatch, tmp_path, [FailedJobError("the task raised")], [("RUNNING", time.time() - 60)])
    job._job.paths.result_pickle.write_bytes(b"this run's error")
    with pytest.raises(px.LaunchError, match="ended without a result"):
        job.result()


def test_a_job_the_controller_no_longer_holds_ended_without_a_result(tmp_path, monkeypatch):
    from submitit.core.utils import UncompletedJobError

    import phalanx as px

    no_output = UncompletedJobError("has not produced any output")
    job = _handle(monkeypatch, tmp_path, [no_output], [(None, None)], state="CANCELLED by 0")
    with pytest.raises(px.LaunchError, match=r"SLURM job 4242 ended without a result \(CANCELLED by 0\)"):
        job.result()


CHECKPOINT_THEN_REQUEUE = """
import subprocess, sys
import phalanx as px
from phalanx.runners.slurm import _RequeuableTask

task = _RequeuableTask(print, (), {}, px.Platform(cluster="slurm", requeue=True), sys.argv[1], b"0" * 32)
task.checkpoint()  # what submitit's SIGUSR2 handler calls before it runs `scontrol requeue`
# The requeue makes slurmstepd SIGTERM every process of the step: here, the stand-in for scontrol.
done = subprocess.run(["sh", "-c", "kill -TERM $$; echo finished"], capture_output=True, text=True)
print(done.returncode, done.stdout.strip())
"""


def test_the_requeue_command_outlives_the_sigterm_that_the_requeue_sends(tmp_path):
    """Else `scontrol requeue` can die of it, and a requeue that happened reads as a failed rank."""
    done = subprocess.run(
        [sys.executable, "-c", CHECKPOINT_THEN_REQUEUE, str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0", "finished"], done.stdout + done.stderr
