"""The joining runner: the processes already exist (torchrun, srun, mpirun); join, run, gather.

Each process runs `fn` once as its own rank and gets back the list of every rank's value. A
rank that fails records its failure in the job's store before it raises, so that the ranks
that see only a lost peer can name the real cause in their `WorkerError`.
"""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from phalanx.dist import call_rank_function
from phalanx.environment import Environment
from phalanx.errors import LaunchError, RankFailure, WorkerError
from phalanx.platform import Platform
from phalanx.rendezvous import connect_store, host_store, interface_towards
from phalanx.worker import failure_record, rank_session

__all__ = ["run_joined"]

_FAILURE_KEY = "failure/{rank}"
# How long a failed rank waits, once its group is gone, for the others to record how they
# ended: torchrun stops every process once one has exited, and a rank still reading the
# cause from the store would be killed before it could report it.
_FAILURE_GRACE = timedelta(seconds=2)
_launches = 0


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
                stacklevel=4,
            )
        return environment.main_address(), environment.main_port()
    address = platform.master_addr if explicit_address else environment.main_address()
    return address, platform.master_port or environment.main_port()


def _join_store(environment: Environment, address: str, port: int, timeout: timedelta) -> dist.Store:
    if environment.global_rank() == 0 and not environment.hosts_store_externally():
        return host_store(address, port, timeout)
    return connect_store(address, port, timeout)


def _recorded_failures(store: dist.Store, world_size: int) -> list[RankFailure]:
    """Failures other ranks wrote to the store (the store may be gone with a failed rank 0)."""
    failures = []
    for rank in range(world_size):
        key = _FAILURE_KEY.format(rank=rank)
        try:
            if store.check([key]):
                failures.append(RankFailure.from_record(pickle.loads(store.get(key))))
        except Exception:
            break
    return failures


def _await_the_others(store: dist.Store, rank: int, world_size: int) -> None:
    """Wait (bounded) until every other rank has recorded its failure, or the store is gone."""
    keys = [_FAILURE_KEY.format(rank=other) for other in range(world_size) if other != rank]
    try:
        store.wait(keys, _FAILURE_GRACE)
    except Exception:  # a rank still busy elsewhere, or rank 0's store gone: report what is there
        pass


def run_joined(
    fn: Callable[..., Any],
    args: tuple,
    kwargs: dict[str, Any],
    platform: Platform,
    environment: Environment,
    gather: bool,
) -> Any:
    """Run `fn` as this process's rank; see `phalanx.launch` with `cluster="env"`.

    `platform` is resolved already, with n_procs set to the launcher's processes per node.
    """
    rank, world_size = environment.global_rank(), environment.world_size()
    local_rank, local_world_size = environment.local_rank(), environment.local_world_size()
    try:
        address, port = _rendezvous(platform, environment)
    except KeyError as missing:
        raise LaunchError(
            f"{environment.name} gives no address for rank 0's store ({missing} is not set): set MASTER_ADDR "
            "and MASTER_PORT, or Platform(master_addr=..., master_port=...)"
        ) from None
    timeout = platform.timeout_delta
    job = {
        "world_size": world_size,
        "local_world_size": local_world_size,
        "node_rank": environment.node_rank(),
        "master_addr": address,
        "master_port": port,
        "device": platform.device,
        "backend": platform.backend,
        "gloo_interface": interface_towards(address) if platform.backend == "gloo" else None,
        "timeout": timeout.total_seconds(),
        "n_cpus": platform.n_cpus,
        "seed": platform.seed,
    }
    try:
        # Each launch in these processes gets its own key space: a second launch under the
        # same torchrun must not meet the first one's keys in torchrun's store.
        store = dist.PrefixStore(f"phalanx/{_next_launch()}/", _join_store(environment, address, port, timeout))
    except Exception as error:
        raise LaunchError(
            f"rank {rank} ({environment.name}) could not reach the store at {address}:{port}: {error}. "
            "Set MASTER_ADDR and MASTER_PORT (or Platform(master_addr=..., master_port=...)) to an address "
            "of rank 0's host and a free port."
        ) from error
    failed: tuple[dict[str, Any], BaseException] | None = None
    with rank_session(job, rank, local_rank, store):
        try:
            value = call_rank_function(fn, args, kwargs)
        except SystemExit:
            # The process is leaving on purpose (submitit requeues a preempted job this way);
            # the launcher that owns it decides what that exit means.
            raise
        except BaseException as error:
            failed = failure_record(rank, error), error
            try:
                store.set(_FAILURE_KEY.format(rank=rank), pickle.dumps(failed[0]))
            except Exception:
                pass
        else:
            try:
                values = [None] * world_size
                dist.all_gather_object(values, value if gather or rank == 0 else None)
            except Exception as error:
                lost = RankFailure(rank, type(error).__qualname__, str(error), "", time=float("inf"))
                raise WorkerError([*_recorded_failures(store, world_size), lost]) from error
    if failed is not None:
        # The group is gone now, so ranks blocked in a collective with this one fail at once and
        # record it. A collective that failed because another rank went away: that rank's own
        # record, written before it left, is the cause (WorkerError puts lost peers last).
        record, error = failed
        _await_the_others(store, rank, world_size)
        others = [f for f in _recorded_failures(store, world_size) if f.rank != rank]
        raise WorkerError([RankFailure.from_record(record), *others]) from error
    return values if gather else values[0]
