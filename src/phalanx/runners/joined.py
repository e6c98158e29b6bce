"""The joined runner: the processes already exist (torchrun, srun, mpirun); join, run, gather.

Each process runs `fn` once as its own rank and gets back the list of every rank's value. A
rank that fails records its failure in the job's store before it raises, so that the ranks
that see only a lost peer can name the real cause in their `WorkerError`.

The store is signed with the job secret (`PHALANX_JOB_SECRET`) when the processes were given
one; without it (plain torchrun) it works unsigned, with a warning, and carries only JSON
records: nothing read from it is ever unpickled. Rank 0 writes a signed greeting first: the
other ranks wait for it at most `Platform.connect_timeout`, so a store that is not this job's
(a port someone else took, a rank 0 that never started) is an error within that bound.

A rank whose collective times out asks the others for their stacks through the store (each
runs a `StackResponder`), so its `HangError` says where every rank was, as a local launch's does.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from phalanx.environment import Environment, check_place
from phalanx.errors import LaunchError, RankFailure, WorkerError
from phalanx.job_secret import HOW_TO_SET, SECRET_VARIABLE, secret_from_environment
from phalanx.jobspec import JobSpec, joined_job_spec
from phalanx.platform import Platform
from phalanx.rank_state import call_rank_function
from phalanx.rendezvous import connect_store, host_store
from phalanx.runners.base import RunRequest
from phalanx.runners.hang_watch import StackResponder, collect_stacks, hang_error
from phalanx.runners.hangs import looks_like_timeout
from phalanx.runners.worker import failure_record, rank_session

__all__ = ["JoinedRunner", "platform_for", "run_joined"]

_FAILURE_KEY = "failure/{rank}"
_GREETING_KEY = "rank0-is-here"
# How long a failed rank waits, once its group is gone, for the others to record how they
# ended: torchrun stops every process once one has exited, and a rank still reading the
# cause from the store would be killed before it could report it.
_FAILURE_GRACE = timedelta(seconds=2)
_launches = 0
_warned_unsigned = False


def _next_launch() -> int:
    """The number of this launch in this process; every rank counts its launches alike."""
    global _launches
    _launches += 1
    return _launches


def _rendezvous(platform: Platform, environment: Environment) -> tuple[str, int]:
    """The store's address: an explicit Platform value wins over the launcher's.

    Except under torchrun, whose agent already serves the store: another address would be a
    store nobody serves, and every rank would wait for it until the timeout.
    """
    explicit_address = platform.master_addr != "127.0.0.1"
    if environment.hosts_store_externally():
        if explicit_address or platform.master_port is not None:
            warnings.warn(
                f"Platform(master_addr=..., master_port=...) is ignored under {environment.name}: its agent serves "
                f"the store at {environment.main_address()}:{environment.main_port()}",
                stacklevel=6,
            )
        return environment.main_address(), environment.main_port()
    address = platform.master_addr if explicit_address else environment.main_address()
    return address, platform.master_port or environment.main_port()


def _join_store(environment: Environment, job: JobSpec) -> dist.Store:
    address, port, timeout = job.master_addr, job.master_port, job.timeout_delta
    if environment.global_rank() == 0 and not environment.hosts_store_externally():
        return host_store(address, port, timeout, job.secret)
    return connect_store(address, port, timeout, job.secret, connect_timeout=job.connect_timeout_delta)


def _secret_or_warning(environment: Environment) -> bytes | None:
    """The job secret, or None after a one-time warning: plain torchrun jobs keep working."""
    global _warned_unsigned
    secret = secret_from_environment()
    if secret is None and not _warned_unsigned:
        _warned_unsigned = True
        warnings.warn(
            f"no job secret ({SECRET_VARIABLE}) is set under {environment.name}: the job's store is not signed, so "
            "another program that reaches it could disturb the rendezvous (phalanx never unpickles anything "
            f"from it). {HOW_TO_SET}",
            stacklevel=6,
        )
    return secret


def _greet(store: dist.Store, rank: int, address: str, port: int, environment: Environment, wait: timedelta) -> None:
    """Rank 0 says it is there; the others make sure, within `wait`, that the store is this job's."""
    if rank == 0:
        store.set(_GREETING_KEY, b"1")
        return
    try:
        store.wait([_GREETING_KEY], wait)
    except Exception as error:
        raise LaunchError(
            f"rank {rank} ({environment.name}) reached a store at {address}:{port}, but rank 0 of this job did not "
            f"show up there within connect_timeout={wait}: rank 0 failed to start (see its error), or another "
            "program listens on that port. Check MASTER_ADDR and MASTER_PORT (or Platform(master_addr=..., "
            "master_port=...)), or raise Platform(connect_timeout=...) if rank 0 starts much later."
        ) from error
    store.get(_GREETING_KEY)  # signed: a stranger's store fails here, naming the intrusion


