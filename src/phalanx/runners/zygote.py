"""The zygote: a clean, idle copy of the interpreter with torch loaded, that forks the workers.

Forking the caller directly is fast (no worker imports torch again) but unsafe once the caller
holds CUDA state or threads, as notebook kernels always do. Spawning is safe but every worker
pays the torch import. The zygote gives both: it is taken from the caller when that is still
safe (when phalanx is imported, normally right after torch), or else started afresh with exec
and made to import torch once; every launch then forks its workers from it.

A copy is taken by fork only if, at the instant of the fork, the forking thread was the only
thread of the caller and CUDA was not initialised. Thread pools that stop themselves in a fork
handler (OpenBLAS's does) do not count; any other thread makes phalanx throw the copy away and
use exec instead.

Protocol. The caller holds one end of a control socket; EOF on it (the caller exited or was
killed) makes the zygote kill every worker and exit. For each launch the caller sends, over the
control socket, a header, the pickled call and descriptors: the zygote's end of a new job
socket plus, for each rank, the write ends of its result, stdout and stderr pipes, in that
order. One SCM_RIGHTS message carries at most 253 descriptors, so they travel in batches of at
most `_MAX_FDS`, in this order on the stream:

    8-byte length of the header        with batch 1 (the job socket first)
    the header (pickled dict)          its "descriptor_batches" lists every batch's size
    one byte b"+"                      with batch 2, 3, ... (one such message per further batch)
    the payload ("payload_size" bytes)

The zygote forks one worker per rank and reports on the job socket `{"pids": [...]}`, then one
`{"exit": pid, "status": wait_status, "time": when_reaped}` per worker. If it cannot start the
job (a fork fails, descriptors were lost on the way), it reports `{"error": message}` instead of
the pids, and closes the job socket. The caller may send `{"signal": n}` on the job socket to
signal every live worker of the job; EOF on it kills them.

Descriptors. A zygote taken by fork holds copies of every descriptor the caller had open at
`import phalanx` (a log file that `logging.basicConfig(filename=...)` opened, pytest's handlers),
and its workers inherit the Python objects that use them. So that such a number is never
re-used by something else inside a rank (a log line landing in the rank's own data file),
the zygote keeps each inherited descriptor number taken: a regular file stays open, as it would
in a forked child (a rank's log lines reach that file; O_APPEND stays); anything else (socket,
pipe, tty, directory, device) is replaced by /dev/null, so the zygote holds no pipe open against
its reader's EOF, nor a listening port bound, and what a rank writes there is dropped.

Names. So that neither looks like a stray copy of the user's program in `ps` or `top`, the
zygote calls itself "phalanx-zygote" and each worker "phalanx-rank-<rank>" (the kernel's process
name, 15 characters: `top`, `ps -o comm`, `pgrep`), and, where the setproctitle package is
installed, shows "phalanx zygote (for pid 1234: python train.py)" or "phalanx rank 3 (for pid
1234: python train.py)" as its command line (`ps aux`, `ps -o args`, `pgrep -f`).
"""

from __future__ import annotations

import atexit
import ctypes
import dataclasses
import errno
import functools
import gc
import importlib
import multiprocessing
import os
import resource
import selectors
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import traceback
import weakref
from dataclasses import dataclass
from typing import Any

from phalanx import variables
from phalanx.environment import detect_environment
from phalanx.errors import LaunchError
from phalanx.runners.channel import FrameReader, decode, encode, recv_exactly, write_frame
from phalanx.runners.worker import run_rank

__all__ = ["Zygote", "check_limits", "get_zygote", "helper_pids", "prestart"]

_FDS_PER_RANK = 3
_MAX_FDS = 250  # descriptors per message: the kernel's SCM_RIGHTS limit is 253
_SEND_TIMEOUT_SECONDS = 60.0  # for the zygote to take a whole request off the control socket
# While the ranks start, the caller holds per rank 3 read ends and 3 write ends (until sent);
# then, besides the pipes, the store's connection from that rank. Plus the job's own few.
_CALLER_FDS_PER_RANK = 6
_CALLER_FDS_PER_JOB = 16

_lock = threading.Lock()
_zygote: Zygote | None = None
_COMMAND_IN_TITLE = 120  # characters of the caller's command line shown in the zygote's and workers' titles


def _thread_count() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:  # no procfs (macOS): trust Python's own count
        return threading.active_count()


