"""The local runner: N ranks on this machine, forked from the zygote, watched until none is left.

The caller hosts the store, asks the zygote for the workers, optionally runs one rank itself,
and a monitor thread reads three pipes per worker (result frames, stdout, stderr) and the
zygote's exit reports. The first failure stops every other rank: SIGTERM, then SIGKILL after a
short grace period. `run_local` returns only when every worker has been reaped.
"""

from __future__ import annotations

import _thread
import contextlib
import errno
import fcntl
import os
import selectors
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import cloudpickle
import torch.distributed as dist

from phalanx.runners.channel import FrameReader, decode, dumps_call, dumps_value, encode, read_frame, write_frame
from phalanx.rank_state import call_rank_function
from phalanx.errors import HangError, LaunchError, RankFailure, WorkerError
from phalanx.runners.hangs import collective_in, hang_verdict, innermost_frame, looks_like_timeout, trim_dump
from phalanx.job_secret import HOW_TO_SET, new_secret, secret_from_environment
from phalanx.runners.output import RankOutput
from phalanx.platform import Platform
from phalanx.rendezvous import StoreListener, connect_store, host_store, interface_towards
from phalanx.runners.nodes import NodeGroup
from phalanx.runners.shared_tensors import launch_prefix, remove_shared_files
from phalanx.runners.worker import failure_record, rank_session
from phalanx.runners.zygote import check_limits, get_zygote

__all__ = ["STOP_GRACE_SECONDS", "run_local"]

STOP_GRACE_SECONDS = 2.0  # between SIGTERM and SIGKILL when ranks are stopped
_STACK_WAIT_SECONDS = 2.0  # at most, for every live rank's stack once a hang is detected
_STACK_QUIET_SECONDS = 0.1  # a rank's stack dump is whole once it has written nothing for this long
_START_TIMEOUT_SECONDS = 60.0  # for the zygote to confirm that the workers exist


@dataclass
class _Worker:
    rank: int
    result_fd: int
    stdout: RankOutput
    stderr: RankOutput
    output_fds: dict[int, RankOutput] = field(default_factory=dict)
    frames: FrameReader = field(default_factory=FrameReader)
    pid: int = 0
    value: bytes | None = None
    returned: bool = False
    exited: bool = False


def _describe_exit(status: int) -> tuple[str, int | None, str | None]:
    code = os.waitstatus_to_exitcode(status)
    if code >= 0:
        return f"exited with code {code} before returning a result", code, None
    name = signal.Signals(-code).name
    crash = {"SIGSEGV": " (segmentation fault)", "SIGBUS": " (bus error)", "SIGABRT": " (aborted)"}
    return f"was killed by signal {name}{crash.get(name, '')}", None, name


def _crash_report(stderr_tail: str) -> str:
    """faulthandler's report of a crash, cut below phalanx's own call of the function."""
    start = stderr_tail.find("Fatal Python error")
    if start < 0:
        return ""
    lines = stderr_tail[start:].splitlines()
    for index, line in enumerate(lines):
        if "in run_rank" in line:
            lines = lines[:index]
            break
    return "\n".join(lines)