def _recorded_failures(store: dist.Store, world_size: int) -> list[RankFailure]:
    """Failures other ranks wrote to the store (the store may be gone with a failed rank 0)."""
    failures = []
    for rank in range(world_size):
        key = _FAILURE_KEY.format(rank=rank)
        try:
            if not store.check([key]):
                continue
            raw = store.get(key)
        except LaunchError:
            raise  # signed, and this job did not write it: the intrusion is the error
        except Exception:
            break
        try:
            failures.append(RankFailure.from_record(json.loads(raw)))
        except (ValueError, KeyError, TypeError) as error:
            raise LaunchError(
                f"the store holds a failure record this job did not write (key {key!r}, not a phalanx record): "
                "another program is connected to the job's store. Nothing of it was used. Give the job a secret "
                f"({SECRET_VARIABLE}) so that its store is signed."
            ) from error
    return failures


def _await_the_others(store: dist.Store, rank: int, world_size: int) -> None:
    """Wait (bounded) until every other rank has recorded its failure, or the store is gone."""
    keys = [_FAILURE_KEY.format(rank=other) for other in range(world_size) if other != rank]
    try:
        store.wait(keys, _FAILURE_GRACE)
    except Exception:  # a rank still busy elsewhere, or rank 0's store gone: report what is there
        pass


def platform_for(platform: Platform, environment: Environment) -> Platform:
    """Resolve a platform for processes that already exist: their count is the launcher's."""
    local_world_size = environment.local_world_size()
    if platform.n_procs is not None and platform.n_procs != local_world_size:
        warnings.warn(
            f"Platform(n_procs={platform.n_procs}) is ignored: {environment.name} started {local_world_size} "
            "process(es) on this node, and phalanx joins them instead of starting its own.",
            stacklevel=5,
        )
    if platform.max_restarts:
        warnings.warn(
            f"Platform(max_restarts={platform.max_restarts}) does not restart processes that "
            f"{environment.name} started: a failure ends them, and their launcher restarts them "
            "(torchrun --max-restarts, SLURM requeue).",
            stacklevel=5,
        )
    joined = dataclasses.replace(platform, n_procs=local_world_size, n_gpus=None, cluster="env", max_restarts=0)
    return joined.resolve()