def _cuda_initialised() -> bool:
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_initialized())


@functools.cache
def _prctl():
    return ctypes.CDLL(None, use_errno=True).prctl  # looked up once, in the zygote: workers inherit it


def _set_parent_death_signal(signum: int) -> None:
    """Linux only: the kernel sends `signum` to this process when its parent thread exits."""
    if not sys.platform.startswith("linux"):
        return
    pr_set_pdeathsig = 1
    _prctl()(pr_set_pdeathsig, signum, 0, 0, 0)


def _name_process(name: str, title: str) -> None:
    """Show `name` as the process's name (Linux: `top`, `ps -o comm`) and `title` as its command line.

    `name` is cut to the kernel's 15 characters. The command line changes only where the
    setproctitle package was imported (by the zygote, see `_serve`): without it, `ps aux` still
    shows the caller's. A few microseconds either way, so every worker renames itself.
    """
    setproctitle = sys.modules.get("setproctitle")
    if setproctitle is not None:
        setproctitle.setproctitle(title)  # on Linux it also sets the name, to the title's start: set below
    if sys.platform.startswith("linux"):
        pr_set_name = 15
        _prctl()(pr_set_name, name.encode()[:15], 0, 0, 0)


def _rank_name(rank: int) -> str:
    """A worker's process name: "phalanx-rank-3", or "phalanx-r1234" where that would not fit in 15 characters."""
    name = f"phalanx-rank-{rank}"
    return name if len(name) <= 15 else f"phalanx-r{rank}"