class LocalJob:
    """The workers of one launch, seen from the caller."""

    def __init__(self, job: dict[str, Any], worker_ranks: list[int], platform: Platform) -> None:
        self.job = job
        self.platform = platform
        self.workers = [self._make_worker(rank) for rank in worker_ranks]
        self.failures: list[RankFailure] = []
        self.internal_error: BaseException | None = None
        self.done = threading.Event()
        self._stopping = False
        self._stopped_at: float | None = None
        self._kill_at: float | None = None
        self._killed = False
        self._killed_at: float | None = None  # when phalanx itself escalated to SIGKILL
        self._closed = False  # the job socket and the wake pipe are closed
        self._lock = threading.Lock()
        self._job_socket = None
        self._selector = selectors.DefaultSelector()
        self._wake_read, self._wake_write = os.pipe()  # stop() wakes the monitor through it
        self._owned_fds: set[int] = set()
        self._interrupt_caller: Callable[[], None] | None = None
        self.on_failure: Callable[[], None] | None = None  # tells the other nodes, if any
        # Hang reports (see phalanx.runners.hangs): every live rank's stack, asked for before the stop.
        self.hang_detected = False
        self.stacks: dict[int, str] = {}
        self._collect_until: float | None = None  # monotonic deadline while stacks are being collected
        self._stack_workers: list[_Worker] = []
        self._last_stack_byte = 0.0
        self._progress_deadline: float | None = None  # the first return + timeout: others must be done by then
        self._first_returned: int | None = None
        self._caller_thread: int | None = None  # the thread running the caller's rank, while it runs
        self._monitor_thread: threading.Thread | None = None
        self._batch: list[RankFailure] | None = None  # failures read in the monitor's current pass

    def _make_worker(self, rank: int) -> _Worker:
        show, prefix = self.platform.console_logs, self.platform.rank_prefix
        return _Worker(
            rank=rank,
            result_fd=-1,
            stdout=RankOutput(rank, "stdout", show, prefix),
            stderr=RankOutput(rank, "stderr", show, prefix),
        )

    # -- starting ---------------------------------------------------------------------------

    def start(self, payload: bytes, while_forking: Callable[[], None] | None = None) -> None:
        """Have the zygote fork the workers; `while_forking` runs in the meantime (it starts the store).

        Whatever fails on the way, the job's descriptors are closed and `done` is set (so that
        `wait` returns) before the error is raised: a `LaunchError`, or `while_forking`'s own.
        """
        write_ends: list[int] = []
        try:
            check_limits(len(self.workers))  # refused before any process or pipe exists
            try:
                for worker in self.workers:
                    # Each descriptor is owned the moment it exists: a pipe that fails (EMFILE)
                    # halfway through a rank leaves nothing unclosed.
                    worker.result_fd, result_write = os.pipe()
                    self._owned_fds.add(worker.result_fd)
                    write_ends.append(result_write)
                    with contextlib.suppress(OSError):  # fewer wake-ups for a large value (1 MiB: the usual limit)
                        fcntl.fcntl(result_write, fcntl.F_SETPIPE_SZ, 1 << 20)
                    for output in (worker.stdout, worker.stderr):
                        read_end, write_end = os.pipe()
                        worker.output_fds[read_end] = output
                        self._owned_fds.add(read_end)
                        write_ends.append(write_end)
                first = self.job["node_rank"] * self.job["local_world_size"]
                ranks = [{"rank": w.rank, "local_rank": w.rank - first} for w in self.workers]
                header = {"job": self.job, "ranks": ranks}
                self._job_socket = _spawn(header, payload, write_ends)
            except OSError as error:
                if error.errno in (errno.EMFILE, errno.ENFILE):
                    limit = "this process's (RLIMIT_NOFILE, `ulimit -n`)"
                    if error.errno == errno.ENFILE:
                        limit = "the machine's (fs.file-max)"
                    raise LaunchError(
                        f"cannot open the pipes of {len(self.workers)} ranks: {error}. The descriptor limit, "
                        f"{limit}, is reached: raise it or use fewer n_procs."
                    ) from error
                raise LaunchError(
                    f"could not hand the job to the zygote process: {error!r}; launch again "
                    "(set PHALANX_FORK_ZYGOTE=0 if this keeps happening)"
                ) from error
            finally:
                for fd in write_ends:
                    os.close(fd)
            if while_forking is not None:
                while_forking()
            self._watch()
        except BaseException:
            self._close_all()  # closing the job socket makes the zygote kill the job's workers
            self.done.set()
            raise

    def _watch(self) -> None:
        self._job_socket.settimeout(_START_TIMEOUT_SECONDS)
        try:
            # The zygote's first message; exit reports of workers already done stay in the
            # socket for the monitor.
            report = decode(read_frame(self._job_socket))
        except TimeoutError as error:
            raise LaunchError(
                f"the zygote process did not start the workers within {_START_TIMEOUT_SECONDS:g} s; "
                "launch again (set PHALANX_FORK_ZYGOTE=0 if this keeps happening)"
            ) from error
        except (EOFError, ConnectionError) as error:
            raise LaunchError("the zygote process died while starting the workers; launch again") from error
        if "error" in report:  # it could not start them all (a fork failed): it stopped those it had
            raise LaunchError(report["error"])
        pids = report["pids"]
        self._job_socket.setblocking(False)
        self._job_reader = FrameReader()
        for worker, pid in zip(self.workers, pids, strict=True):
            worker.pid = pid
            os.set_blocking(worker.result_fd, False)
            self._selector.register(worker.result_fd, selectors.EVENT_READ, ("result", worker))
            for fd, output in worker.output_fds.items():
                os.set_blocking(fd, False)
                self._selector.register(fd, selectors.EVENT_READ, ("output", output))
        self._selector.register(self._job_socket, selectors.EVENT_READ, ("job", None))
        self._selector.register(self._wake_read, selectors.EVENT_READ, ("wake", None))
        self._monitor_thread = threading.Thread(target=self._monitor, name="phalanx-monitor", daemon=True)
        self._monitor_thread.start()

    # -- watching ---------------------------------------------------------------------------

    def _monitor(self) -> None:
        try:
            while any(not worker.exited for worker in self.workers):
                # Failures read in one pass are handled together, causes before lost peers: a
                # rank whose collective timed out reports it before its exit makes the others
                # lose their peer, and the timeout must start the hang report.
                self._batch = []
                for key, _ in self._selector.select(self._next_wake_up()):
                    kind, owner = key.data
                    if kind == "job":
                        self._read_job_socket()
                    elif kind == "wake":
                        os.read(self._wake_read, 64)
                    elif kind == "result":
                        self._read_result(owner)
                    else:
                        self._read_output(key.fd, owner)
                batch, self._batch = self._batch, None
                for failure in sorted(batch, key=lambda failure: (failure.lost_a_peer, failure.time)):
                    self.fail(failure)
                self._check_hang(time.monotonic())
                if self._kill_at is not None and not self._killed and time.monotonic() >= self._kill_at:
                    self._killed = True
                    self._killed_at = time.time()
                    self._signal(signal.SIGKILL)
        except BaseException as error:  # never leave workers behind, whatever went wrong here
            self.internal_error = error
            with contextlib.suppress(Exception):
                self._job_socket.close()  # the zygote kills every worker of a job it loses
        finally:
            self._close_all()
            self.done.set()

    def _read_job_socket(self) -> None:
        try:
            data = self._job_socket.recv(65536)
        except BlockingIOError:
            return
        if not data:
            raise LaunchError("the zygote process died while the workers ran")
        for frame in self._job_reader.feed(data):
            message = decode(frame)
            worker = next(w for w in self.workers if w.pid == message["exit"])
            self._on_exit(worker, message["status"], message["time"])

    def _read_result(self, worker: _Worker) -> None:
        if worker.result_fd not in self._owned_fds:
            return
        try:
            frames, ended = worker.frames.read_from(worker.result_fd)
        except OSError:
            frames, ended = [], True
        for frame in frames:
            self._on_message(worker, decode(frame))
        if ended:
            self._forget(worker.result_fd)

    def _read_output(self, fd: int, output: RankOutput) -> None:
        for chunk in self._drain(fd):
            output.feed(chunk)
            if self._collect_until is not None:
                self._last_stack_byte = time.monotonic()

    def _drain(self, fd: int) -> list[bytes]:
        """Whatever the descriptor holds now; closes it at end of file."""
        chunks = []
        while True:
            try:
                chunk = os.read(fd, 1 << 20)
            except BlockingIOError:
                return chunks
            except OSError:
                chunk = b""
            if not chunk:
                self._forget(fd)
                return chunks
            chunks.append(chunk)

    def _forget(self, fd: int) -> None:
        """Stop watching and close a pipe this job owns (once: the number may be reused later)."""
        if fd not in self._owned_fds:
            return
        self._owned_fds.discard(fd)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(fd)
        with contextlib.suppress(OSError):
            os.close(fd)

    def _on_message(self, worker: _Worker, message: dict[str, Any]) -> None:
        if "ok" in message:
            worker.value = message["ok"]
            worker.returned = True
            self.note_returned(worker.rank)
        else:
            self.fail(RankFailure.from_record(message["error"]))

    def _on_exit(self, worker: _Worker, status: int, when: float) -> None:
        # The worker wrote everything before it exited: what is in the pipes now is all there is.
        self._read_result(worker)
        for fd, output in worker.output_fds.items():
            self._read_output(fd, output)
            self._forget(fd)
            output.close()
        self._forget(worker.result_fd)
        worker.exited = True
        if worker.returned or any(f.rank == worker.rank for f in self.failures):
            return
        description, code, signal_name = _describe_exit(status)
        stopped_by_us = (signal_name == "SIGTERM" and self._stopped_at is not None and when >= self._stopped_at) or (
            signal_name == "SIGKILL" and self._killed_at is not None and when >= self._killed_at
        )
        if stopped_by_us:
            return  # phalanx stopped it after another rank failed: not a failure of its own
        tail = worker.stderr.tail_text()
        crash_report = _crash_report(tail)
        self.fail(
            RankFailure(
                rank=worker.rank,
                exc_type="",
                message=description,
                traceback=crash_report,
                time=when,
                exit_code=code,
                signal_name=signal_name,
                output_tail=tail,
            )
        )

    # -- stopping ---------------------------------------------------------------------------

    def fail(self, failure: RankFailure) -> None:
        """Record a failure and stop every rank (the first failure by time is the cause).

        A failure that says a collective timed out first has every live rank's stack
        collected, for the hang report; the ranks are stopped after that.
        """
        if self._batch is not None and threading.current_thread() is self._monitor_thread:
            self._batch.append(failure)  # the monitor handles it at the end of its pass
            return
        with self._lock:
            self.failures.append(failure)
            if self._collect_until is not None:
                return  # stacks are being collected; the job stops when that is done
            collect = not self.hang_detected and not self._stopping and looks_like_timeout(failure)
            self.hang_detected = self.hang_detected or collect
        if collect and self._start_collecting():
            return
        self._stop_after_failure(failure.rank)

    def _stop_after_failure(self, rank: int) -> None:
        if self.on_failure is not None:
            self.on_failure()
        self.stop()
        interrupt = self._interrupt_caller
        if interrupt is not None and rank != self.job.get("caller_rank"):
            interrupt()

    # -- hang reports -----------------------------------------------------------------------

    def note_returned(self, rank: int) -> None:
        """A rank returned: from now on, every other rank has `timeout` seconds to do the same."""
        with self._lock:
            if self._progress_deadline is None:
                self._progress_deadline = time.monotonic() + self.job["timeout"]
                self._first_returned = rank
        self._wake()

    def _next_wake_up(self) -> float | None:
        deadlines = [self._progress_deadline, self._collect_until]
        if self._collect_until is not None:
            deadlines.append(self._last_stack_byte + _STACK_QUIET_SECONDS)
        if self._kill_at is not None and not self._killed:
            deadlines.append(self._kill_at)
        pending = [deadline for deadline in deadlines if deadline is not None]
        return max(0.0, min(pending) - time.monotonic()) if pending else None

    def _check_hang(self, now: float) -> None:
        if self._collect_until is not None:
            complete = all(worker.exited or worker.stderr.captured_anything for worker in self._stack_workers)
            if now >= self._collect_until or (complete and now - self._last_stack_byte >= _STACK_QUIET_SECONDS):
                self._finish_collecting()
        elif self._progress_deadline is not None and now >= self._progress_deadline:
            self._progress_deadline = None
            if not self._stopping and not self.hang_detected:
                self._on_no_progress()

    def _on_no_progress(self) -> None:
        """A rank returned `timeout` seconds ago and others still run: report them as hung."""
        caller_rank = self.job.get("caller_rank")
        stuck = [worker.rank for worker in self.workers if not worker.exited and not worker.returned]
        if self._caller_thread is not None:
            stuck.append(caller_rank)
        if not stuck:
            return
        seconds = self.job["timeout"]
        with self._lock:
            self.hang_detected = True
            message = f"made no progress: it had not returned {seconds:g} s after rank {self._first_returned} did"
            for rank in sorted(stuck):
                self.failures.append(RankFailure(rank, exc_type="", message=message, traceback="", time=time.time()))
        if not self._start_collecting(stuck):
            self._stop_after_failure(min(stuck))

    def _start_collecting(self, stuck: list[int] | None = None) -> bool:
        """Ask the live ranks for their stacks (SIGUSR1: faulthandler answers). False if none is live.

        Ranks that reported a failure are left out (their traceback says where they were),
        unless `stuck` names them: those were marked failed for not progressing.
        """
        caller_thread = self._caller_thread
        if caller_thread is not None:
            frame = sys._current_frames().get(caller_thread)
            if frame is not None:
                newest_first = traceback.format_list(traceback.extract_stack(frame)[::-1])
                self.stacks[self.job["caller_rank"]] = "".join(newest_first)
        failed = {failure.rank for failure in self.failures} - set(stuck or ())
        live = [w for w in self.workers if not w.exited and not w.returned and w.rank not in failed]
        if not live:
            return False
        for worker in live:
            worker.stderr.start_capture()
        with self._lock:
            self._stack_workers = live
            self._last_stack_byte = time.monotonic()
            self._collect_until = self._last_stack_byte + _STACK_WAIT_SECONDS
        self._signal(signal.SIGUSR1, leader_only=True, pids=[worker.pid for worker in live])
        self._wake()
        return True

    def _finish_collecting(self) -> None:
        for worker in self._stack_workers:
            self.stacks[worker.rank] = trim_dump(worker.stderr.stop_capture())
        with self._lock:
            self._collect_until = None
            first = min(self.failures, key=lambda failure: failure.time)
        self._stop_after_failure(first.rank)

    def error_for(self, failures: list[RankFailure]) -> WorkerError:
        """The error the caller raises: a `HangError` with every rank's stack after a hang."""
        if not self.hang_detected:
            return WorkerError(failures)
        waiting: dict[int, str] = {}
        elsewhere: dict[int, str] = {}
        for failure in failures:
            collective = collective_in(failure.traceback, newest_first=False)
            if collective and looks_like_timeout(failure):
                waiting[failure.rank] = collective
            elif failure.rank not in self.stacks:
                elsewhere[failure.rank] = failure.summary().removeprefix(f"rank {failure.rank} ")
        for rank, stack in self.stacks.items():
            collective = collective_in(stack, newest_first=True)
            if collective:
                waiting[rank] = collective
            else:
                elsewhere[rank] = innermost_frame(stack)
        first = self.job["node_rank"] * self.job["local_world_size"]
        ranks = list(range(first, first + self.job["local_world_size"]))
        for worker in self.workers:
            if worker.returned and worker.rank not in waiting:
                elsewhere.setdefault(worker.rank, "had returned")
        never_arrived = [rank for rank in ranks if rank not in waiting] if waiting else sorted(self.stacks)
        return HangError(failures, self.stacks, hang_verdict(ranks, waiting, elsewhere), never_arrived)

    def stop(self) -> None:
        """SIGTERM every live worker now, SIGKILL after the grace period. Idempotent."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
            self._stopped_at = time.time()
            self._kill_at = time.monotonic() + STOP_GRACE_SECONDS
        self._signal(signal.SIGTERM)
        self._wake()

    def _wake(self) -> None:
        """Have the monitor thread look at its deadlines again."""
        with self._lock, contextlib.suppress(OSError):
            if not self._closed:
                os.write(self._wake_write, b"x")

    def _signal(self, signum: int, leader_only: bool = False, pids: list[int] | None = None) -> None:
        """Signal the job's workers (`pids`: only those) with their children, or `leader_only`."""
        # Under the lock, and only while open: once closed, the descriptor number may belong to
        # another launch's socket or store connection in this process.
        message = {"signal": int(signum), "leader_only": leader_only, "pids": pids}
        with self._lock, contextlib.suppress(OSError, AttributeError):
            if not self._closed:
                write_frame(self._job_socket.fileno(), encode(message))

    def _close_all(self) -> None:
        for worker in self.workers:
            self._forget(worker.result_fd)
            for fd in worker.output_fds:
                self._forget(fd)
        self._selector.close()
        for worker in self.workers:
            worker.stdout.close()
            worker.stderr.close()
        with self._lock:
            self._closed = True
            with contextlib.suppress(Exception):
                self._job_socket.close()
            for fd in (self._wake_read, self._wake_write):
                with contextlib.suppress(OSError):
                    os.close(fd)

    def wait(self) -> None:
        """Block until every worker has been reaped."""
        while not self.done.wait(0.5):
            pass


