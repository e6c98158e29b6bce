"""The hang watch: notice that a job stopped progressing, collect every rank's stack, report it.

Two signs of a hang: a rank's collective (or store wait) timed out, or a rank returned and
another had not returned `timeout` seconds later. Then every live rank is asked for its Python
stack before anything is stopped, and the job fails with a `HangError` whose verdict says who
waited in which collective and who never arrived (see `phalanx.runners.hangs`).

Ranks phalanx forked answer SIGUSR1 with a faulthandler dump on their stderr (`HangWatch`).
Ranks a launcher started (torchrun, srun, mpirun) are not phalanx's children: each runs a
`StackResponder` thread that answers a request on the job's store with its stack, and the rank
that saw the timeout collects them (`collect_stacks`).
"""

from __future__ import annotations

import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

import torch.distributed as dist

from phalanx.errors import HangError, LaunchError, RankFailure, WorkerError
from phalanx.runners.failure_log import FailureLog
from phalanx.runners.hangs import collective_in, hang_verdict, innermost_frame, looks_like_timeout, trim_dump
from phalanx.runners.processes import ProcessSet, Worker

__all__ = ["STACK_WAIT_SECONDS", "CallerRank", "HangWatch", "StackResponder", "collect_stacks", "hang_error"]

STACK_WAIT_SECONDS = 2.0  # at most, for every live rank's stack once a hang is detected
STACK_QUIET_SECONDS = 0.1  # a rank's stack dump is whole once it has written nothing for this long


def thread_stack(thread_id: int) -> str | None:
    """A thread's Python stack, newest frame first (as faulthandler writes it), or None if it is gone."""
    frame = sys._current_frames().get(thread_id)
    if frame is None:
        return None
    return "".join(traceback.format_list(traceback.extract_stack(frame)[::-1]))


def hang_error(failures: list[RankFailure], stacks: dict[int, str], ranks: list[int], returned: set[int]) -> HangError:
    """The `HangError` for `failures`, with the verdict read from the stacks and tracebacks.

    `ranks` are the ranks the report is about, `returned` those whose function had returned.
    """
    waiting: dict[int, str] = {}
    elsewhere: dict[int, str] = {}
    for failure in failures:
        collective = collective_in(failure.traceback, newest_first=False)
        if collective and looks_like_timeout(failure):
            waiting[failure.rank] = collective
        elif failure.rank not in stacks:
            elsewhere[failure.rank] = failure.summary().removeprefix(f"rank {failure.rank} ")
    for rank, stack in stacks.items():
        collective = collective_in(stack, newest_first=True)
        if collective:
            waiting[rank] = collective
        else:
            elsewhere[rank] = innermost_frame(stack)
    for rank in returned:
        if rank not in waiting:
            elsewhere.setdefault(rank, "had returned")
    never_arrived = [rank for rank in ranks if rank not in waiting] if waiting else sorted(stacks)
    return HangError(failures, stacks, hang_verdict(ranks, waiting, elsewhere), never_arrived)


class CallerRank:
    """The caller's own rank (`caller_rank=`), as the watch sees it: which thread runs it, and how to stop it."""

    def __init__(self, rank: int | None) -> None:
        self.rank = rank
        self.thread: int | None = None  # the thread running the function, while it runs
        self.interrupt: Callable[[], None] | None = None


