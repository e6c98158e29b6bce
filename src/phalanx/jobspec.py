"""`JobSpec`: everything a rank needs to know, in one frozen, typed record.

Built once per launch from a resolved `Platform` (and, for processes a launcher started, its
`Environment`), it is the one record that crosses processes: the caller hands it to the
zygote, the zygote to each worker it forks, and the joined runner gives it to its own rank.
Every reader sees the same fields; what only forked workers need (the caller's environment,
import path and folder) is in `WorkerSetup`, None for ranks phalanx did not start.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta

from phalanx.platform import Platform
from phalanx.rendezvous import interface_towards
from phalanx.runners.shared_tensors import launch_prefix

__all__ = ["JobSpec", "WorkerSetup", "joined_job_spec", "local_job_spec"]


@dataclass(frozen=True)
class WorkerSetup:
    """What a forked worker copies from the caller before it becomes a rank."""

    environ: Mapping[str, str]
    sys_path: tuple[str, ...]
    cwd: str


@dataclass(frozen=True)
class JobSpec:
    """The job as every rank sees it: sizes, rendezvous, device, limits, and how values come back."""

    world_size: int
    local_world_size: int
    node_rank: int
    master_addr: str
    master_port: int
    device: str
    backend: str
    # gloo's interface on this node (the ranks set GLOO_SOCKET_IFNAME to it), found once here
    gloo_interface: str | None
    timeout: float  # seconds: collectives, the store, and the hang watch
    connect_timeout: float  # seconds a rank tries to reach the store
    # Every value on the store is signed with it; None only for joined ranks given none.
    secret: bytes | None = field(repr=False)
    n_cpus: int | None
    seed: int | None
    caller_rank: int | None = None
    gather: bool = True
    # values that cross nodes go through the store, where a shared memory file means nothing
    shared_prefix: str | None = None
    worker_setup: WorkerSetup | None = field(default=None, repr=False)
    # "eager": the rank joins its group before the function runs (launch). "lazy": the ranks
    # get torchrun's variables and no group until the script makes one (`phalanx run`).
    process_group: str = "eager"
    role: str = "default"  # torchrun's --role: ROLE_NAME
    run_id: str = "none"  # torchrun's --rdzv-id (its default, "none"): TORCHELASTIC_RUN_ID
    max_restarts: int = 0  # TORCHELASTIC_MAX_RESTARTS
    error_file: str = ""  # TORCHELASTIC_ERROR_FILE: where torch's @record writes a rank's error

    @property
    def timeout_delta(self) -> timedelta:
        return timedelta(seconds=self.timeout)

    @property
    def connect_timeout_delta(self) -> timedelta:
        return timedelta(seconds=self.connect_timeout)

    @property
    def first_rank(self) -> int:
        """The global rank of this node's local rank 0."""
        return self.node_rank * self.local_world_size

    @property
    def node_ranks(self) -> list[int]:
        """The global ranks of this node."""
        return list(range(self.first_rank, self.first_rank + self.local_world_size))

    def local_rank_of(self, rank: int) -> int:
        return rank - self.first_rank


def _gloo_interface(platform: Platform, address: str) -> str | None:
    return interface_towards(address) if platform.backend == "gloo" else None


def local_job_spec(
    platform: Platform,
    port: int,
    secret: bytes,
    caller_rank: int | None,
    gather: bool,
    rank_variables: Mapping[str, str],
    torchrun_style: bool = False,
    role: str = "default",
    run_id: str = "none",
) -> JobSpec:
    """The spec of ranks this node starts: `platform` resolved, `port` the store's.

    `rank_variables` are added to the workers' environment only (the restart count, a
    sweep's CUDA_VISIBLE_DEVICES), never to the caller's.
    """
    return JobSpec(
        world_size=platform.world_size,
        local_world_size=platform.n_procs,
        node_rank=platform.node_rank,
        master_addr=platform.master_addr,
        master_port=port,
        device=platform.device,
        backend=platform.backend,
        gloo_interface=_gloo_interface(platform, platform.master_addr),
        timeout=platform.timeout_delta.total_seconds(),
        connect_timeout=platform.connect_timeout_delta.total_seconds(),
        secret=secret,
        n_cpus=platform.n_cpus,
        seed=platform.seed,
        caller_rank=caller_rank,
        gather=gather,
        shared_prefix=launch_prefix() if platform.n_nodes == 1 else None,
        worker_setup=WorkerSetup(environ={**os.environ, **rank_variables}, sys_path=tuple(sys.path), cwd=os.getcwd()),
        process_group="lazy" if torchrun_style else "eager",
        role=role,
        run_id=run_id,
        max_restarts=platform.max_restarts,
    )


def joined_job_spec(
    platform: Platform,
    world_size: int,
    local_world_size: int,
    node_rank: int,
    address: str,
    port: int,
    secret: bytes | None,
) -> JobSpec:
    """The spec of a process a launcher started, as its `Environment` places it."""
    return JobSpec(
        world_size=world_size,
        local_world_size=local_world_size,
        node_rank=node_rank,
        master_addr=address,
        master_port=port,
        device=platform.device,
        backend=platform.backend,
        gloo_interface=_gloo_interface(platform, address),
        timeout=platform.timeout_delta.total_seconds(),
        connect_timeout=platform.connect_timeout_delta.total_seconds(),
        secret=secret,
        n_cpus=platform.n_cpus,
        seed=platform.seed,
    )