def _spawn(header: dict[str, Any], payload: bytes, write_ends: list[int]):
    """Hand the job to the zygote; a zygote that died since the last launch is replaced once."""
    zygote = get_zygote()
    try:
        return zygote.spawn(header, payload, write_ends)
    except OSError:
        if zygote.usable() and zygote.alive():
            raise  # it failed before a byte was sent (no descriptor left): the zygote is fine
        return get_zygote().spawn(header, payload, write_ends)


def _job_description(
    platform: Platform, port: int, caller_rank: int | None, gather: bool, secret: bytes | None
) -> dict[str, Any]:
    return {
        "world_size": platform.world_size,
        "local_world_size": platform.n_procs,
        "node_rank": platform.node_rank,
        "master_addr": platform.master_addr,
        "master_port": port,
        "device": platform.device,
        "backend": platform.backend,
        # gloo's interface on this node (the ranks set GLOO_SOCKET_IFNAME to it), found once here
        "gloo_interface": interface_towards(platform.master_addr) if platform.backend == "gloo" else None,
        "timeout": platform.timeout_delta.total_seconds(),
        "connect_timeout": platform.connect_timeout_delta.total_seconds(),
        # the job secret: every value on the store is signed with it (the zygote's socket pair
        # and the pipes it travels through belong to this user's processes alone)
        "secret": secret,
        "n_cpus": platform.n_cpus,
        "seed": platform.seed,
        "caller_rank": caller_rank,
        "gather": gather,
        # values that cross nodes go through the store, where a shared memory file means nothing
        "shared_prefix": launch_prefix() if platform.n_nodes == 1 else None,
        "environ": dict(os.environ),
        "sys_path": list(sys.path),
        "cwd": os.getcwd(),
    }


