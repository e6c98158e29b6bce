"""`launch`: run one function on every rank of a platform and bring every result back."""

from __future__ import annotations

import dataclasses
import os
import sys
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import torch.distributed as dist

from phalanx.rank_state import call_rank_function
from phalanx.environment import Environment, detect_environment
from phalanx import variables
from phalanx.errors import LaunchError, PlatformError, WorkerError
from phalanx.platform import Platform
from phalanx.runners.local import run_local  # at import: the zygote, copied then, has it for every worker

if TYPE_CHECKING:
    from phalanx.runners.slurm import SlurmJob

__all__ = ["launch", "submit"]

T = TypeVar("T")


def launch(
    fn: Callable[..., T],
    *args: Any,
    platform: Platform | None = None,
    caller_rank: int | None = None,
    gather: bool = True,
    **kwargs: Any,
) -> list[T] | T:
    """Run `fn(*args, **kwargs)` on every rank of `platform`; return the values by global rank.

    `platform` defaults to `Platform()`: the best available device, one rank per visible GPU
    (or one CPU process).
    `caller_rank=k` makes the calling process rank k: it runs `fn` itself, so its objects stay
    here (notebooks). `gather=False` returns rank 0's value alone. A failing rank raises
    `WorkerError` with the remote traceback, after every other rank has been stopped.

    Example::

        def train(scale):
            return px.get_rank() * scale

        px.launch(train, 10, platform=px.Platform(device="cpu", n_procs=4))  # [0, 10, 20, 30]
    """
    if not callable(fn):
        raise TypeError(f"launch() needs a callable first, got {fn!r}")
    worker = sys.modules.get("phalanx.runners.worker")
    if worker is not None and worker._unpickling_call:
        raise LaunchError(
            f"launch() was called while a rank imported module {fn.__module__!r} to get the function to run: "
            "that module launches when it is imported, so every rank would launch again. Put the launch under "
            '`if __name__ == "__main__":` (or in a function) in that module.'
        )
    if os.environ.get(variables.RUN) == "1" and dist.is_initialized():
        return _run_in_current_group(fn, args, kwargs, gather)
    requested = platform or Platform()
    environment = None if requested.cluster == "slurm" else _environment_for(requested)
    if environment is not None:
        from phalanx.runners.env import run_joined

        _check_caller_rank(caller_rank, None)
        if requested.max_restarts:
            warnings.warn(
                f"Platform(max_restarts={requested.max_restarts}) does not restart processes that "
                f"{environment.name} started: a failure ends them, and their launcher restarts them "
                "(torchrun --max-restarts, SLURM requeue).",
                stacklevel=2,
            )
        joined = _resolve_for(dataclasses.replace(requested, max_restarts=0), environment)
        return run_joined(fn, args, kwargs, joined, environment, gather)
    failed_attempts: list[WorkerError] = []
    failed_meetings = 0
    while True:
        try:
            return _launch_once(fn, args, kwargs, requested, caller_rank, gather, len(failed_attempts))
        except LaunchError as error:
            # The ranks started but lost each other while connecting, before any user code ran:
            # seen under heavy CPU contention with several launches at once. Starting them again
            # is safe; a failure that repeats is real and is raised.
            if failed_meetings >= _MEETING_RETRIES or not _lost_each_other_while_meeting(error):
                raise
            failed_meetings += 1
            reason = str(error).splitlines()[0]
            print(f"phalanx: {reason}; the ranks lost each other while connecting: starting again", file=sys.stderr)
        except WorkerError as error:
            if len(failed_attempts) >= requested.max_restarts:
                if failed_attempts:
                    error.after_restarts(failed_attempts)
                raise
            failed_attempts.append(error)
            print(
                f"phalanx: {error.failures[0].summary().splitlines()[0]}; restarting every rank "
                f"(restart {len(failed_attempts)} of {requested.max_restarts})",
                file=sys.stderr,
                flush=True,
            )


_MEETING_RETRIES = 2


def _lost_each_other_while_meeting(error: LaunchError) -> bool:
    cause = error.__cause__
    return (
        isinstance(cause, WorkerError)
        and all(failure.during == "setup" for failure in cause.failures)
        and any(failure.lost_a_peer for failure in cause.failures)
    )


