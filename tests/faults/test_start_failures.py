"""Starting the ranks fails: every way `LocalJob.start` can fail ends the launch with an error.

Whatever fails (a pipe, the hand-over to the zygote, the store, the zygote itself, a fork in
the zygote, a limit), `launch` raises within seconds and leaves no process, descriptor or
listening socket behind (checked by this folder's conftest). And a launch of more ranks than
one descriptor message carries, or than a limit allows, works or is refused up front.
"""

from __future__ import annotations

import errno
import os
import signal
import time

import pytest

import phalanx as px
from phalanx import rendezvous
from phalanx.runners import processes, zygote
from tests.conftest import run_script

pytestmark = pytest.mark.timeout(120)

TWO = px.Platform(device="cpu", n_procs=2)
BOUND_SECONDS = 15  # a failed start must end the launch well within this


def _launch_raises(expected, platform=TWO, fn=int):
    start = time.monotonic()
    with pytest.raises(expected) as info:
        px.launch(fn, platform=platform)
    assert time.monotonic() - start < BOUND_SECONDS
    return info.value


def _launch_works():
    assert px.launch(os.getpid, platform=TWO)[0] > 0


@pytest.mark.parametrize("failing_call", [3, 5], ids=["mid-rank", "between ranks"])
def test_a_pipe_that_fails_with_emfile_raises_launch_error(monkeypatch, failing_call):
    real_pipe = os.pipe
    calls = []

    def pipe():  # call 1: the job's wake pipe; then 3 a rank
        calls.append(1)
        if len(calls) == failing_call:
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return real_pipe()

    monkeypatch.setattr(processes.os, "pipe", pipe)
    error = _launch_raises(px.LaunchError)
    monkeypatch.undo()
    assert "RLIMIT_NOFILE" in str(error) and "fewer n_procs" in str(error)
    _launch_works()


def test_a_hand_over_that_fails_before_sending_raises_and_keeps_the_zygote(monkeypatch):
    kept = zygote.get_zygote()

    def socketpair(*args, **kwargs):
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    monkeypatch.setattr(zygote.socket, "socketpair", socketpair)
    error = _launch_raises(px.LaunchError)
    monkeypatch.undo()
    assert "RLIMIT_NOFILE" in str(error)
    assert zygote.get_zygote() is kept and kept.alive()
    _launch_works()


def test_a_zygote_that_is_gone_is_replaced_once_then_the_launch_raises(monkeypatch):
    first = zygote.get_zygote()
    tried = []

    def send_fds(sock, buffers, fds, *args):
        tried.append(sock)
        raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))

    monkeypatch.setattr(zygote.socket, "send_fds", send_fds)
    error = _launch_raises(px.LaunchError)
    monkeypatch.undo()
    assert "could not hand the job to the zygote" in str(error)
    assert len(tried) == 2 and tried[0] is first.control and not first.usable()
    _launch_works()  # a fresh zygote
    assert zygote.get_zygote() is not first


def test_a_store_that_fails_while_the_zygote_forks_raises_its_own_error(monkeypatch):
    def host(*args, **kwargs):
        raise RuntimeError("the store could not start")

    monkeypatch.setattr(rendezvous.StoreListener, "host", host)
    error = _launch_raises(RuntimeError)
    assert str(error) == "the store could not start"
    monkeypatch.undo()
    _launch_works()  # the zygote killed the job's workers (no process is left) and serves on


def _stop_the_zygote_while_it_is_sent_the_job(monkeypatch, then_kill: bool) -> int:
    real_spawn = processes.spawn
    pid = zygote.get_zygote().pid

    def spawn(*args):
        os.kill(pid, signal.SIGSTOP)  # it reads nothing now: the job waits in the socket
        job_socket = real_spawn(*args)
        if then_kill:
            os.kill(pid, signal.SIGKILL)
        return job_socket

    monkeypatch.setattr(processes, "spawn", spawn)
    return pid


def test_a_zygote_that_dies_before_it_reports_the_pids_raises_launch_error(monkeypatch):
    pid = _stop_the_zygote_while_it_is_sent_the_job(monkeypatch, then_kill=True)
    error = _launch_raises(px.LaunchError)
    monkeypatch.undo()
    assert "the zygote process died while starting the workers" in str(error)
    _launch_works()  # a fresh zygote
    assert zygote.get_zygote().pid != pid


def test_a_zygote_that_does_not_report_the_pids_in_time_raises_launch_error(monkeypatch):
    pid = _stop_the_zygote_while_it_is_sent_the_job(monkeypatch, then_kill=False)
    monkeypatch.setattr(processes, "START_TIMEOUT_SECONDS", 0.5)
    try:
        error = _launch_raises(px.LaunchError)
    finally:
        os.kill(pid, signal.SIGCONT)
    monkeypatch.undo()
    assert "did not start the workers within 0.5 s" in str(error)
    _launch_works()  # the same zygote: it dropped the given-up job without forking for it
    assert zygote.get_zygote().pid == pid


