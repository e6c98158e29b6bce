"""The SLURM runner: submitit submits one task per rank; they join on the nodes; values come back.

The callable that travels is a `_Task`: on each node it joins as `launch` does under `srun`
(`phalanx.runners.joined.run_joined`), so the tasks of the job join as ranks exactly as by hand,
and every task returns the full list. A task that fails writes its failure record (JSON, mode
0600) next to submitit's logs before it raises, so the caller gets a `WorkerError` with the
remote traceback, not a bare log path. The job folder is private (0700): submitit keeps the
pickled task there, with the job's secret in it, and the caller unpickles the results it finds
there. With `requeue=True` the task is checkpointable: on preemption or timeout submitit
requeues the job, and a function that saves and loads a `Context` continues from its last
checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

from phalanx.environment import detect_environment
from phalanx.errors import LaunchError, RankFailure, UntrustedFileError, WorkerError
from phalanx.files import check_trusted_folder, read_trusted, write_atomically
from phalanx.job_secret import SECRET_FILE_VARIABLE, SECRET_VARIABLE, new_secret
from phalanx.platform import Platform
from phalanx.runners.base import RunRequest
from phalanx.runners.channel import dumps_call, loads_call
from phalanx.runners.joined import run_joined

__all__ = ["SlurmJob", "SlurmRunner", "submit_slurm"]

_FOLDER_MODE = 0o700
_RECORD_MODE = 0o600
# How SLURM's controller (squeue) can still hold a job that submitit already reports as ended,
# because accounting (sacct) shows its last run ended, or that run left an error behind: the job
# was requeued (preempted, timed out, a node failure, an `scontrol requeue`) and waits to run
# again, or runs again.
_WAITING_STATES = frozenset({"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD"})
_RUNNING_STATES = frozenset({"CONFIGURING", "RUNNING", "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED"})
# COMPLETING: a job ending for good, or a requeued one whose run is being torn down; wait and see.
_SETTLING_STATE = "COMPLETING"
_SETTLE_SECONDS = 60.0
_POLL_SECONDS = 2.0


def _failure_path(folder: Path, job_id: str, rank: int) -> Path:
    return folder / f"{job_id}_rank{rank}_failure.json"


# -- failure records: JSON, never pickles ---------------------------------------------------------

_RECORD_FIELDS: dict[str, tuple[type, ...]] = {
    "rank": (int,),
    "exc_type": (str,),
    "message": (str,),
    "traceback": (str,),
    "time": (int, float),
    "exit_code": (int, type(None)),
    "signal_name": (str, type(None)),
    "during": (str,),
}


def _failure_to_json(failure: RankFailure) -> bytes:
    return json.dumps({name: getattr(failure, name) for name in _RECORD_FIELDS}).encode()


def _failure_from_json(data: bytes) -> RankFailure:
    """The `RankFailure` a task wrote; `ValueError` saying why for anything else."""
    try:
        record = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"not a JSON record ({error})") from None
    if not isinstance(record, dict):
        raise ValueError(f"not a JSON object but {type(record).__name__}")
    if set(record) != set(_RECORD_FIELDS):
        raise ValueError(f"fields {sorted(record)}, expected {sorted(_RECORD_FIELDS)}")
    for name, types in _RECORD_FIELDS.items():
        value = record[name]
        if isinstance(value, bool) or not isinstance(value, types):
            raise ValueError(f"field {name!r} holds {type(value).__name__}")
    return RankFailure(**record)


def _queue_verdict(state: str | None, run_started: float | None = None, result_written: float | None = None) -> str:
    """Whether a job that submitit reports as ended has ended, by what SLURM's controller says.

    `state` is squeue's (None: the controller no longer lists the job), `run_started` when its
    current run started and `result_written` when the newest result file was written (None:
    there is none), both seconds since the epoch. "queued": requeued, it runs again (a result
    older than the current run is an earlier run's); "settling": COMPLETING, a requeue may
    follow; "ended": anything else.
    """
    words = (state or "").split()  # "CANCELLED by 0": the state is the first word
    name = words[0].upper() if words else ""
    if name in _WAITING_STATES:
        return "queued"
    if name in _RUNNING_STATES:
        if result_written is None or (run_started is not None and result_written < run_started):
            return "queued"
        return "ended"  # this run's own result: its failure is final
    if name == _SETTLING_STATE:
        return "settling"
    return "ended"


class _Task:
    """What runs on every task of the job: join as a rank, run the function, report."""

    def __init__(
        self,
        fn: Callable[..., Any],
        args: tuple,
        kwargs: dict[str, Any],
        platform: Platform,
        folder: str,
        secret: bytes,
        rank_variables: Mapping[str, str] | None = None,
    ):
        # The call travels pickled, with the caller's import path: a function of the caller's
        # own modules is pickled by name, and the node must find that module where it is.
        self.call = dumps_call(fn, args, kwargs)
        self.sys_path = list(sys.path)
        self.platform = platform
        self.folder = folder
        # The job secret travels only in here, in the private job folder: every task of the job
        # (and a requeued run, which loads the same file) gets the same one; no script, log or
        # environment of the submitting side holds it.
        self.secret = secret
        self.rank_variables = dict(rank_variables or {})  # the restart count, set in every rank

    def __repr__(self) -> str:  # never the secret
        return f"_Task(folder={self.folder!r})"

    def __call__(self) -> list[Any]:
        if not (os.environ.get(SECRET_VARIABLE) or os.environ.get(SECRET_FILE_VARIABLE)):  # the user's own wins
            os.environ[SECRET_VARIABLE] = self.secret.hex()
        sys.path[:0] = [entry for entry in self.sys_path if entry not in sys.path]
        fn, args, kwargs = loads_call(self.call)
        # Validated here, on the node: the submitting machine may have no GPU at all.
        joined = dataclasses.replace(self.platform, cluster="env", n_procs=None, n_gpus=None)
        environment = detect_environment()
        if environment is None:
            raise LaunchError(
                f"{self!r} runs as a task of an srun step, but no SLURM task variables are set here "
                "(SLURM_PROCID, SLURM_STEP_ID): submit it with phalanx.submit or cluster='slurm'"
            )
        try:
            return run_joined(fn, args, kwargs, joined, environment, gather=True, rank_variables=self.rank_variables)
        except WorkerError as error:
            rank, job_id = int(os.environ["SLURM_PROCID"]), os.environ["SLURM_JOB_ID"]
            own = [failure for failure in error.failures if failure.rank == rank]
            if own:
                path = _failure_path(Path(self.folder), job_id, rank)
                try:
                    write_atomically(path, _failure_to_json(own[0]), _RECORD_MODE)
                except OSError as write_error:  # the error itself still reaches the caller (its log)
                    print(f"phalanx: cannot write the failure record {path}: {write_error}", file=sys.stderr)
            raise


class _RequeuableTask(_Task):
    """A task submitit requeues on preemption or timeout (it has `checkpoint`)."""

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Called by submitit's SIGUSR2 handler, which then runs `scontrol requeue` and exits."""
        import submitit

        # The requeue makes slurmstepd send SIGTERM to every process of the step, the scontrol
        # that asked for it included. One killed before it exits turns a requeue that happened
        # into a failure of this rank (CalledProcessError, an error result the caller reads).
        # scontrol inherits a blocked SIGTERM and finishes; this process only logs SIGTERM
        # (submitit's handler) and leaves right after the requeue anyway.
        if hasattr(signal, "pthread_sigmask"):
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


class SlurmJob:
    """A handle on a submitted job: `result()`, `done()`, `cancel()`, `job_id`, log paths."""

    def __init__(self, job: Any, folder: Path, gather: bool) -> None:
        self._job = job
        self.folder = folder
        self._gather = gather

    @property
    def job_id(self) -> str:
        return str(self._job.job_id)

    @property
    def stdout_path(self) -> Path:
        """Task 0's standard output (submitit's log)."""
        return Path(self._job.paths.stdout)

    @property
    def stderr_path(self) -> Path:
        """Task 0's standard error (submitit's log)."""
        return Path(self._job.paths.stderr)

    @property
    def state(self) -> str:
        """SLURM's view of the job (PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, ...)."""
        return str(self._job.get_info().get("State", self._job.state))

    def done(self) -> bool:
        """True once the job's run has ended; a requeued job, waiting or running again, is not done."""
        if not self._job.done(force_check=True):
            return False
        return _queue_verdict(*self._controller_state(), self._result_written()) != "queued"

    def cancel(self) -> None:
        """Cancel the job (every task)."""
        self._job.cancel(check=False)

    def result(self) -> Any:
        """Wait for the job; every rank's value (rank 0's with gather=False), or `WorkerError`.

        A job that submitit reports as ended (accounting shows its run ended, or the run left an
        error) but that SLURM's controller still holds, requeued, is waited for: only the
        controller says whether a job is over.
        """
        from submitit.core.utils import FailedJobError, UncompletedJobError

        check_trusted_folder(self.folder)  # submitit unpickles the results it finds there
        settling_since: float | None = None
        while True:
            try:
                per_task = self._job.results()
                break
            except (FailedJobError, UncompletedJobError) as error:
                verdict = _queue_verdict(*self._controller_state(), self._result_written())
                if verdict == "ended":
                    self._raise_failure(error)
                if verdict == "settling":
                    if settling_since is None:
                        settling_since = time.monotonic()
                    elif time.monotonic() - settling_since > _SETTLE_SECONDS:
                        self._raise_failure(error)
                else:
                    settling_since = None
                # submitit keeps the first end it read for good; make it ask SLURM again.
                self._job.watcher.clear()
                time.sleep(_POLL_SECONDS)
        values = per_task[0]
        return values if self._gather else values[0]

    def _controller_state(self) -> tuple[str | None, float | None]:
        """The job's state as slurmctld has it now, and when its current run started.

        (None, None) when the controller no longer lists the job, or does not answer.
        """
        try:
            answer = subprocess.run(
                ["squeue", "-h", "-j", self.job_id, "-t", "all", "-o", "%T|%S"],
                capture_output=True,
                text=True,
                timeout=30,
            )
        except (OSError, subprocess.SubprocessError):
            return None, None
        lines = answer.stdout.splitlines() if answer.returncode == 0 else []
        if not lines or "|" not in lines[0]:
            return None, None
        state, start = lines[0].split("|", 1)
        try:
            started = datetime.fromisoformat(start.strip()).timestamp()
        except ValueError:  # "N/A", "Unknown"
            started = None
        return state.strip() or None, started

    def _result_written(self) -> float | None:
        """When the newest of the tasks' result files was written, or None if there is none."""
        times = []
        for task in range(self._job.num_tasks):
            try:
                times.append(self._job.task(task).paths.result_pickle.stat().st_mtime)
            except OSError:
                continue
        return max(times, default=None)

    def _raise_failure(self, error: Exception) -> NoReturn:
        failures, refused = self._failures()
        if failures:
            worker_error = WorkerError(failures)
            if refused:
                worker_error.args = (f"{worker_error}\n\n" + "\n".join(refused),)
            raise worker_error from error
        lines = [f"SLURM job {self.job_id} ended without a result ({self.state})."]
        runs = self._runs()
        if len(runs) > 1:
            described = ", ".join(f"{state} (exit {exit_code}, {elapsed})" for state, exit_code, elapsed in runs)
            lines.append(f"SLURM ran it {len(runs)} times (it was requeued): {described}.")
            if runs[-1][0] == "FAILED" and runs[-1][2] == "00:00:00":
                lines.append(
                    "The last run ended as it began: slurmd did not start the requeued job (its log on the node says "
                    "why, e.g. 'Job credential revoked' for a job started again within a second of its requeue)."
                )
        lines += refused
        lines += [f"The end of {self.stderr_path}:", self._stderr_tail()]
        raise LaunchError("\n".join(lines)) from error

    def _runs(self) -> list[tuple[str, str, str]]:
        """Every run of the job in SLURM's accounting, first to last: (state, exit code, elapsed)."""
        try:
            answer = subprocess.run(
                ["sacct", "-D", "-X", "-n", "-P", "-j", self.job_id, "-o", "State,ExitCode,Elapsed"],
                capture_output=True,
                text=True,
                timeout=30,
            )
        except (OSError, subprocess.SubprocessError):
            return []
        runs = []
        for line in answer.stdout.splitlines():
            fields = line.split("|")
            if len(fields) == 3:
                runs.append((fields[0], fields[1], fields[2]))
        return runs

    def _stderr_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.stderr_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _failures(self) -> tuple[list[RankFailure], list[str]]:
        """The tasks' failure records, and a line for each file that was refused or not a record.

        Nothing in these files is ever run: they are JSON, read only if this user wrote them
        in a folder no one else can write.
        """
        try:
            check_trusted_folder(self.folder)
        except UntrustedFileError as refusal:
            return [], [f"The failure records in {self.folder} were not read: {refusal}"]
        failures, refused = [], []
        for path in sorted(self.folder.glob(f"{self.job_id}_rank*_failure*")):
            try:
                failures.append(_failure_from_json(read_trusted(path)))
            except UntrustedFileError as refusal:
                refused.append(f"Refused failure record {path}: {refusal}")
            except ValueError as reason:
                refused.append(f"Ignored {path}: not a phalanx failure record ({reason}); nothing in it was run")
            except OSError as reason:
                refused.append(f"Could not read failure record {path}: {reason}")
        return failures, refused

    def __repr__(self) -> str:
        return f"SlurmJob({self.job_id}, folder={str(self.folder)!r})"


def _private_folder(folder: Path) -> None:
    """Create the job folder 0700, or make an existing one of this user private."""
    folder.mkdir(parents=True, exist_ok=True, mode=_FOLDER_MODE)
    # One that others could write into may already hold their files (a result submitit would unpickle).
    check_trusted_folder(folder)
    if stat.S_IMODE(folder.stat().st_mode) != _FOLDER_MODE:
        try:
            os.chmod(folder, _FOLDER_MODE)
        except OSError as error:
            raise LaunchError(
                f"cannot make the SLURM job folder {folder} private (chmod 700): {error}. It holds the pickled job "
                "and its secret; use a log_dir of your own."
            ) from error


def submit_slurm(
    fn: Callable[..., Any],
    args: tuple,
    kwargs: dict[str, Any],
    platform: Platform,
    gather: bool,
    rank_variables: Mapping[str, str] | None = None,
) -> SlurmJob:
    """Submit `fn` as one SLURM job of `n_nodes` x `n_procs` tasks; returns at once."""
    try:
        import submitit
    except ImportError as error:
        raise LaunchError(
            'cluster="slurm" submits through submitit, which is not installed: pip install "phalanx[slurm]"'
        ) from error
    folder = Path(platform.log_dir).absolute() / "slurm"
    _private_folder(folder)
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    slurm = platform.slurm
    parameters: dict[str, Any] = {
        "nodes": platform.n_nodes,
        "tasks_per_node": platform.n_procs or 1,
        "timeout_min": slurm.minutes,
        "name": getattr(fn, "__name__", "phalanx"),
    }
    if platform.device in ("cuda", "gpu"):
        parameters["gpus_per_node"] = platform.n_procs or 1
    if platform.n_cpus is not None:
        parameters["cpus_per_task"] = platform.n_cpus
    if isinstance(slurm.ram, int):
        parameters["mem_gb"] = slurm.ram
    elif slurm.ram is not None:
        parameters["slurm_mem"] = slurm.ram
    for field, name in (("partition", "slurm_partition"), ("account", "slurm_account"), ("qos", "slurm_qos")):
        if getattr(slurm, field) is not None:
            parameters[name] = getattr(slurm, field)
    if slurm.slurm_additional_parameters:
        parameters["slurm_additional_parameters"] = dict(slurm.slurm_additional_parameters)
    executor.update_parameters(**parameters)
    task_type = _RequeuableTask if slurm.requeue else _Task
    job = executor.submit(task_type(fn, args, kwargs, platform, str(folder), new_secret(), rank_variables))
    return SlurmJob(job, folder, gather)


class SlurmRunner:
    """`launch` with cluster="slurm": submit the job, wait for its result, cancel it on Ctrl-C."""

    def __init__(self, request: RunRequest) -> None:
        self.request = request
        self.job: SlurmJob | None = None

    def start(self) -> None:
        request = self.request
        self.job = submit_slurm(
            request.fn, request.args, dict(request.kwargs), request.platform, request.gather, request.rank_variables
        )

    def wait(self) -> Any:
        return self.job.result()

    def stop(self) -> None:
        """Cancel the job (Ctrl-C while waiting: it must not run on without anyone waiting)."""
        if self.job is not None:
            self.job.cancel()
