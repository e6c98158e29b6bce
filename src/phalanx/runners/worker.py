"""What every rank does: take its environment, join the group, run the function, report back.

The same entry serves worker processes (`run_rank`) and a caller that takes part as a rank
(`caller_rank=`): `rank_session` sets the rank up and tears it down in both.
"""

from __future__ import annotations

import atexit
import contextlib
import faulthandler
import io
import os
import signal
import sys
import time
import traceback
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from phalanx import rank_state, variables
from phalanx.devices import select_rank_device
from phalanx.errors import SerializationError
from phalanx.jobspec import JobSpec
from phalanx.rendezvous import connect_store
from phalanx.runners.channel import dumps_value, encode, loads_call, write_frame
from phalanx.seeding import seed_everything

__all__ = ["failure_record", "importing_the_call", "rank_environment", "rank_session", "run_rank"]


_unpickling_call = False  # True while this rank imports what the call needs (see launch)


def importing_the_call() -> bool:
    """True while this worker unpickles its function, importing the modules it needs.

    `launch` refuses to start while this holds: a module that launches when it is imported
    would make every rank launch again.
    """
    return _unpickling_call


# A worker's rank session, held until os._exit: once dropped, the garbage collector would
# close it, and so destroy the group after all (see run_rank).
_sessions_left_open: list[contextlib.ExitStack] = []


def torchrun_environment(job: JobSpec, rank: int) -> dict[str, str]:
    """What torchrun's agent sets in a worker besides the place (torch's local_elastic_agent.py).

    The store at MASTER_ADDR:MASTER_PORT is the caller's, as torchrun's agent's is its own:
    TORCHELASTIC_USE_AGENT_STORE tells init_process_group's env:// to join it, not host one.
    """
    return {
        variables.ROLE_RANK: str(rank),
        variables.ROLE_NAME: job.role,
        variables.ROLE_WORLD_SIZE: str(job.world_size),
        variables.GROUP_WORLD_SIZE: str(job.world_size // job.local_world_size),
        variables.TORCHELASTIC_RESTART_COUNT: os.environ.get(variables.RESTART_COUNT, "0"),
        variables.TORCHELASTIC_MAX_RESTARTS: str(job.max_restarts),
        variables.TORCHELASTIC_RUN_ID: job.run_id,
        variables.TORCHELASTIC_USE_AGENT_STORE: "True",
        variables.TORCHELASTIC_ERROR_FILE: job.error_file,
        variables.TORCH_NCCL_ASYNC_ERROR_HANDLING: os.environ.get(variables.TORCH_NCCL_ASYNC_ERROR_HANDLING, "1"),
    }


def rank_environment(job: JobSpec, rank: int, local_rank: int) -> dict[str, str]:
    """The variables torch.distributed and user code read to know their place."""
    return {
        variables.RANK: str(rank),
        variables.LOCAL_RANK: str(local_rank),
        variables.WORLD_SIZE: str(job.world_size),
        variables.LOCAL_WORLD_SIZE: str(job.local_world_size),
        variables.NODE_RANK: str(job.node_rank),
        variables.GROUP_RANK: str(job.node_rank),
        variables.MASTER_ADDR: job.master_addr,
        variables.MASTER_PORT: str(job.master_port),
    }


_JOINED_COUNT = "phalanx/ranks-joined"
_ALL_JOINED = "phalanx/all-ranks-joined"


def _wait_for_every_rank(store: dist.Store, world_size: int) -> None:
    """Return once every rank has its group: a rank must not end while others still connect to it.

    gloo's full mesh is complete for one rank before it is for all: a rank whose function
    returns at once could exit while a peer still finishes its handshake with it, and that peer
    fails with "Connection closed by peer" (1 launch in 5 at 24 ranks here). One counter and one
    flag on the store, a few hundred microseconds; bounded by the store's timeout.
    """
    if world_size == 1:
        return
    if store.add(_JOINED_COUNT, 1) == world_size:
        store.set(_ALL_JOINED, b"1")
    else:
        store.wait([_ALL_JOINED])


@contextlib.contextmanager
def rank_session(job: JobSpec, rank: int, local_rank: int, store: dist.Store | None) -> Iterator[None]:
    """Be rank `rank` for the duration: environment, device, threads, seed, process group."""
    saved_environ = dict(os.environ)
    saved_threads = torch.get_num_threads()
    os.environ.update(rank_environment(job, rank, local_rank))
    if job.process_group == "lazy":
        os.environ.update(torchrun_environment(job, rank))
    try:
        device = select_rank_device(job.device, local_rank)
        if job.process_group == "lazy" and os.environ.get(variables.OMP_NUM_THREADS, "").isdigit():
            torch.set_num_threads(max(1, int(os.environ[variables.OMP_NUM_THREADS])))  # as a fresh process would
        elif job.n_cpus:
            torch.set_num_threads(job.n_cpus)
        timeout = job.timeout_delta
        if job.backend == "gloo" and job.gloo_interface is not None and "GLOO_SOCKET_IFNAME" not in os.environ:
            os.environ["GLOO_SOCKET_IFNAME"] = job.gloo_interface  # ranks on other hosts must reach this one
        if job.process_group == "eager":
            if store is None:
                store = connect_store(
                    job.master_addr, job.master_port, timeout, job.secret, connect_timeout=job.connect_timeout_delta
                )
            dist.init_process_group(job.backend, store=store, rank=rank, world_size=job.world_size, timeout=timeout)
            _wait_for_every_rank(store, job.world_size)
        else:  # the script makes its group (env://), or a phalanx helper does on first use
            rank_state.allow_lazy_group(job.backend, timeout)
        rank_state.enter_rank(rank_state.RankPlace(device, local_rank, job.local_world_size, job.node_rank))
        if job.seed is not None:
            seed_everything(job.seed)
        yield
    finally:
        # The caller's own rank can be interrupted (another rank failed) while this runs: put
        # its environment back first, so that nothing of the rank is left in the caller.
        try:
            os.environ.clear()
            os.environ.update(saved_environ)
            torch.set_num_threads(saved_threads)
            rank_state.leave_rank()
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()


def _user_traceback(error: BaseException) -> str:
    """The traceback from the user's function down: phalanx's own calls of it are left out."""
    tb = error.__traceback__
    if tb is not None and tb.tb_next is not None:
        tb = tb.tb_next  # the frame that caught the error
    if tb is not None and tb.tb_next is not None and tb.tb_frame.f_code is rank_state.call_rank_function.__code__:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(error), error, tb))