def _launch_once(
    fn: Callable[..., Any],
    args: tuple,
    kwargs: dict[str, Any],
    requested: Platform,
    caller_rank: int | None,
    gather: bool,
    restart: int,
) -> Any:
    """One attempt of `launch` on SLURM or here; `restart` counts the attempts before it."""
    if requested.cluster == "slurm":
        _check_caller_rank(caller_rank, None)
        job = submit(fn, *args, platform=requested, gather=gather, **kwargs)
        try:
            return job.result()
        except KeyboardInterrupt:
            job.cancel()  # Ctrl-C while waiting: the job must not run on without anyone waiting
            raise

    platform = requested.resolve()  # cluster "auto" with no launcher found, or "local"
    _check_caller_rank(caller_rank, platform)
    return run_local(fn, args, kwargs, platform, caller_rank, gather, {variables.RESTART_COUNT: str(restart)})


def submit(fn: Callable[..., Any], *args: Any, platform: Platform, gather: bool = True, **kwargs: Any) -> SlurmJob:
    """Submit `fn(*args, **kwargs)` to SLURM and return at once with a handle on the job.

    `platform.cluster` must be "slurm". The handle has `result()` (every rank's value, or
    `WorkerError`), `done()`, `cancel()`, `job_id` and the log paths.

    Example::

        job = px.submit(train, 0.1, platform=px.Platform(cluster="slurm", n_procs=4, partition="gpu"))
        print(job.job_id, job.stdout_path)
        accuracies = job.result()
    """
    if platform.cluster != "slurm":
        raise PlatformError(
            "cluster", platform.cluster, "submit() sends a job to SLURM", "Use cluster='slurm', or launch()."
        )
    from phalanx.runners.slurm import submit_slurm

    return submit_slurm(fn, args, kwargs, platform, gather)


def _run_in_current_group(fn: Callable[..., Any], args: tuple, kwargs: dict[str, Any], gather: bool) -> Any:
    """Inside a rank of `phalanx run`: the group exists already; run here and gather the values."""
    value = call_rank_function(fn, args, kwargs)
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value if gather or dist.get_rank() == 0 else None)
    return values if gather else values[0]


def _environment_for(platform: Platform) -> Environment | None:
    """The launcher to join: detected for cluster="auto", required for cluster="env"."""
    if platform.cluster not in ("auto", "env"):
        return None
    if platform.environment is not None:
        return platform.environment  # stated by hand (Platform(environment=...)): no detection
    environment = detect_environment()
    if environment is None and platform.cluster == "env":
        raise LaunchError(
            "Platform(cluster='env') joins processes that torchrun, srun or mpirun started, but none of their "
            "variables is set here (TORCHELASTIC_RUN_ID, SLURM_PROCID with SLURM_STEP_ID, OMPI_COMM_WORLD_RANK, "
            "PMI_RANK). Start this script with one of them, or use cluster='local' to start the ranks here."
        )
    return environment


def _resolve_for(platform: Platform, environment: Environment) -> Platform:
    """Resolve a platform for processes that already exist: their count is the launcher's."""
    local_world_size = environment.local_world_size()
    if platform.n_procs is not None and platform.n_procs != local_world_size:
        warnings.warn(
            f"Platform(n_procs={platform.n_procs}) is ignored: {environment.name} started {local_world_size} "
            "process(es) on this node, and phalanx joins them instead of starting its own.",
            stacklevel=3,
        )
    joined = dataclasses.replace(platform, n_procs=local_world_size, n_gpus=None, cluster="env")
    return joined.resolve()


def _check_caller_rank(caller_rank: int | None, platform: Platform | None) -> None:
    if caller_rank is None:
        return
    if platform is None:
        raise PlatformError(
            "caller_rank",
            caller_rank,
            "the processes were started by an external launcher and every one of them is already a rank",
            "Leave caller_rank unset under torchrun, srun or mpirun.",
            owner="launch",
        )
    if not (isinstance(caller_rank, int) and 0 <= caller_rank < platform.n_procs and platform.node_rank == 0):
        raise PlatformError(
            "caller_rank",
            caller_rank,
            f"it must be a rank on this node, between 0 and {platform.n_procs - 1}, or None",
            owner="launch",
        )