def test_a_fork_that_fails_in_the_zygote_raises_its_error_and_stops_the_ranks_it_had_started():
    # The zygote is taken again after os.fork is replaced: its copy of the replacement
    # fails its second fork of a worker, as a full process table would.
    script = """
import errno
import os
import time

import psutil

import phalanx as px
from phalanx.runners import zygote

zygote.shutdown()
real_fork, forks = os.fork, []


def fork():
    forks.append(1)
    if len(forks) == 3:  # 1: the zygote itself, 2: rank 0, 3: rank 1
        raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))
    return real_fork()


os.fork = fork
started = time.monotonic()
try:
    px.launch(int, platform=px.Platform(device="cpu", n_procs=3))
except px.LaunchError as error:
    print(time.monotonic() - started < 10, error)
assert zygote.get_zygote().started_by == "fork"
workers = psutil.Process(zygote.get_zygote().pid).children()
print("ranks left:", len(psutil.wait_procs(workers, timeout=5)[1]))
"""
    result = run_script(script, timeout=90)
    assert result.returncode == 0, result.stderr[-3000:]
    first, last = result.stdout.strip().splitlines()
    assert first.startswith("True the zygote process could not fork rank 1 (1 of 3 ranks had started)"), first
    assert "RLIMIT_NPROC" in first and "fewer n_procs" in first
    assert last == "ranks left: 0"


def test_a_zygote_without_room_for_the_descriptors_refuses_the_job_with_launch_error():
    # The zygote inherits the low limit at import; the caller raises its own afterwards.
    script = """
import resource

soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (128, hard))
import phalanx as px
from phalanx.runners import zygote

resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
assert zygote.get_zygote().started_by == "fork"
try:
    px.launch(int, platform=px.Platform(device="cpu", n_procs=60))
except px.LaunchError as error:
    print(error)
print(px.launch(int, platform=px.Platform(device="cpu", n_procs=2)))
"""
    result = run_script(script, timeout=90)
    assert result.returncode == 0, result.stderr[-3000:]
    first, last = result.stdout.strip().splitlines()
    assert first.startswith("the zygote process received ") and "(RLIMIT_NOFILE: 128)" in first, first
    assert last == "[0, 0]"


def test_more_descriptors_than_the_caller_may_open_are_refused_before_anything_starts():
    script = """
import resource
import time

import phalanx as px

resource.setrlimit(resource.RLIMIT_NOFILE, (200, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
started = time.monotonic()
try:
    px.launch(int, platform=px.Platform(device="cpu", n_procs=40))
except px.LaunchError as error:
    print(time.monotonic() - started < 1, error)
"""
    result = run_script(script, timeout=90)
    assert result.returncode == 0, result.stderr[-3000:]
    message = result.stdout.strip()
    assert message.startswith("True cannot start 40 rank processes"), message
    assert "more than its limit of 200 (RLIMIT_NOFILE" in message and "ulimit -n" in message
    assert "fewer n_procs" in message


def test_more_processes_than_the_user_may_run_are_refused_before_anything_starts():
    # root is exempt from RLIMIT_NPROC in the kernel; the check is made to apply all the same.
    script = """
import os
import resource

import phalanx as px
from phalanx.runners import zygote

zygote._process_limit_applies = lambda: True
limit = zygote._tasks_of_user(os.getuid()) + 10
resource.setrlimit(resource.RLIMIT_NPROC, (limit, resource.getrlimit(resource.RLIMIT_NPROC)[1]))
try:
    px.launch(int, platform=px.Platform(device="cpu", n_procs=50))
except px.LaunchError as error:
    print(limit, error)
"""
    result = run_script(script, timeout=90)
    assert result.returncode == 0, result.stderr[-3000:]
    limit, message = result.stdout.strip().split(" ", 1)
    assert message.startswith("cannot start 50 rank processes"), message
    assert f"may run at most {limit} (RLIMIT_NPROC" in message and "ulimit -u" in message


def _barrier_then_rank():
    px.barrier()  # no rank ends while another still connects to it
    return px.get_rank()


@pytest.mark.timeout(300)
def test_a_hundred_ranks_start_with_their_descriptors_in_several_messages():
    assert 3 * 100 + 1 > zygote._MAX_FDS
    assert px.launch(_barrier_then_rank, platform=px.Platform(device="cpu", n_procs=100)) == list(range(100))