@dataclass(eq=False)
class HangWatch:
    """Hang detection and stack collection for the workers of a `ProcessSet` (and the caller's rank).

    `lock` is the job's: it guards the failure log and the state here against the monitor
    thread, which calls `check` at the end of every pass. `stop_after_failure(rank)` stops the
    job once a report is complete.
    """

    timeout: float
    processes: ProcessSet
    failures: FailureLog
    lock: threading.Lock
    caller: CallerRank
    stop_after_failure: Callable[[int], None]
    detected: bool = False
    stacks: dict[int, str] = field(default_factory=dict)
    collect_until: float | None = None  # monotonic deadline while stacks are being collected
    _stack_workers: list[Worker] = field(default_factory=list)
    _last_stack_byte: float = 0.0
    _progress_deadline: float | None = None  # the first return + timeout: others must be done by then
    _first_returned: int | None = None

    @property
    def collecting(self) -> bool:
        return self.collect_until is not None

    def note_returned(self, rank: int) -> None:
        """A rank returned: from now on, every other rank has `timeout` seconds to do the same."""
        with self.lock:
            if self._progress_deadline is None:
                self._progress_deadline = time.monotonic() + self.timeout
                self._first_returned = rank
        self.processes.wake()

    def output_arrived(self) -> None:
        if self.collect_until is not None:
            self._last_stack_byte = time.monotonic()

    def next_deadline(self) -> float | None:
        deadlines = [self._progress_deadline, self.collect_until]
        if self.collect_until is not None:
            deadlines.append(self._last_stack_byte + STACK_QUIET_SECONDS)
        pending = [deadline for deadline in deadlines if deadline is not None]
        return min(pending) if pending else None

    def check(self, now: float) -> None:
        if self.collect_until is not None:
            complete = all(worker.exited or worker.stderr.captured_anything for worker in self._stack_workers)
            if now >= self.collect_until or (complete and now - self._last_stack_byte >= STACK_QUIET_SECONDS):
                self._finish_collecting()
        elif self._progress_deadline is not None and now >= self._progress_deadline:
            self._progress_deadline = None
            if not self.processes.stopping and not self.detected:
                self._on_no_progress()

    def _on_no_progress(self) -> None:
        """A rank returned `timeout` seconds ago and others still run: report them as hung."""
        stuck = [worker.rank for worker in self.processes.workers if not worker.exited and not worker.returned]
        if self.caller.thread is not None:
            stuck.append(self.caller.rank)
        if not stuck:
            return
        with self.lock:
            self.detected = True
            message = f"made no progress: it had not returned {self.timeout:g} s after rank {self._first_returned} did"
            for rank in sorted(stuck):
                self.failures.add(RankFailure(rank, exc_type="", message=message, traceback="", time=time.time()))
        if not self.start_collecting(stuck):
            self.stop_after_failure(min(stuck))

    def start_collecting(self, stuck: list[int] | None = None) -> bool:
        """Ask the live ranks for their stacks (SIGUSR1: faulthandler answers). False if none is live.

        Ranks that reported a failure are left out (their traceback says where they were),
        unless `stuck` names them: those were marked failed for not progressing.
        """
        if self.caller.thread is not None:
            stack = thread_stack(self.caller.thread)
            if stack is not None:
                self.stacks[self.caller.rank] = stack
        failed = self.failures.ranks() - set(stuck or ())
        live = [w for w in self.processes.workers if not w.exited and not w.returned and w.rank not in failed]
        if not live:
            return False
        for worker in live:
            worker.stderr.start_capture()
        with self.lock:
            self._stack_workers = live
            self._last_stack_byte = time.monotonic()
            self.collect_until = self._last_stack_byte + STACK_WAIT_SECONDS
        self.processes.signal(signal.SIGUSR1, leader_only=True, pids=[worker.pid for worker in live])
        self.processes.wake()
        return True

    def _finish_collecting(self) -> None:
        for worker in self._stack_workers:
            self.stacks[worker.rank] = trim_dump(worker.stderr.stop_capture())
        with self.lock:
            self.collect_until = None
            first = self.failures.first()
        self.stop_after_failure(first.rank)

    def error_for(self, failures: list[RankFailure], ranks: list[int]) -> WorkerError:
        """The error the caller raises: a `HangError` with every rank's stack after a hang."""
        if not self.detected:
            return WorkerError(failures)
        returned = {worker.rank for worker in self.processes.workers if worker.returned}
        return hang_error(failures, self.stacks, ranks, returned)


# -- ranks a launcher started ------------------------------------------------------------------------

_REQUEST_KEY = "hang/request/{rank}"
_STACK_KEY = "hang/stack/{rank}"
_FINISHED = b"finished"
_ASKED = b"stack"


class StackResponder:
    """A thread in a joined rank that answers a hang report's request with the rank's stack.

    It waits on the job's store (its own connection: a blocking wait holds the one it waits
    on) for its rank's request key; `close` writes that key itself so that the thread ends at
    once. Bounded: it waits at most the job's timeout in one go, and checks again.
    """

    def __init__(self, connect: Callable[[], dist.Store], rank: int, wait: timedelta) -> None:
        self._connect = connect
        self._rank = rank
        self._wait = wait
        self._function_thread = threading.get_ident()
        self._closed = threading.Event()
        self._store: dist.Store | None = None
        self._thread = threading.Thread(target=self._serve, name="phalanx-stacks", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        key = _REQUEST_KEY.format(rank=self._rank)
        try:
            self._store = self._connect()
            while not self._closed.is_set():
                try:
                    self._store.wait([key], self._wait)
                except LaunchError:
                    return  # a forged key: nothing of it is used
                except Exception:  # the timeout, or the store gone with the job
                    if self._closed.is_set() or not _still_there(self._store):
                        return
                    continue
                if self._store.get(key) != _ASKED:
                    return
                stack = thread_stack(self._function_thread) or "(the rank's thread had ended)"
                self._store.set(_STACK_KEY.format(rank=self._rank), stack.encode())
                return
        except Exception:
            return

    def close(self, store: dist.Store) -> None:
        """End the thread: the rank's function is over (it wakes through `store`, the rank's own)."""
        self._closed.set()
        try:
            store.compare_set(_REQUEST_KEY.format(rank=self._rank), "", _FINISHED)
        except Exception:
            pass
        self._thread.join(timeout=STACK_WAIT_SECONDS)


def _still_there(store: dist.Store) -> bool:
    try:
        store.check(["hang/alive"])
    except Exception:
        return False
    return True


def collect_stacks(store: dist.Store, rank: int, world_size: int, wait: float = STACK_WAIT_SECONDS) -> dict[int, str]:
    """Ask every other joined rank for its stack; those that answer within `wait` seconds, by rank."""
    others = [other for other in range(world_size) if other != rank]
    for other in others:
        try:
            store.compare_set(_REQUEST_KEY.format(rank=other), "", _ASKED)
        except Exception:
            return {}
    stacks: dict[int, str] = {}
    deadline = time.monotonic() + wait
    for other in others:
        key = _STACK_KEY.format(rank=other)
        try:
            store.wait([key], timedelta(seconds=max(0.001, deadline - time.monotonic())))
        except LaunchError:
            raise
        except Exception:  # not answered in time: a rank that is gone, or stuck holding the interpreter
            continue
        stacks[other] = trim_dump(store.get(key).decode("utf-8", errors="replace"))  # signed: checked on read
    return stacks