def _command_of(pid: int) -> str:
    """The command line of process `pid`, on one line and cut to `_COMMAND_IN_TITLE` characters ("" if unknown)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            arguments = file.read().decode(errors="replace").split("\0")
    except OSError:  # no procfs (macOS), or the caller is gone already
        return ""
    command = " ".join(" ".join(arguments).split())
    return command if len(command) <= _COMMAND_IN_TITLE else command[: _COMMAND_IN_TITLE - 3] + "..."


def _open_descriptor_count() -> int | None:
    for folder in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(folder)) - 1  # less the listing's own
        except OSError:
            continue
    return None


def _process_limit_applies() -> bool:
    """The kernel does not hold root to RLIMIT_NPROC (it counts by real user id)."""
    return os.getuid() != 0


def _tasks_running() -> int | None:
    """Processes and threads of the whole machine, from one small read (Linux), or None."""
    try:
        with open("/proc/loadavg") as file:
            return int(file.read().split()[3].split("/")[1])
    except (OSError, IndexError, ValueError):
        return None


def _tasks_of_user(uid: int) -> int:
    """Processes and threads of `uid`, as RLIMIT_NPROC counts them (Linux)."""
    count = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid == uid:
                count += max(1, os.stat(f"/proc/{entry.name}/task").st_nlink - 2)  # 2 + one link a thread
        except OSError:  # it ended meanwhile
            continue
    return count


def check_limits(n_ranks: int) -> None:
    """Refuse, before anything starts, `n_ranks` new processes that this user's limits would stop halfway.

    Raises `LaunchError` naming the limit, its value and the fix when the descriptors the caller
    holds while the ranks start (`_CALLER_FDS_PER_RANK` a rank, plus those open now) or the
    processes (RLIMIT_NPROC, less the processes and threads this user runs now) would not fit.
    """
    if n_ranks <= 0:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    open_now = _open_descriptor_count()
    if soft != resource.RLIM_INFINITY and open_now is not None:
        needed = open_now + _CALLER_FDS_PER_JOB + _CALLER_FDS_PER_RANK * n_ranks
        if needed > soft:
            fit = max(0, (soft - open_now - _CALLER_FDS_PER_JOB) // _CALLER_FDS_PER_RANK)
            raise LaunchError(
                f"cannot start {n_ranks} rank processes: this process would need about {needed} file "
                f"descriptors while they start ({_CALLER_FDS_PER_RANK} a rank, {open_now} open now), more than "
                f"its limit of {soft} (RLIMIT_NOFILE, hard limit {_limit_text(hard)}). Raise it with "
                f"`ulimit -n {_suggested(needed, hard)}` in the shell that starts Python (or "
                "resource.setrlimit(resource.RLIMIT_NOFILE, ...) before the launch), or use fewer "
                f"n_procs (about {fit} fit)."
            )
    soft, hard = resource.getrlimit(resource.RLIMIT_NPROC)
    if soft == resource.RLIM_INFINITY or not _process_limit_applies():
        return
    running = _tasks_running()
    if running is None:
        running = 0  # no cheap count here: the limit alone
    elif running + n_ranks > soft:  # the machine's count is an upper bound; count this user's
        running = _tasks_of_user(os.getuid())
    if running + n_ranks > soft:
        raise LaunchError(
            f"cannot start {n_ranks} rank processes: this user runs {running} processes and threads "
            f"already, and may run at most {soft} (RLIMIT_NPROC, hard limit {_limit_text(hard)}). Raise it "
            f"with `ulimit -u {_suggested(running + n_ranks, hard)}` in the shell that starts Python, or use "
            f"fewer n_procs (at most {max(0, soft - running)} fit)."
        )


def _limit_text(value: int) -> str:
    return "unlimited" if value == resource.RLIM_INFINITY else str(value)


def _suggested(needed: int, hard: int) -> str:
    """A round value above `needed` for the message, or `hard` when that is lower (and finite)."""
    value = 1 << max(10, (needed - 1).bit_length())
    return str(value if hard == resource.RLIM_INFINITY else min(value, hard))


@dataclass
class Zygote:
    """The caller's handle on its zygote."""

    control: socket.socket
    pid: int
    started_by: str  # "fork" or "exec"
    process: subprocess.Popen | None = None
    # Launches from several threads (a sweep's slots) share the control socket: one request
    # must be written whole before the next begins, or the zygote reads a garbled stream.
    send_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    jobs: weakref.WeakSet = dataclasses.field(default_factory=weakref.WeakSet)  # job sockets handed out

    def busy(self) -> bool:
        """True while a launch of this caller still holds the job socket of some workers."""
        return any(job.fileno() != -1 for job in self.jobs)

    def alive(self) -> bool:
        try:
            pid, _ = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            return False
        return pid == 0

    def usable(self) -> bool:
        """False once a request was cut off midway: the zygote would read a garbled stream."""
        return self.control.fileno() != -1

    def spawn(self, header: dict[str, Any], payload: bytes, fds: list[int]) -> socket.socket:
        """Ask for one worker per rank in `header["ranks"]`; returns the job socket (caller's end).

        `fds` are the ranks' pipe ends, 3 a rank; any number of them (see the protocol above).
        An error that leaves a request cut off midway (the zygote stopped reading, the sender
        was interrupted), or that says the zygote is gone, also closes the control socket,
        which makes a live zygote stop every worker and exit: `usable()` is False from then on.
        """
        ours, theirs = socket.socketpair()
        descriptors = [theirs.fileno(), *fds]
        batches = [descriptors[start : start + _MAX_FDS] for start in range(0, len(descriptors), _MAX_FDS)]
        started = False
        try:
            message = encode(dict(header, payload_size=len(payload), descriptor_batches=[len(b) for b in batches]))
            with self.send_lock:
                if self.control.gettimeout() is None:
                    self.control.settimeout(_SEND_TIMEOUT_SECONDS)
                socket.send_fds(self.control, [len(message).to_bytes(8, "big")], batches[0])
                started = True
                self.control.sendall(message)
                for batch in batches[1:]:
                    socket.send_fds(self.control, [b"+"], batch)
                self.control.sendall(payload)
        except BaseException as error:
            ours.close()
            if started or isinstance(error, (BrokenPipeError, ConnectionResetError)):
                self.control.close()
            raise
        finally:
            theirs.close()
        self.jobs.add(ours)
        return ours

    def close(self) -> None:
        self.control.close()
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass


# -- choosing and starting the zygote (caller side) ------------------------------------------


def _fork_is_allowed() -> bool:
    return (
        hasattr(os, "fork")
        and os.environ.get(variables.DISABLE_ZYGOTE_FORK, "1") != "0"
        and threading.active_count() == 1
        and not _cuda_initialised()
    )