def _run_in_caller(fn, args, kwargs, job: dict, store, rank: int, local_job: LocalJob) -> tuple[Any, bool]:
    """Run the caller's own rank; a failure is recorded on the job. Returns (value, succeeded)."""
    interrupted = threading.Event()
    in_main_thread = threading.current_thread() is threading.main_thread()

    def interrupt() -> None:
        # Only while the function runs: once it returned, the rank's clean-up must not be cut short.
        with local_job._lock:
            if in_main_thread and local_job._caller_thread is not None and not interrupted.is_set():
                interrupted.set()
                _thread.interrupt_main()

    local_job._interrupt_caller = interrupt
    session = contextlib.ExitStack()
    try:
        try:
            session.enter_context(rank_session(job, rank, rank, store))
        except Exception as error:  # joining failed, as a worker's set-up can: recorded the same way
            if not local_job.failures:
                local_job.fail(RankFailure.from_record(failure_record(rank, error, "setup")))
            return None, False
        with session:
            try:
                with local_job._lock:
                    # A worker that failed before this point could not interrupt the caller
                    # (there was nothing to interrupt yet): it must not start at all then.
                    local_job._caller_thread = threading.get_ident()
                    failed_already = bool(local_job.failures)
                if failed_already:
                    return None, False
                value = call_rank_function(fn, args, kwargs)
                with local_job._lock:
                    local_job._caller_thread = None
                local_job.note_returned(rank)
                return value, True
            except BaseException as error:
                # Stamp and report before the session ends: tearing the group down makes the
                # workers fail too, and the cause must stay the earliest failure.
                if interrupted.is_set() or local_job.failures:
                    return None, False  # a worker failed first; this is the consequence
                if isinstance(error, KeyboardInterrupt):
                    raise
                local_job.fail(RankFailure.from_record(failure_record(rank, error)))
                return None, False
    finally:
        local_job._interrupt_caller = None
        local_job._caller_thread = None


