"""The local runner: N ranks on this machine, forked from the zygote, watched until none is left.

The caller hosts the store, asks the zygote for the workers (a `ProcessSet`), optionally runs
one rank itself (`phalanx.runners.caller`), and the job (`LocalJob`) turns what the processes
report into values and failures: the first failure stops every other rank (SIGTERM, then
SIGKILL), and a timeout or a rank that stops progressing starts a hang report
(`phalanx.runners.hang_watch`). `LocalRunner.wait` returns only when every worker has been
reaped. With `n_nodes > 1`, `phalanx.runners.nodes.NodesRunner` does the same on every node.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import cloudpickle
import torch.distributed as dist

from phalanx.errors import LaunchError, RankFailure, WorkerError
from phalanx.job_secret import new_secret
from phalanx.jobspec import JobSpec, local_job_spec
from phalanx.rendezvous import StoreListener
from phalanx.runners.base import RunRequest
from phalanx.runners.caller import run_in_caller
from phalanx.runners.channel import dumps_call, dumps_value
from phalanx.runners.failure_log import FailureLog, causes_first
from phalanx.runners.hang_watch import CallerRank, HangWatch
from phalanx.runners.hangs import looks_like_timeout
from phalanx.runners.output import RankOutput, rank_outputs
from phalanx.runners.processes import SIGNAL_GRACE_SECONDS, STOP_GRACE_SECONDS, ProcessSet, Worker
from phalanx.runners.shared_tensors import remove_shared_files
from phalanx.signals import StopSignal, signal_of

__all__ = ["LocalJob", "LocalRunner", "collect_values"]


class LocalJob:
    """The ranks of one launch on this node, seen from the caller: their processes, failures and hangs."""

    def __init__(
        self, job: JobSpec, worker_ranks: list[int], outputs: Callable[[int], tuple[RankOutput, RankOutput]]
    ) -> None:
        self.job = job
        self.lock = threading.Lock()
        self.failure_log = FailureLog()
        self.caller = CallerRank(job.caller_rank)
        self.processes = ProcessSet(job, worker_ranks, outputs, events=self)
        self.hangs = HangWatch(
            job.timeout, self.processes, self.failure_log, self.lock, self.caller, self._stop_after_failure
        )
        self.on_failure: Callable[[], None] | None = None  # tells the other nodes, if any
        self._batch: list[RankFailure] | None = None  # failures read in the monitor's current pass

    @property
    def workers(self) -> list[Worker]:
        return self.processes.workers

    @property
    def failures(self) -> list[RankFailure]:
        return self.failure_log.failures

    def has_failures(self) -> bool:
        return bool(self.failure_log)

    def start(self, payload: bytes, while_forking: Callable[[], None] | None = None) -> None:
        self.processes.start(payload, while_forking)

    def wait(self) -> None:
        self.processes.wait()

    def stop(self, signum: int = signal.SIGTERM, grace: float = STOP_GRACE_SECONDS) -> None:
        self.processes.stop(signum, grace)

    # -- what the processes report (ProcessEvents, from the monitor thread) ---------------------

    def pass_started(self) -> None:
        # Failures read in one pass are handled together, causes before lost peers.
        self._batch = []

    def message(self, worker: Worker, message: dict[str, Any]) -> None:
        if "ok" in message:
            worker.value = message["ok"]
            worker.returned = True
            self.note_returned(worker.rank)
        else:
            self.fail(RankFailure.from_record(message["error"]))

    def exited(self, worker: Worker, status: int, when: float) -> None:
        if worker.returned or self.failure_log.has_failed(worker.rank):
            return
        failure = FailureLog.from_exit(
            worker.rank, status, when, worker.stderr.tail_text(), self.processes.stopped_by_us
        )
        if failure is not None:
            self.fail(failure)

    def output_arrived(self) -> None:
        self.hangs.output_arrived()

    def pass_ended(self, now: float) -> None:
        batch, self._batch = self._batch or [], None
        for failure in causes_first(batch):
            self.fail(failure)
        self.hangs.check(now)

    def next_deadline(self) -> float | None:
        return self.hangs.next_deadline()

    # -- failures -----------------------------------------------------------------------------

    def fail(self, failure: RankFailure) -> None:
        """Record a failure and stop every rank (the first failure by time is the cause).

        A failure that says a collective timed out first has every live rank's stack
        collected, for the hang report; the ranks are stopped after that.
        """
        if self._batch is not None and threading.current_thread() is self.processes.monitor_thread:
            self._batch.append(failure)  # the monitor handles it at the end of its pass
            return
        with self.lock:
            self.failure_log.add(failure)
            if self.hangs.collecting:
                return  # stacks are being collected; the job stops when that is done
            collect = not self.hangs.detected and not self.processes.stopping and looks_like_timeout(failure)
            self.hangs.detected = self.hangs.detected or collect
        if collect and self.hangs.start_collecting():
            return
        self._stop_after_failure(failure.rank)

    def note_returned(self, rank: int) -> None:
        self.hangs.note_returned(rank)

    def _stop_after_failure(self, rank: int) -> None:
        if self.on_failure is not None:
            self.on_failure()
        self.stop()
        interrupt = self.caller.interrupt
        if interrupt is not None and rank != self.caller.rank:
            interrupt()

    def error_for(self, failures: list[RankFailure]) -> WorkerError:
        """The error the caller raises: a `HangError` with every rank's stack after a hang."""
        return self.hangs.error_for(failures, self.job.node_ranks)


