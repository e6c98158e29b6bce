"""What every runner is: the `Runner` protocol, and the `RunRequest` that `launch` hands one.

A runner is one engine (ranks forked here, processes a launcher started, nodes, SLURM, and
next Ray): `start` starts the ranks, `wait` returns every rank's value (rank 0's with
gather=False) or raises `WorkerError` / `LaunchError` once every rank has stopped, and `stop`
stops them (Ctrl-C). The policy around a runner (restarts, set-up retries, which runner) is
`launch`'s alone; a runner runs one attempt.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from phalanx.environment import Environment
from phalanx.platform import Platform

__all__ = ["RunRequest", "Runner"]


@dataclass(frozen=True)
class RunRequest:
    """One attempt of a launch, as `launch` asks a runner to make it."""

    fn: Callable[..., Any]
    args: tuple
    kwargs: Mapping[str, Any]
    # Resolved for the local and joined runners; as given for SLURM (it is resolved on the node).
    platform: Platform
    gather: bool = True
    caller_rank: int | None = None
    # The launcher that started these processes, for the joined runner; None otherwise.
    environment: Environment | None = None
    # Added to the ranks' environment only: the restart count, a sweep point's GPU.
    rank_variables: Mapping[str, str] = field(default_factory=dict)
    # `phalanx run`: torchrun's variables in every rank and no process group until the script
    # makes one (or a phalanx helper needs one); `role` and `run_id` are torchrun's --role, --rdzv-id.
    torchrun_style: bool = False
    role: str = "default"
    run_id: str = "none"


class Runner(Protocol):
    """One engine's way to run a `RunRequest`: start, wait, stop."""

    def start(self) -> None:
        """Start the ranks (or submit them); returns once they are on their way."""

    def wait(self) -> Any:
        """Every rank's value by global rank (rank 0's alone with gather=False), or the error."""

    def stop(self) -> None:
        """Stop every rank now; `wait` then returns or raises soon. Idempotent."""
