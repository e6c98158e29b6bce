"""The caller's own rank (`launch(..., caller_rank=k)`): the calling process is rank k for one launch.

It joins the job's store and group like a worker (the same `rank_session`), runs the function
in the calling thread, and records a failure on the job the way a worker's report is recorded.
Another rank's failure interrupts it (KeyboardInterrupt in the main thread), and it must not
start at all once a worker has failed.
"""

from __future__ import annotations

import _thread
import contextlib
import threading
from collections.abc import Callable
from typing import Any, Protocol

import torch.distributed as dist

from phalanx.errors import RankFailure
from phalanx.jobspec import JobSpec
from phalanx.rank_state import call_rank_function
from phalanx.runners.hang_watch import CallerRank
from phalanx.runners.worker import failure_record, rank_session

__all__ = ["CallerJob", "run_in_caller"]


class CallerJob(Protocol):
    """What the caller's rank needs of its job (the local runner's `LocalJob`)."""

    lock: threading.Lock
    caller: CallerRank

    def has_failures(self) -> bool: ...
    def fail(self, failure: RankFailure) -> None: ...
    def note_returned(self, rank: int) -> None: ...


def run_in_caller(
    fn: Callable[..., Any], args: tuple, kwargs: dict[str, Any], job: JobSpec, store: dist.Store, local_job: CallerJob
) -> tuple[Any, bool]:
    """Run the caller's own rank; a failure is recorded on the job. Returns (value, succeeded)."""
    rank = local_job.caller.rank
    interrupted = threading.Event()
    in_main_thread = threading.current_thread() is threading.main_thread()

    def interrupt() -> None:
        # Only while the function runs: once it returned, the rank's clean-up must not be cut short.
        with local_job.lock:
            if in_main_thread and local_job.caller.thread is not None and not interrupted.is_set():
                interrupted.set()
                _thread.interrupt_main()

    local_job.caller.interrupt = interrupt
    session = contextlib.ExitStack()
    try:
        try:
            session.enter_context(rank_session(job, rank, job.local_rank_of(rank), store))
        except Exception as error:  # joining failed, as a worker's set-up can: recorded the same way
            if not local_job.has_failures():
                local_job.fail(RankFailure.from_record(failure_record(rank, error, "setup")))
            return None, False
        with session:
            try:
                with local_job.lock:
                    # A worker that failed before this point could not interrupt the caller
                    # (there was nothing to interrupt yet): it must not start at all then.
                    local_job.caller.thread = threading.get_ident()
                    failed_already = local_job.has_failures()
                if failed_already:
                    return None, False
                value = call_rank_function(fn, args, kwargs)
                with local_job.lock:
                    local_job.caller.thread = None
                local_job.note_returned(rank)
                return value, True
            except BaseException as error:
                # Stamp and report before the session ends: tearing the group down makes the
                # workers fail too, and the cause must stay the earliest failure.
                if interrupted.is_set() or local_job.has_failures():
                    return None, False  # a worker failed first; this is the consequence
                if isinstance(error, KeyboardInterrupt):
                    raise
                local_job.fail(RankFailure.from_record(failure_record(rank, error)))
                return None, False
    finally:
        local_job.caller.interrupt = None
        local_job.caller.thread = None