def _job_secret(platform: Platform) -> bytes:
    """A fresh secret for a job on one machine; the one every node was given for several."""
    if platform.n_nodes == 1:
        return new_secret()
    secret = secret_from_environment()
    if secret is None:
        raise LaunchError(
            f"a job on {platform.n_nodes} nodes needs a job secret, the same on every node, to sign what its "
            f"store carries: without one, anyone who can reach {platform.master_addr}:{platform.master_port} "
            f"could run code in it. {HOW_TO_SET}"
        )
    return secret


def _job_store(platform: Platform, secret: bytes) -> dist.Store:
    """Node 0's caller hosts the job's store; the callers of other nodes join it."""
    if platform.node_rank == 0:
        return host_store(platform.master_addr, platform.master_port, platform.timeout_delta, secret)
    try:
        return connect_store(
            platform.master_addr,
            platform.master_port,
            platform.timeout_delta,
            secret,
            connect_timeout=platform.connect_timeout_delta,
        )
    except Exception as error:
        raise LaunchError(
            f"node {platform.node_rank} could not reach node 0's store at {platform.master_addr}:"
            f"{platform.master_port} within connect_timeout={platform.connect_timeout_delta}: {error}. Start "
            "node 0 with the same master_addr and master_port, and check that this node can reach that address."
        ) from error


