"""Submitting to SLURM with submitit: one task per rank, joined on the nodes, values back.

The callable that travels is a `_Task`: on each node it calls `launch` with `cluster="env"`, so
the tasks of the job join as ranks exactly as under `srun` by hand, and every task returns the
full list. A task that fails writes its failure record next to submitit's logs before it
raises, so the caller gets a `WorkerError` with the remote traceback, not a bare log path.
With `requeue=True` the task is checkpointable: on preemption or timeout submitit requeues the
job, and a function that saves and loads a `Context` continues from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pickle
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cloudpickle

from phalanx.channel import dumps_call
from phalanx.errors import LaunchError, PlatformError, RankFailure, WorkerError
from phalanx.platform import Platform

__all__ = ["SlurmJob", "submit_slurm"]


def _minutes(time: int | str | None) -> int:
    """SLURM's time formats ("MM", "MM:SS", "HH:MM:SS", "D-HH:MM:SS") or minutes, as minutes."""
    if time is None:
        return 60
    if isinstance(time, int):
        return time
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", time.strip())
    if match is None:
        raise PlatformError("time", time, "use minutes or SLURM's formats: 'MM', 'HH:MM:SS', 'D-HH:MM:SS'")
    days, first, second, third = (int(part) if part else 0 for part in match.groups())
    if match.group(4) is not None:  # HH:MM:SS
        seconds = first * 3600 + second * 60 + third
    elif match.group(3) is not None:  # MM:SS
        seconds = first * 60 + second
    else:
        seconds = first * 60
    return max(1, math.ceil((days * 86400 + seconds) / 60))


def _failure_path(folder: Path, job_id: str, rank: int) -> Path:
    return folder / f"{job_id}_rank{rank}_failure.pkl"


class _Task:
    """What runs on every task of the job: join as a rank, run the function, report."""

    def __init__(self, fn: Callable[..., Any], args: tuple, kwargs: dict[str, Any], platform: Platform, folder: str):
        # The call travels pickled, with the caller's import path: a function of the caller's
        # own modules is pickled by name, and the node must find that module where it is.
        self.call = dumps_call(fn, args, kwargs)
        self.sys_path = list(sys.path)
        self.platform = platform
        self.folder = folder

    def __call__(self) -> list[Any]:
        from phalanx.launch import launch

        sys.path[:0] = [entry for entry in self.sys_path if entry not in sys.path]
        fn, args, kwargs = cloudpickle.loads(self.call)
        # Validated here, on the node: the submitting machine may have no GPU at all.
        joined = dataclasses.replace(self.platform, cluster="env", n_procs=None, n_gpus=None)
        try:
            return launch(fn, *args, platform=joined, **kwargs)
        except WorkerError as error:
            rank, job_id = int(os.environ["SLURM_PROCID"]), os.environ["SLURM_JOB_ID"]
            own = [failure for failure in error.failures if failure.rank == rank]
            if own:
                _failure_path(Path(self.folder), job_id, rank).write_bytes(pickle.dumps(own[0]))
            raise


class _RequeuableTask(_Task):
    """A task submitit requeues on preemption or timeout (it has `checkpoint`)."""

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        import submitit

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
        return bool(self._job.done(force_check=True))

    def cancel(self) -> None:
        """Cancel the job (every task)."""
        self._job.cancel(check=False)

    def result(self) -> Any:
        """Wait for the job; every rank's value (rank 0's with gather=False), or `WorkerError`."""
        from submitit.core.utils import FailedJobError, UncompletedJobError

        try:
            per_task = self._job.results()
        except (FailedJobError, UncompletedJobError) as error:
            failures = self._failures()
            if failures:
                raise WorkerError(failures) from error
            raise LaunchError(
                f"SLURM job {self.job_id} ended without a result ({self.state}). The end of "
                f"{self.stderr_path}:\n{self._stderr_tail()}"
            ) from error
        values = per_task[0]
        return values if self._gather else values[0]

    def _stderr_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.stderr_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _failures(self) -> list[RankFailure]:
        failures = []
        for path in sorted(self.folder.glob(f"{self.job_id}_rank*_failure.pkl")):
            try:
                failures.append(pickle.loads(path.read_bytes()))
            except (OSError, pickle.UnpicklingError, EOFError):
                continue
        return failures

    def __repr__(self) -> str:
        return f"SlurmJob({self.job_id}, folder={str(self.folder)!r})"


def submit_slurm(
    fn: Callable[..., Any], args: tuple, kwargs: dict[str, Any], platform: Platform, gather: bool
) -> SlurmJob:
    """Submit `fn` as one SLURM job of `n_nodes` x `n_procs` tasks; returns at once."""
    try:
        import submitit
    except ImportError as error:
        raise LaunchError(
            'cluster="slurm" submits through submitit, which is not installed: pip install "phalanx[slurm]"'
        ) from error
    folder = Path(platform.log_dir).absolute() / "slurm"
    folder.mkdir(parents=True, exist_ok=True)
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    parameters: dict[str, Any] = {
        "nodes": platform.n_nodes,
        "tasks_per_node": platform.n_procs or 1,
        "timeout_min": _minutes(platform.time),
        "name": getattr(fn, "__name__", "phalanx"),
    }
    if platform.device in ("cuda", "gpu"):
        parameters["gpus_per_node"] = platform.n_procs or 1
    if platform.n_cpus is not None:
        parameters["cpus_per_task"] = platform.n_cpus
    if isinstance(platform.ram, int):
        parameters["mem_gb"] = platform.ram
    elif platform.ram is not None:
        parameters["slurm_mem"] = platform.ram
    for field, name in (("partition", "slurm_partition"), ("account", "slurm_account"), ("qos", "slurm_qos")):
        if getattr(platform, field) is not None:
            parameters[name] = getattr(platform, field)
    if platform.slurm_additional_parameters:
        parameters["slurm_additional_parameters"] = dict(platform.slurm_additional_parameters)
    executor.update_parameters(**parameters)
    task_type = _RequeuableTask if platform.requeue else _Task
    job = executor.submit(task_type(fn, args, kwargs, platform, str(folder)))
    return SlurmJob(job, folder, gather)