def _fork_zygote() -> Zygote | None:
    """Fork the caller; keep the copy only if the caller had no other thread at the fork."""
    ours, theirs = socket.socketpair()
    verdict_read, verdict_write = os.pipe()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    caller = os.getpid()
    pid = os.fork()
    if pid == 0:  # the copy: touch nothing that another thread might have held until cleared
        try:
            os.close(verdict_write)
            verdict = os.read(verdict_read, 1)
            if verdict == b"1":
                os.close(verdict_read)
                ours.close()
                _serve(theirs.fileno(), caller)
        finally:
            os._exit(0)
    os.close(verdict_read)
    theirs.close()
    clean = _thread_count() == 1
    os.write(verdict_write, b"1" if clean else b"0")
    os.close(verdict_write)
    if not clean:
        os.waitpid(pid, 0)
        ours.close()
        return None
    return Zygote(ours, pid, "fork")


def _exec_zygote() -> Zygote:
    """Start a fresh interpreter that imports torch and phalanx once, then serves."""
    ours, theirs = socket.socketpair()
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # above phalanx/
    env = dict(os.environ)
    env[variables.ROLE] = "zygote"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    code = "import sys; from phalanx.runners.zygote import _serve_after_exec; _serve_after_exec()"
    try:
        process = subprocess.Popen(
            [sys.executable, "-c", code, str(theirs.fileno()), str(os.getpid())],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
    finally:
        theirs.close()
    return Zygote(ours, process.pid, "exec", process)


def get_zygote() -> Zygote:
    """The caller's zygote, started now if there is none or the last one died."""
    global _zygote
    with _lock:
        if _zygote is not None and not _zygote.usable():
            _zygote.close()  # it saw EOF: it stops its workers and exits
            _zygote = None
        if _zygote is not None and not _zygote.alive():
            _zygote.control.close()
            _zygote = None
        if _zygote is None:
            _zygote = (_fork_zygote() if _fork_is_allowed() else None) or _exec_zygote()
        return _zygote


def prestart() -> None:
    """Take the zygote now if the caller is still clean; called when phalanx is imported."""
    global _zygote
    if os.environ.get(variables.ROLE) or not _fork_is_allowed() or _launched_externally():
        return
    if multiprocessing.parent_process() is not None:
        return
    with _lock:
        if _zygote is None:
            _zygote = _fork_zygote()


def _launched_externally() -> bool:
    """True inside a rank that torchrun, srun or mpirun started: it joins, it does not launch."""
    return detect_environment() is not None


def helper_pids() -> list[int]:
    """Process ids of the zygote phalanx keeps for this process (for leak checks in tests)."""
    with _lock:
        return [_zygote.pid] if _zygote is not None else []


def _stop_before_exit() -> None:
    """Stop the zygote before the interpreter tears itself down.

    A zygote taken by fork shares the caller's memory copy on write: while it lives, every page
    the exiting interpreter writes as it frees its objects is copied first, which made the exit
    of a torch program about 60 ms slower. An idle zygote is killed outright (it may be in its
    warm-up imports) and not waited for: the kernel frees it while this interpreter winds down.
    One that still runs workers of a launch is told by EOF, so that it stops their whole process
    groups first, and waited for.
    """
    global _zygote
    if not _lock.acquire(timeout=1.0):  # a thread stuck in get_zygote: the death signal will do
        return
    try:
        zygote, _zygote = _zygote, None
    finally:
        _lock.release()
    if zygote is None:
        return
    if not zygote.busy():
        try:
            os.kill(zygote.pid, signal.SIGKILL)
            zygote.control.close()
            return
        except OSError:
            pass
    zygote.close()


# Registered when phalanx is imported, right after torch: it runs before torch's own exit
# handlers and after those of the program. A no-op in processes without a zygote.
atexit.register(_stop_before_exit)


def shutdown() -> None:
    """Stop the zygote now (it also stops by itself when this process exits)."""
    global _zygote
    with _lock:
        if _zygote is not None:
            _zygote.close()
            _zygote = None


# -- the zygote process ----------------------------------------------------------------------


def _serve_after_exec() -> None:
    import torch  # noqa: F401  - the point of the zygote: import it once for every worker

    try:
        _serve(int(sys.argv[1]), int(sys.argv[2]))
    finally:
        os._exit(0)  # no interpreter shutdown: its finalizers print noise after the caller is gone


def _open_descriptors() -> list[int]:
    for folder in ("/proc/self/fd", "/dev/fd"):
        try:
            return sorted(int(name) for name in os.listdir(folder))
        except OSError:
            continue
    return list(range(3, 256))


def _close_other_descriptors(keep: set[int]) -> None:
    for fd in _open_descriptors():
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


def _is_regular_file(fd: int) -> bool:
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
    except OSError:
        return False
    try:  # eventfd, epoll, timerfd...: no file, whatever mode this kernel gives them
        return not os.readlink(f"/proc/self/fd/{fd}").startswith("anon_inode:")
    except OSError:
        return True


def _hold_inherited_descriptors(keep: set[int]) -> set[int]:
    """Keep every number above 2 the caller left open (but `keep`) taken; returns those numbers.

    Regular files stay open; every other descriptor is replaced by /dev/null (see the module's
    docstring): the zygote must not hold a pipe or socket of the caller open.
    """
    null = os.open(os.devnull, os.O_RDWR)  # before the listing, so that its number is no inherited one
    held = set()
    try:
        for fd in _open_descriptors():
            if fd <= 2 or fd == null or fd in keep:
                continue
            try:
                inheritable = os.get_inheritable(fd)
            except OSError:  # the listing's own descriptor, closed by now
                continue
            held.add(fd)
            if not _is_regular_file(fd):
                os.dup2(null, fd, inheritable=inheritable)
    finally:
        os.close(null)
    return held


def _receive_job(control: socket.socket) -> tuple[dict[str, Any], bytes, list[int], bool] | None:
    """The next job: its header, payload, descriptors, and whether some descriptors were lost."""
    data, fds, flags, _ = socket.recv_fds(control, 8, _MAX_FDS)
    if not data:
        for fd in fds:
            os.close(fd)
        return None
    lost = bool(flags & socket.MSG_CTRUNC)  # no room for them here (RLIMIT_NOFILE)
    while len(data) < 8:
        data += recv_exactly(control, 8 - len(data))
    header = decode(recv_exactly(control, int.from_bytes(data, "big")))
    batches = header.get("descriptor_batches", [len(fds)])
    lost |= len(fds) < batches[0]
    for size in batches[1:]:
        marker, more, flags, _ = socket.recv_fds(control, 1, _MAX_FDS)
        if not marker:
            raise EOFError("the caller closed the control socket mid-request")
        fds += more
        lost |= bool(flags & socket.MSG_CTRUNC) or len(more) < size
    payload = recv_exactly(control, header["payload_size"])
    return header, payload, list(fds), lost


# Modules that DDP, the optimizers and torch.compile import on first use: about 2.5 s of
# imports in every rank of every launch that builds a DDP model, unless the zygote has them;
# and the codec of host names. (What every worker runs, phalanx.runners.worker and the modules around
# it, `import phalanx` has imported before the zygote is copied: each worker would otherwise
# import it again, 7 ms a rank here, most of it copy-on-write faults.)
_WARM_UP_MODULES = ("torch._dynamo", "torch.distributed.fsdp", "torch.nn.parallel", "encodings.idna")
_WARM_UP_AFTER_IDLE_SECONDS = 2.0  # not before: a launch right after `import phalanx` must not wait


def _import_all(names: tuple[str, ...]) -> None:
    """Import every module that exists here, then keep the garbage collector off all of it."""
    for name in names:
        try:
            importlib.import_module(name)
        except Exception:  # an optional part missing in this torch build: the workers do without
            pass
    # A worker's collections would otherwise go through every object of torch (a full one takes
    # 100 ms here), writing to each object's header and so copying its page from the zygote.
    gc.freeze()


def _caller_gave_up(job_socket: socket.socket) -> bool:
    """True if the caller closed its end of the job socket already (its next read is EOF)."""
    try:
        return job_socket.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except OSError:  # nothing to read: still there
        return False


def _fork_refusal(rank: int, index: int, count: int, error: OSError) -> str:
    message = f"the zygote process could not fork rank {rank} ({index} of {count} ranks had started): {error}."
    if error.errno == errno.EAGAIN:
        limit = resource.getrlimit(resource.RLIMIT_NPROC)[0]
        message += (
            f" This user's process limit (RLIMIT_NPROC: {_limit_text(limit)}, threads count too) or the "
            "machine's (kernel.pid_max, kernel.threads-max, a cgroup's pids.max) is reached: raise it "
            "(`ulimit -u`) or use fewer n_procs."
        )
    elif error.errno == errno.ENOMEM:
        message += " The machine has no memory left for another process: use fewer n_procs."
    return message


class _Server:
    """The zygote's event loop: jobs in, workers out, exits reported."""

    def __init__(self, control_fd: int, inherited: frozenset[int] = frozenset(), caller: str = "") -> None:
        self.control = socket.socket(fileno=control_fd)
        self.inherited = inherited  # the caller's descriptor numbers, held for the workers
        self.caller = caller  # "for pid 1234: python train.py", for the workers' titles
        self.selector = selectors.DefaultSelector()
        self.wakeup_read, wakeup_write = os.pipe()
        os.set_blocking(wakeup_write, False)
        os.set_blocking(self.wakeup_read, False)
        signal.set_wakeup_fd(wakeup_write)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self.wakeup_write = wakeup_write
        self.selector.register(self.control, selectors.EVENT_READ, "control")
        self.selector.register(self.wakeup_read, selectors.EVENT_READ, "children")
        self.job_of: dict[int, socket.socket] = {}  # worker pid -> its job socket
        self.readers: dict[socket.socket, FrameReader] = {}

    def run(self) -> None:
        warmed = False
        while True:
            events = self.selector.select(None if warmed else _WARM_UP_AFTER_IDLE_SECONDS)
            if not events and not warmed:
                _import_all(_WARM_UP_MODULES)  # what most training jobs need, while idle
                warmed = True
            for key, _ in events:
                if key.data == "control":
                    if not self._accept_job():
                        self._kill(list(self.job_of), signal.SIGKILL)
                        return
                elif key.data == "children":
                    self._reap()
                else:
                    self._job_message(key.fileobj)

    def _accept_job(self) -> bool:
        try:
            job = _receive_job(self.control)
        except (EOFError, ConnectionError):
            return False
        if job is None:
            return False
        header, payload, fds, lost = job
        if not fds:  # not even the job socket came: its loss tells the caller
            return True
        job_socket = socket.socket(fileno=fds[0])
        rank_fds = fds[1:]
        ranks = header["ranks"]
        pids: list[int] = []
        refusal = None
        if lost or len(rank_fds) != _FDS_PER_RANK * len(ranks):
            limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            refusal = (
                f"the zygote process received {len(rank_fds)} of the {_FDS_PER_RANK * len(ranks)} pipe ends of "
                f"{len(ranks)} ranks: it has no room for more descriptors (RLIMIT_NOFILE: {_limit_text(limit)}). "
                "Raise the limit with `ulimit -n` before starting Python, or use fewer n_procs."
            )
        elif _caller_gave_up(job_socket):
            ranks = []  # Ctrl-C, a store that failed to start: no worker to fork for it
        for index, rank_spec in enumerate([] if refusal else ranks):
            own = rank_fds[index * _FDS_PER_RANK : (index + 1) * _FDS_PER_RANK]
            try:
                pid = os.fork()
            except OSError as error:
                refusal = _fork_refusal(rank_spec["rank"], index, len(ranks), error)
                break
            if pid == 0:
                self._become_worker(header, rank_spec, payload, own)
            pids.append(pid)
            self.job_of[pid] = job_socket
        for fd in rank_fds:
            os.close(fd)
        self.readers[job_socket] = FrameReader()
        self.selector.register(job_socket, selectors.EVENT_READ, "job")
        delivered = True
        try:
            write_frame(job_socket.fileno(), encode({"error": refusal} if refusal else {"pids": pids}))
        except OSError:  # the caller gave the job up while it was being forked
            delivered = False
        if refusal or not delivered:
            self._kill(pids, signal.SIGKILL)
            self._forget(job_socket)
        return True

    def _become_worker(self, header: dict, rank_spec: dict, payload: bytes, fds: list[int]) -> None:
        code = 1
        try:
            os.setpgid(0, 0)  # its own group, so that stopping it also stops its children
            _set_parent_death_signal(signal.SIGKILL)
            signal.set_wakeup_fd(-1)
            for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGPIPE):
                signal.signal(signum, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            # Until the worker registers its stack dump on SIGUSR1, a hang report's request must not kill it.
            signal.signal(signal.SIGUSR1, signal.SIG_IGN)
            result_fd, out_fd, err_fd = fds
            os.dup2(out_fd, 1)
            os.dup2(err_fd, 2)
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            _close_other_descriptors({result_fd, *self.inherited})
            os.environ[variables.ROLE] = "worker"
            rank = rank_spec["rank"]
            _name_process(_rank_name(rank), f"phalanx rank {rank} ({self.caller})")
            code = run_rank(header["job"], rank_spec, payload, result_fd)
        except BaseException:
            try:
                os.write(2, traceback.format_exc().encode())
            except BaseException:
                pass
        finally:
            os._exit(code)

    def _reap(self) -> None:
        try:
            while os.read(self.wakeup_read, 512):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            try:
                os.killpg(pid, signal.SIGKILL)  # whatever the worker left behind in its group
            except OSError:
                pass
            job_socket = self.job_of.pop(pid, None)
            if job_socket is None:
                continue
            try:
                write_frame(job_socket.fileno(), encode({"exit": pid, "status": status, "time": time.time()}))
            except OSError:
                pass
            if job_socket not in self.job_of.values():
                self._forget(job_socket)

    def _job_message(self, job_socket: socket.socket) -> None:
        try:
            data = job_socket.recv(65536)
        except OSError:
            data = b""
        pids = [pid for pid, owner in self.job_of.items() if owner is job_socket]
        if not data:  # the caller gave the job up: nothing of it may live on
            self._kill(pids, signal.SIGKILL)
            self._forget(job_socket)
            return
        for frame in self.readers[job_socket].feed(data):
            message = decode(frame)
            targets = [pid for pid in message.get("pids") or pids if pid in pids]  # never beyond this job
            self._kill(targets, message["signal"], whole_group=not message.get("leader_only", False))

    def _forget(self, job_socket: socket.socket) -> None:
        if job_socket in self.readers:
            self.selector.unregister(job_socket)
            del self.readers[job_socket]
        for pid, owner in list(self.job_of.items()):
            if owner is job_socket:  # killed already; its exit, when reaped, goes unreported
                del self.job_of[pid]
        job_socket.close()

    @staticmethod
    def _kill(pids: list[int], signum: int, whole_group: bool = True) -> None:
        """Signal each worker's process group (its children too), or with `whole_group=False` the worker alone."""
        for pid in pids:
            try:
                if not whole_group:
                    raise OSError  # straight to os.kill
                os.killpg(pid, signum)
            except OSError:
                try:
                    os.kill(pid, signum)
                except OSError:
                    pass


def _forget_unfinished_imports() -> None:
    """Drop modules that were being imported when the caller was copied.

    phalanx is usually imported from the top of another module, so that module (and its
    package) was only partly executed at the fork. A worker must import it afresh, not find a
    half-made module in sys.modules. phalanx itself was complete but for this last step.

    Those modules are the ones whose top-level code is on the stack that forked: looking only
    there, rather than at each of the 1000+ modules torch brings (6 to 11 ms of copy-on-write
    faults here, in the way of a launch right after the import), finds the same ones.
    """
    frame = sys._getframe()
    while frame is not None:
        name = frame.f_globals.get("__name__") if frame.f_code.co_name == "<module>" else None
        module = sys.modules.get(name) if isinstance(name, str) else None
        spec = getattr(module, "__spec__", None)
        if spec is not None and getattr(spec, "_initializing", False):
            if name == "phalanx" or name.startswith("phalanx."):
                spec._initializing = False
            else:
                del sys.modules[name]
        frame = frame.f_back


def _serve(control_fd: int, caller_pid: int) -> None:
    """Become the zygote: leave the caller's session and descriptors, then serve jobs."""
    try:
        os.setsid()  # Ctrl-C in the caller's terminal is for the caller, which stops the ranks
    except OSError:
        pass
    os.environ[variables.ROLE] = "zygote"
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    inherited = frozenset(_hold_inherited_descriptors({control_fd}))
    # Die with the caller even if a process the caller forked still holds the control socket.
    _set_parent_death_signal(signal.SIGKILL)
    atexit._clear()  # the caller's exit handlers are not ours to run
    _forget_unfinished_imports()
    if os.getppid() != caller_pid:
        return
    try:
        # Optional, and imported here, not at `import phalanx`: the caller's own command line stays as it is.
        import setproctitle  # noqa: F401  - what _name_process uses, here and in every worker
    except ImportError:
        pass
    command = _command_of(caller_pid)
    caller = f"for pid {caller_pid}: {command}" if command else f"for pid {caller_pid}"
    _name_process("phalanx-zygote", f"phalanx zygote ({caller})")
    gc.freeze()  # see _import_all
    _Server(control_fd, inherited, caller).run()