def run_local(
    fn: Callable[..., Any],
    args: tuple,
    kwargs: dict[str, Any],
    platform: Platform,
    caller_rank: int | None,
    gather: bool,
    environment: dict[str, str] | None = None,
) -> Any:
    """Run `fn` on `platform.n_procs` ranks of this node; see `phalanx.launch`.

    `environment` adds variables to the ranks' environment only (a sweep pins each point's
    GPU with CUDA_VISIBLE_DEVICES this way, without touching the caller's).

    With `n_nodes > 1` every node's caller does the same with its share of the ranks, and
    every node gets the full list back (see `phalanx.runners.nodes`).
    """
    payload = dumps_call(fn, args, kwargs)
    world_size = platform.world_size
    # On one node the store starts while the zygote forks the workers: its socket listens
    # first, and ranks that connect before the store runs wait in its backlog.
    secret = _job_secret(platform)
    listener, store = None, None
    if platform.n_nodes == 1:
        listener = StoreListener(platform.master_addr, platform.master_port)
        port = listener.port
    else:
        store = _job_store(platform, secret)
        port = platform.master_port or store.port

    def start_store() -> None:
        nonlocal store
        store = listener.host(platform.timeout_delta, secret)

    job = _job_description(platform, port, caller_rank, gather, secret)
    job["environ"].update(environment or {})
    first = platform.node_rank * platform.n_procs
    worker_ranks = [rank for rank in range(first, first + platform.n_procs) if rank != caller_rank]
    local_job = LocalJob(job, worker_ranks, platform)
    nodes = None
    if platform.n_nodes > 1:
        nodes = NodeGroup(store, platform, port, secret)
        nodes.watch(lambda node: local_job.stop())
        local_job.on_failure = nodes.raise_flag
    caller_value: Any = None
    exchanged = False
    try:
        try:
            try:
                local_job.start(payload, start_store if listener is not None else None)
                if caller_rank is not None:
                    caller_value, _ = _run_in_caller(fn, args, kwargs, job, store, caller_rank, local_job)
                local_job.wait()
            except KeyboardInterrupt:
                local_job.stop()
                local_job.wait()
                if not local_job.failures:
                    raise
            if local_job.internal_error is not None:
                raise LaunchError(f"phalanx lost track of the workers: {local_job.internal_error!r}") from (
                    local_job.internal_error
                )
            values = {worker.rank: worker.value for worker in local_job.workers if worker.value is not None}
            failures = list(local_job.failures)
            if nodes is not None:
                if caller_rank is not None and not failures:
                    values[caller_rank] = dumps_value(caller_value, f"the return value of rank {caller_rank}")
                values, failures = nodes.exchange(values, failures)
                exchanged = True
        finally:
            if nodes is not None:
                nodes.close(exchanged)
            local_job.stop()
            local_job.wait()
            del store  # closes the listening socket: the port is free again
            if listener is not None:
                listener.close()  # the store never started
    except BaseException:
        remove_shared_files(job["shared_prefix"])
        raise
    if failures:
        remove_shared_files(job["shared_prefix"])  # what a failed or stopped rank left unmapped
        error = local_job.error_for(failures)
        if error.failures[0].during == "setup":
            raise LaunchError(f"the ranks could not start or meet: {error}") from error
        raise error
    try:
        result = _collect(values, world_size, gather)
    finally:
        remove_shared_files(job["shared_prefix"])
    if caller_rank is not None:  # the caller's own value is the object itself, not a copy
        if gather:
            result[caller_rank] = caller_value
        elif caller_rank == 0:
            result = caller_value
    return result


def _collect(values: dict[int, bytes], world_size: int, gather: bool) -> Any:
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
