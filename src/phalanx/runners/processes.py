"""A process set: the worker processes of one job on this node, from fork to reaping.

The zygote forks the workers; a monitor thread then reads three pipes per worker (result
frames, stdout, stderr) and the zygote's exit reports, and hands what it reads to the job's
`ProcessEvents` (the local runner's `LocalJob`), which decides what a message or an exit
means. Stopping is SIGTERM, then SIGKILL after `STOP_GRACE_SECONDS`. Nothing here knows
about failures, hangs or values: only processes, pipes and signals.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import selectors
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from phalanx.errors import LaunchError
from phalanx.jobspec import JobSpec
from phalanx.runners.channel import FrameReader, decode, encode, read_frame, write_frame
from phalanx.runners.output import RankOutput
from phalanx.runners.zygote import check_limits, get_zygote

__all__ = [
    "SIGNAL_GRACE_SECONDS",
    "STOP_GRACE_SECONDS",
    "ProcessEvents",
    "ProcessSet",
    "Worker",
    "crash_report",
    "describe_exit",
]

STOP_GRACE_SECONDS = 2.0  # between SIGTERM and SIGKILL when ranks are stopped after a failure
# After a stop signal the caller received (Ctrl-C, SIGTERM, SIGHUP): every rank is gone within 1 s.
SIGNAL_GRACE_SECONDS = 0.8
START_TIMEOUT_SECONDS = 60.0  # for the zygote to confirm that the workers exist


@dataclass
class Worker:
    """One worker process and its three pipes, as the caller sees it."""

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


class ProcessEvents(Protocol):
    """What the set tells its job, from the monitor thread (a pass is one wake-up of it)."""

    def pass_started(self) -> None: ...
    def message(self, worker: Worker, message: dict[str, Any]) -> None: ...
    def exited(self, worker: Worker, status: int, when: float) -> None: ...
    def output_arrived(self) -> None: ...
    def pass_ended(self, now: float) -> None: ...
    def next_deadline(self) -> float | None: ...


def describe_exit(status: int) -> tuple[str, int | None, str | None]:
    """A wait status as words, the exit code (None if signalled) and the signal's name."""
    code = os.waitstatus_to_exitcode(status)
    if code >= 0:
        return f"exited with code {code} before returning a result", code, None
    name = signal.Signals(-code).name
    crash = {"SIGSEGV": " (segmentation fault)", "SIGBUS": " (bus error)", "SIGABRT": " (aborted)"}
    return f"was killed by signal {name}{crash.get(name, '')}", None, name


def crash_report(stderr_tail: str) -> str:
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


def spawn(header: dict[str, Any], payload: bytes, write_ends: list[int]):
    """Hand the job to the zygote; a zygote that died since the last launch is replaced once."""
    zygote = get_zygote()
    try:
        return zygote.spawn(header, payload, write_ends)
    except OSError:
        if zygote.usable() and zygote.alive():
            raise  # it failed before a byte was sent (no descriptor left): the zygote is fine
        return get_zygote().spawn(header, payload, write_ends)