class JoinedRunner:
    """`launch` in processes a launcher started: this process runs its own rank, and gets every value.

    `request.platform` is resolved already, with n_procs set to the launcher's processes per
    node; `request.environment` is the launcher (detected, or given as Platform(environment=...)).
    """

    def __init__(self, request: RunRequest) -> None:
        self.request = request
        self.environment = request.environment

    def start(self) -> None:
        """Nothing starts: the process exists already; `wait` joins and runs."""
        check_place(self.environment)

    def stop(self) -> None:
        """Nothing to stop here: the launcher that owns the processes stops them."""

    def wait(self) -> Any:
        environment, platform = self.environment, self.request.platform
        rank, world_size = environment.global_rank(), environment.world_size()
        secret = _secret_or_warning(environment)
        try:
            address, port = _rendezvous(platform, environment)
        except KeyError as missing:
            raise LaunchError(
                f"{environment.name} gives no address for rank 0's store ({missing} is not set): set MASTER_ADDR "
                "and MASTER_PORT, or Platform(master_addr=..., master_port=...)"
            ) from None
        job = joined_job_spec(
            platform, world_size, environment.local_world_size(), environment.node_rank(), address, port, secret
        )
        try:
            joined = _join_store(environment, job)
        except LaunchError:
            raise
        except Exception as error:
            raise LaunchError(
                f"rank {rank} ({environment.name}) could not reach the store at {address}:{port} within "
                f"connect_timeout={platform.connect_timeout_delta}: {error}. Set MASTER_ADDR and MASTER_PORT (or "
                "Platform(master_addr=..., master_port=...)) to an address of rank 0's host and a free port."
            ) from error
        # Each launch in these processes gets its own key space: a second launch under the
        # same torchrun must not meet the first one's keys in torchrun's store.
        prefix = f"phalanx/{_next_launch()}/"
        store = dist.PrefixStore(prefix, joined)
        _greet(store, rank, address, port, environment, platform.connect_timeout_delta)
        responder = StackResponder(
            lambda: dist.PrefixStore(
                prefix, connect_store(address, port, job.timeout_delta, secret, job.connect_timeout_delta)
            ),
            rank,
            job.timeout_delta,
        )
        try:
            return self._run_rank(job, rank, environment.local_rank(), store)
        finally:
            responder.close(store)

    def _run_rank(self, job: JobSpec, rank: int, local_rank: int, store: dist.Store) -> Any:
        request = self.request
        failed: tuple[dict[str, Any], BaseException] | None = None
        stacks: dict[int, str] | None = None  # the other ranks' stacks, after a timeout here
        with rank_session(job, rank, local_rank, store):  # it puts the environment back at the end
            os.environ.update(request.rank_variables)
            try:
                value = call_rank_function(request.fn, request.args, dict(request.kwargs))
            except SystemExit:
                # The process is leaving on purpose (submitit requeues a preempted job this way);
                # the launcher that owns it decides what that exit means.
                raise
            except BaseException as error:
                failed = failure_record(rank, error), error
                try:
                    store.set(_FAILURE_KEY.format(rank=rank), json.dumps(failed[0]))
                except Exception:
                    pass
                own = RankFailure.from_record(failed[0])
                # A timeout: ask the others where they are before anything is torn down.
                stacks = collect_stacks(store, rank, job.world_size) if looks_like_timeout(own) else None
            else:
                try:
                    values = [None] * job.world_size
                    dist.all_gather_object(values, value if request.gather or rank == 0 else None)
                except Exception as error:
                    lost = RankFailure(rank, type(error).__qualname__, str(error), "", time=float("inf"))
                    raise WorkerError([*_recorded_failures(store, job.world_size), lost]) from error
        if failed is not None:
            # The group is gone now, so ranks blocked in a collective with this one fail at once and
            # record it. A collective that failed because another rank went away: that rank's own
            # record, written before it left, is the cause (WorkerError puts lost peers last).
            record, error = failed
            _await_the_others(store, rank, job.world_size)
            others = [f for f in _recorded_failures(store, job.world_size) if f.rank != rank]
            failures = [RankFailure.from_record(record), *others]
            if stacks is not None:
                raise hang_error(failures, stacks, list(range(job.world_size)), set()) from error
            raise WorkerError(failures) from error
        return values if request.gather else values[0]


def run_joined(
    fn: Callable[..., Any],
    args: tuple,
    kwargs: Mapping[str, Any],
    platform: Platform,
    environment: Environment,
    gather: bool,
    rank_variables: Mapping[str, str] | None = None,
) -> Any:
    """Run `fn` as this process's rank of the job `environment` places it in; every rank's value back.

    What `launch` does in processes a launcher started, and what a SLURM task does on its
    node: once, since the launcher that owns the processes is the one to restart them.
    """
    request = RunRequest(
        fn, args, kwargs, platform_for(platform, environment), gather, None, environment, dict(rank_variables or {})
    )
    runner = JoinedRunner(request)
    runner.start()
    return runner.wait()
