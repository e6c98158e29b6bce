"""`launch`: run one function on every rank of a platform and bring every result back."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch.distributed as dist

from phalanx import variables
from phalanx.environment import Environment, detect_environment
from phalanx.errors import LaunchError, PlatformError, WorkerError
from phalanx.platform import Platform
from phalanx.rank_state import call_rank_function, join_lazy_group
from phalanx.runners.base import Runner, RunRequest
from phalanx.runners.joined import run_joined
from phalanx.runners.local import LocalRunner  # at import: the zygote, copied then, has it for every worker
from phalanx.runners.nodes import NodesRunner
from phalanx.runners.slurm import SlurmJob, SlurmRunner, submit_slurm
from phalanx.runners.worker import importing_the_call

__all__ = ["launch", "run_job", "submit"]

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
    if importing_the_call():
        raise LaunchError(
            f"launch() was called while a rank imported module {fn.__module__!r} to get the function to run: "
            "that module launches when it is imported, so every rank would launch again. Put the launch under "
            '`if __name__ == "__main__":` (or in a function) in that module.'
        )
    if os.environ.get(variables.RUN) == "1" and join_lazy_group():  # in a rank of `phalanx run`
        return _run_in_current_group(fn, args, kwargs, gather)
    return run_job(fn, args, kwargs, platform or Platform(), caller_rank=caller_rank, gather=gather)


def run_job(
    fn: Callable[..., Any],
    args: tuple,
    kwargs: Mapping[str, Any],
    platform: Platform,
    caller_rank: int | None = None,
    gather: bool = True,
    rank_variables: Mapping[str, str] | None = None,
    torchrun_style: bool = False,
    role: str = "default",
    run_id: str = "none",
) -> Any:
    """`launch`'s policy, in one place for every runner: which runner, restarts, set-up retries.

    `rank_variables` are set in the ranks' environment only (`sweep` pins a point's GPU so).
    `torchrun_style` (`phalanx run`): ranks phalanx starts get every variable torchrun's agent
    sets (`role` is ROLE_NAME, `run_id` TORCHELASTIC_RUN_ID) and no process group until the
    script makes one with `init_process_group()` or a phalanx helper needs one.
    Processes a launcher started run once (their launcher restarts them); ranks phalanx
    starts are started again after a failure, up to `platform.max_restarts` times, and once
    more (twice at most) when they lost each other while connecting, before any user code ran.
    """
    rank_variables = dict(rank_variables or {})
    environment = None if platform.cluster == "slurm" else _environment_for(platform)
    if environment is not None:
        _check_caller_rank(caller_rank, None)
        return run_joined(fn, args, kwargs, platform, environment, gather, rank_variables)
    failed_attempts: list[WorkerError] = []
    failed_meetings = 0
    while True:
        variables_now = {**rank_variables, variables.RESTART_COUNT: str(len(failed_attempts))}
        try:
            style = {"torchrun_style": torchrun_style, "role": role, "run_id": run_id}
            return _run_once(_runner_for(fn, args, kwargs, platform, caller_rank, gather, variables_now, style))
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
            if len(failed_attempts) >= platform.max_restarts:
                if failed_attempts:
                    error.after_restarts(failed_attempts)
                raise
            failed_attempts.append(error)
            print(
                f"phalanx: {error.failures[0].summary().splitlines()[0]}; restarting every rank "
                f"(restart {len(failed_attempts)} of {platform.max_restarts})",
                file=sys.stderr,
                flush=True,
            )


def _runner_for(
    fn: Callable[..., Any],
    args: tuple,
    kwargs: Mapping[str, Any],
    requested: Platform,
    caller_rank: int | None,
    gather: bool,
    rank_variables: dict[str, str],
    style: dict[str, Any],
) -> Runner:
    """The runner for one attempt: SLURM's, or this machine's (one node or several)."""
    if requested.cluster == "slurm":
        _check_caller_rank(caller_rank, None)
        return SlurmRunner(RunRequest(fn, args, kwargs, requested, gather, rank_variables=rank_variables))
    platform = requested.resolve()  # cluster "auto" with no launcher found, or "local"
    _check_caller_rank(caller_rank, platform)
    request = RunRequest(fn, args, kwargs, platform, gather, caller_rank, rank_variables=rank_variables, **style)
    return NodesRunner(request) if platform.n_nodes > 1 else LocalRunner(request)


def _run_once(runner: Runner) -> Any:
    """Start, wait, and stop on Ctrl-C: one attempt of any runner."""
    runner.start()
    try:
        return runner.wait()
    except KeyboardInterrupt:
        runner.stop()
        raise


_MEETING_RETRIES = 2


def _lost_each_other_while_meeting(error: LaunchError) -> bool:
    cause = error.__cause__
    return (
        isinstance(cause, WorkerError)
        and all(failure.during == "setup" for failure in cause.failures)
        and any(failure.lost_a_peer for failure in cause.failures)
    )


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