class LocalRunner:
    """`launch` on this machine: the store here, the ranks forked from the zygote (see the module)."""

    def __init__(self, request: RunRequest) -> None:
        self.request = request
        self.platform = request.platform
        self._payload = dumps_call(request.fn, request.args, dict(request.kwargs))
        self._listener: StoreListener | None = None
        self._store: dist.Store | None = None
        self.job: JobSpec | None = None
        self.local_job: LocalJob | None = None
        self._caller_value: Any = None

    # -- what the nodes runner changes ------------------------------------------------------------

    def job_secret(self) -> bytes:
        """A fresh secret: on one machine nobody else ever needs it."""
        return new_secret()

    def open_store(self, secret: bytes) -> int:
        """Bind the store's port now (its socket listens first); returns the port."""
        self._listener = StoreListener(self.platform.master_addr, self.platform.master_port)
        return self._listener.port

    def start_store(self, secret: bytes) -> None:
        """Serve the store (while the zygote forks the workers)."""
        self._store = self._listener.host(self.platform.timeout_delta, secret)

    def finish(
        self, values: dict[int, bytes], failures: list[RankFailure]
    ) -> tuple[dict[int, bytes], list[RankFailure]]:
        """Every rank's values and failures, once this node's ranks are done."""
        return values, failures

    def close(self, finished: bool) -> None:
        """Release what `open_store` took (the listening socket: the port is free again).

        `finished`: every rank's outcome was read (`finish` returned).
        """
        self._store = None
        if self._listener is not None:
            self._listener.close()  # the store never started

    # -- the protocol ---------------------------------------------------------------------------

    def start(self) -> None:
        request, platform = self.request, self.platform
        secret = self.job_secret()
        port = self.open_store(secret)
        try:
            self.job = local_job_spec(
                platform,
                port,
                secret,
                request.caller_rank,
                request.gather,
                request.rank_variables,
                request.torchrun_style,
                request.role,
                request.run_id,
            )
            ranks = [rank for rank in self.job.node_ranks if rank != request.caller_rank]
            self.local_job = LocalJob(self.job, ranks, lambda rank: rank_outputs(rank, platform))
            self.watch_other_nodes(self.local_job)
            self.local_job.start(self._payload, lambda: self.start_store(secret))
        except BaseException:
            self.close(False)
            if self.job is not None:
                remove_shared_files(self.job.shared_prefix)
            raise

    def watch_other_nodes(self, local_job: LocalJob) -> None:
        """On several nodes: stop this node's ranks when another node's fail (nothing to do on one)."""

    def stop(self) -> None:
        if self.local_job is not None:
            self.local_job.stop()

    def wait(self) -> Any:
        request, local_job, job = self.request, self.local_job, self.job
        finished = False
        try:
            try:
                try:
                    if request.caller_rank is not None:
                        self._caller_value, _ = run_in_caller(
                            request.fn, request.args, dict(request.kwargs), job, self.store_for_caller(), local_job
                        )
                    local_job.wait()
                except KeyboardInterrupt as interruption:
                    # Ctrl-C, or SIGTERM / SIGHUP (phalanx.signals): the ranks get the same signal.
                    local_job.stop(signal_of(interruption), SIGNAL_GRACE_SECONDS)
                    local_job.wait()
                    # A stop signal ends the job even when a rank failed on it (its handler
                    # exited): that failure must not be restarted. Ctrl-C after a rank's own
                    # failure (the caller's rank interrupted) reports that failure.
                    if not local_job.failures or isinstance(interruption, StopSignal):
                        raise
                internal_error = local_job.processes.internal_error
                if internal_error is not None:
                    raise LaunchError(f"phalanx lost track of the workers: {internal_error!r}") from internal_error
                values = {worker.rank: worker.value for worker in local_job.workers if worker.value is not None}
                failures = list(local_job.failures)
                if request.caller_rank is not None and not failures and self.platform.n_nodes > 1:
                    values[request.caller_rank] = dumps_value(
                        self._caller_value, f"the return value of rank {request.caller_rank}"
                    )
                values, failures = self.finish(values, failures)
                finished = True
            finally:
                local_job.stop()
                local_job.wait()
                self.close(finished)
        except BaseException:
            remove_shared_files(job.shared_prefix)
            raise
        if failures:
            remove_shared_files(job.shared_prefix)  # what a failed or stopped rank left unmapped
            error = local_job.error_for(failures)
            if error.failures[0].during == "setup":
                raise LaunchError(f"the ranks could not start or meet: {error}") from error
            raise error
        try:
            result = collect_values(values, job.world_size, request.gather)
        finally:
            remove_shared_files(job.shared_prefix)
        caller_rank = request.caller_rank
        if caller_rank is not None:  # the caller's own value is the object itself, not a copy
            if request.gather:
                result[caller_rank] = self._caller_value
            elif caller_rank == 0:
                result = self._caller_value
        return result

    def store_for_caller(self) -> dist.Store:
        return self._store


def collect_values(values: dict[int, bytes], world_size: int, gather: bool) -> Any:
    """The ranks' pickled values as the caller's list by rank (rank 0's alone with gather=False)."""
    result: list[Any] = [None] * world_size
    for rank, value in values.items():
        if not (gather or rank == 0):
            continue
        try:
            result[rank] = cloudpickle.loads(value)
        except Exception as error:
            raise WorkerError(
                [
                    RankFailure(
                        rank=rank,
                        exc_type=type(error).__qualname__,
                        message=f"its return value cannot be unpickled in the caller: {error}",
                        traceback="",
                        time=time.time(),
                    )
                ]
            ) from error
    return result if gather else result[0]
