"""The joining runner: the processes already exist (torchrun, srun, mpirun); join, run, gather.

Each process runs `fn` once as its own rank and gets back the list of every rank's value. A
rank that fails records its failure in the job's store before it raises, so that the ranks
that see only a lost peer can name the real cause in their `WorkerError`.

The store is signed with the job secret (`PHALANX_JOB_SECRET`) when the processes were given
one; without it (plain torchrun) it works unsigned, with a warning, and carries only JSON
records: nothing read from it is ever unpickled. Rank 0 writes a signed greeting first: the
other ranks wait for it at most `Platform.connect_timeout`, so a store that is not this job's
(a port someone else took, a rank 0 that never started) is an error within that bound.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from phalanx.rank_state import call_rank_function
from phalanx.environment import Environment, check_place
from phalanx.errors import LaunchError, RankFailure, WorkerError
from phalanx.job_secret import HOW_TO_SET, SECRET_VARIABLE, secret_from_environment
from phalanx.platform import Platform
from phalanx.rendezvous import connect_store, host_store, interface_towards
from phalanx.runners.worker import failure_record, rank_session

__all__ = ["run_joined"]

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
                stacklevel=4,
            )
        return environment.main_address(), environment.main_port()
    address = platform.master_addr if explicit_address else environment.main_address()
    return address, platform.master_port or environment.main_port()


def _join_store(
    environment: Environment, address: str, port: int, platform: Platform, secret: bytes | None
) -> dist.Store:
    timeout = platform.timeout_delta
    if environment.global_rank() == 0 and not environment.hosts_store_externally():
        return host_store(address, port, timeout, secret)
    return connect_store(address, port, timeout, secret, connect_timeout=platform.connect_timeout_delta)


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
            stacklevel=4,
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
    check_place(environment)
    rank, world_size = environment.global_rank(), environment.world_size()
    local_rank, local_world_size = environment.local_rank(), environment.local_world_size()
    secret = _secret_or_warning(environment)
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
        "connect_timeout": platform.connect_timeout_delta.total_seconds(),
        "secret": secret,
        "n_cpus": platform.n_cpus,
        "seed": platform.seed,
    }
    try:
        # Each launch in these processes gets its own key space: a second launch under the
        # same torchrun must not meet the first one's keys in torchrun's store.
        joined = _join_store(environment, address, port, platform, secret)
    except LaunchError:
        raise
    except Exception as error:
        raise LaunchError(
            f"rank {rank} ({environment.name}) could not reach the store at {address}:{port} within "
            f"connect_timeout={platform.connect_timeout_delta}: {error}. Set MASTER_ADDR and MASTER_PORT (or "
            "Platform(master_addr=..., master_port=...)) to an address of rank 0's host and a free port."
        ) from error
    store = dist.PrefixStore(f"phalanx/{_next_launch()}/", joined)
    _greet(store, rank, address, port, environment, platform.connect_timeout_delta)
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
                store.set(_FAILURE_KEY.format(rank=rank), json.dumps(failed[0]))
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