def failure_record(rank: int, error: BaseException, during: str = "run") -> dict[str, Any]:
    """A failure as plain values (JSON can carry it: records cross stores and files unpickled).

    `during` is "setup" for a rank that failed before the function started (it could not
    unpickle the call or join the group), "run" for a failure of the function itself.
    """
    record = {
        "rank": rank,
        "during": during,
        "exc_type": type(error).__qualname__,
        "message": str(error),
        "traceback": _user_traceback(error),
        "time": time.time(),
    }
    return record


def _fresh_standard_streams() -> None:
    """Line-buffered streams over descriptors 1 and 2, which the zygote pointed at the caller's pipes."""
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True, errors="replace")
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True, errors="replace")
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
    faulthandler.enable(file=sys.stderr)
    # A hang report asks every rank for its stack with SIGUSR1; this answers even while the
    # rank is blocked inside a collective. A copy of the descriptor, in case user code moves fd 2.
    faulthandler.register(signal.SIGUSR1, file=os.dup(2), all_threads=True, chain=False)


def _send(result_fd: int, message: dict[str, Any]) -> bool:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    try:
        write_frame(result_fd, encode(message))
    except OSError:
        return False
    return True


def run_rank(job: JobSpec, spec: dict[str, int], payload: bytes, result_fd: int) -> int:
    """Worker process entry: returns the exit code. Every outcome is reported on `result_fd`.

    A failure is reported before anything is torn down: the process ends right after, and a
    teardown (destroying an NCCL group with a collective pending) could block the report.

    Nor is the group destroyed after a success: every rank's function has returned, the
    user's exit handlers run with the group still there, and `os._exit` then closes its
    connections. `destroy_process_group` would add only gloo's shutdown (18 ms here) to
    every launch. (It once looked as if ending this way made store connections stall under
    many quick launches: those were c10d's reverse DNS lookups, see `phalanx.name_lookups`.)
    """
    _fresh_standard_streams()
    setup = job.worker_setup
    environ = dict(setup.environ, **{variables.ROLE: "worker"})
    if os.environ != environ:  # usually the same: the zygote was copied from the caller
        os.environ.clear()
        os.environ.update(environ)
    sys.path[:] = setup.sys_path
    with contextlib.suppress(OSError):
        os.chdir(setup.cwd)
    rank = spec["rank"]
    session = contextlib.ExitStack()
    _sessions_left_open.append(session)
    during = "setup"
    try:
        global _unpickling_call
        _unpickling_call = True  # a module imported now that launches at import time must not recurse
        try:
            fn, args, kwargs = loads_call(payload)
        finally:
            _unpickling_call = False
        session.enter_context(rank_session(job, rank, spec["local_rank"], store=None))
        during = "run"
        value = rank_state.call_rank_function(fn, args, kwargs)
        if not job.gather and rank != 0:
            value = None  # only rank 0's value goes back: save the transfer
        prefix = job.shared_prefix
        shared_prefix = f"{prefix}rank{rank}-" if prefix else None
        message = {"ok": dumps_value(value, f"the return value of rank {rank}", shared_prefix)}
    except BaseException as error:  # everything reaches the caller, SystemExit included
        if isinstance(error, SerializationError):
            error.__cause__ = None
        _send(result_fd, {"error": failure_record(rank, error, during)})
        return 1
    if not _send(result_fd, message):
        return 1
    try:
        atexit._run_exitfuncs()  # os._exit comes next: the user's exit handlers run here, group still up
    except BaseException:
        traceback.print_exc()
    return 0