class ProcessSet:
    """The workers of one job on this node: start them, watch their pipes, signal and reap them."""

    def __init__(
        self,
        job: JobSpec,
        ranks: list[int],
        outputs: Callable[[int], tuple[RankOutput, RankOutput]],
        events: ProcessEvents,
    ) -> None:
        self.job = job
        self.events = events
        self.workers = [Worker(rank, -1, *outputs(rank)) for rank in ranks]
        self.internal_error: BaseException | None = None
        self.done = threading.Event()
        self.lock = threading.Lock()  # guards the socket and the stop state against the monitor thread
        self.stopping = False
        self.stop_signal = int(signal.SIGTERM)  # what stop() sent: SIGTERM, or a signal the caller got
        self.stopped_at: float | None = None  # when it went out (time.time())
        self.killed_at: float | None = None  # when phalanx itself escalated to SIGKILL
        self.monitor_thread: threading.Thread | None = None
        self._kill_at: float | None = None
        self._killed = False
        self._closed = False  # the job socket and the wake pipe are closed
        self._job_socket = None
        self._job_reader = FrameReader()
        self._selector = selectors.DefaultSelector()
        self._wake_read, self._wake_write = os.pipe()  # stop() wakes the monitor through it
        self._owned_fds: set[int] = set()

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
                ranks = [{"rank": w.rank, "local_rank": self.job.local_rank_of(w.rank)} for w in self.workers]
                self._job_socket = spawn({"job": self.job, "ranks": ranks}, payload, write_ends)
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
            self.watch()
        except BaseException:
            self._close_all()  # closing the job socket makes the zygote kill the job's workers
            self.done.set()
            raise

    def watch(self) -> None:
        """Wait for the zygote's word that the workers exist, then start the monitor thread."""
        self._job_socket.settimeout(START_TIMEOUT_SECONDS)
        try:
            # The zygote's first message; exit reports of workers already done stay in the
            # socket for the monitor.
            report = decode(read_frame(self._job_socket))
        except TimeoutError as error:
            raise LaunchError(
                f"the zygote process did not start the workers within {START_TIMEOUT_SECONDS:g} s; "
                "launch again (set PHALANX_FORK_ZYGOTE=0 if this keeps happening)"
            ) from error
        except (EOFError, ConnectionError) as error:
            raise LaunchError("the zygote process died while starting the workers; launch again") from error
        if "error" in report:  # it could not start them all (a fork failed): it stopped those it had
            raise LaunchError(report["error"])
        self._job_socket.setblocking(False)
        for worker, pid in zip(self.workers, report["pids"], strict=True):
            worker.pid = pid
            os.set_blocking(worker.result_fd, False)
            self._selector.register(worker.result_fd, selectors.EVENT_READ, ("result", worker))
            for fd, output in worker.output_fds.items():
                os.set_blocking(fd, False)
                self._selector.register(fd, selectors.EVENT_READ, ("output", output))
        self._selector.register(self._job_socket, selectors.EVENT_READ, ("job", None))
        self._selector.register(self._wake_read, selectors.EVENT_READ, ("wake", None))
        self.monitor_thread = threading.Thread(target=self._monitor, name="phalanx-monitor", daemon=True)
        self.monitor_thread.start()

    # -- watching ---------------------------------------------------------------------------

    def _monitor(self) -> None:
        try:
            while any(not worker.exited for worker in self.workers):
                self.events.pass_started()
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
                self.events.pass_ended(time.monotonic())
                if self._kill_at is not None and not self._killed and time.monotonic() >= self._kill_at:
                    self._killed = True
                    self.killed_at = time.time()
                    self.signal(signal.SIGKILL)
        except BaseException as error:  # never leave workers behind, whatever went wrong here
            self.internal_error = error
            with contextlib.suppress(Exception):
                self._job_socket.close()  # the zygote kills every worker of a job it loses
        finally:
            self._close_all()
            self.done.set()

    def _next_wake_up(self) -> float | None:
        deadlines = [self.events.next_deadline()]
        if self._kill_at is not None and not self._killed:
            deadlines.append(self._kill_at)
        pending = [deadline for deadline in deadlines if deadline is not None]
        return max(0.0, min(pending) - time.monotonic()) if pending else None

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

    def _read_result(self, worker: Worker) -> None:
        if worker.result_fd not in self._owned_fds:
            return
        try:
            frames, ended = worker.frames.read_from(worker.result_fd)
        except OSError:
            frames, ended = [], True
        for frame in frames:
            self.events.message(worker, decode(frame))
        if ended:
            self._forget(worker.result_fd)

    def _read_output(self, fd: int, output: RankOutput) -> None:
        for chunk in self._drain(fd):
            output.feed(chunk)
            self.events.output_arrived()

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

    def _on_exit(self, worker: Worker, status: int, when: float) -> None:
        # The worker wrote everything before it exited: what is in the pipes now is all there is.
        self._read_result(worker)
        for fd, output in worker.output_fds.items():
            self._read_output(fd, output)
            self._forget(fd)
            output.close()
        self._forget(worker.result_fd)
        worker.exited = True
        self.events.exited(worker, status, when)

    def stopped_by_us(self, signal_name: str | None, when: float) -> bool:
        """True for an exit by the signal phalanx itself sent to stop the ranks."""
        stop_name = signal.Signals(self.stop_signal).name
        return (signal_name == stop_name and self.stopped_at is not None and when >= self.stopped_at) or (
            signal_name == "SIGKILL" and self.killed_at is not None and when >= self.killed_at
        )

    # -- stopping ---------------------------------------------------------------------------

    def stop(self, signum: int = signal.SIGTERM, grace: float = STOP_GRACE_SECONDS) -> None:
        """Send `signum` (SIGTERM) to every live worker now, SIGKILL after `grace` seconds. Idempotent.

        A signal the caller received (SIGINT, SIGHUP, SIGTERM) is forwarded as it came.
        """
        with self.lock:
            if self.stopping:
                return
            self.stopping = True
            self.stop_signal = int(signum)
            self.stopped_at = time.time()
            self._kill_at = time.monotonic() + grace
        self.signal(signum)
        self.wake()

    def wake(self) -> None:
        """Have the monitor thread look at its deadlines again."""
        with self.lock, contextlib.suppress(OSError):
            if not self._closed:
                os.write(self._wake_write, b"x")

    def signal(self, signum: int, leader_only: bool = False, pids: list[int] | None = None) -> None:
        """Signal the job's workers (`pids`: only those) with their children, or `leader_only`."""
        # Under the lock, and only while open: once closed, the descriptor number may belong to
        # another launch's socket or store connection in this process.
        message = {"signal": int(signum), "leader_only": leader_only, "pids": pids}
        with self.lock, contextlib.suppress(OSError, AttributeError):
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
        with self.lock:
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
