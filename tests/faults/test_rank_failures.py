"""Failures: every way a rank can fail reaches the caller, fast, and nothing is left running."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import psutil
import pytest

import phalanx as px
from tests.conftest import CPU

pytestmark = pytest.mark.timeout(60)


def raise_on_rank_one_while_rank_zero_waits(ready_path):
    if px.get_rank() == 1:
        raise ValueError("bad learning rate 7")
    px.barrier()  # rank 0 blocks here, in a collective, forever


def test_raising_rank_reaches_caller_with_remote_traceback_within_seconds(tmp_path):
    start = time.monotonic()
    with pytest.raises(px.WorkerError) as info:
        px.launch(raise_on_rank_one_while_rank_zero_waits, str(tmp_path), platform=CPU)
    elapsed = time.monotonic() - start
    error = info.value
    assert elapsed < 5
    assert error.rank == 1
    assert error.exc_type == "ValueError"
    assert "bad learning rate 7" in str(error) and "rank 1" in str(error)
    assert "raise_on_rank_one_while_rank_zero_waits" in error.traceback
    assert 'raise ValueError("bad learning rate 7")' in error.traceback
    assert [f.rank for f in error.failures] == [1]


def test_error_is_an_exception_of_the_hierarchy():
    with pytest.raises(px.PhalanxError):
        px.launch(lambda: 1 / 0, platform=px.Platform(device="cpu", n_procs=1))


def test_root_cause_is_the_earliest_failure_not_the_first_report():
    def secondary_failure_on_rank_zero():
        if px.get_rank() == 1:
            raise KeyError("the real cause")
        px.barrier()  # fails (or is stopped) only because rank 1 is gone
        raise RuntimeError("consequence")

    with pytest.raises(px.WorkerError) as info:
        px.launch(secondary_failure_on_rank_zero, platform=CPU)
    assert info.value.rank == 1 and info.value.exc_type == "KeyError"
    assert not info.value.failures[0].lost_a_peer


def test_worker_error_orders_failures_by_time_whatever_the_report_order():
    late = px.RankFailure(rank=0, exc_type="RuntimeError", message="connection closed", traceback="", time=2.0)
    early = px.RankFailure(rank=3, exc_type="ValueError", message="bad", traceback="tb", time=1.0)
    error = px.WorkerError([late, early])
    assert error.rank == 3 and error.exc_type == "ValueError" and error.traceback == "tb"
    assert [f.rank for f in error.failures] == [3, 0]
    assert str(error).startswith("rank 3 raised ValueError: bad (ranks [0] failed after it)")


def test_a_lost_peer_error_is_never_the_cause_even_when_it_came_first():
    lost = px.RankFailure(0, "RuntimeError", "[pair.cc:553] Connection closed by peer [127.0.0.1]:1", "", time=1.0)
    died = px.RankFailure(1, "", "was killed by signal SIGKILL", "", time=1.2, signal_name="SIGKILL")
    error = px.WorkerError([lost, died])
    assert error.rank == 1 and error.signal_name == "SIGKILL"


def test_rank_calling_os_exit_is_reported_with_its_exit_code():
    def leave():
        if px.get_rank() == 1:
            os._exit(7)
        px.barrier()

    with pytest.raises(px.WorkerError) as info:
        px.launch(leave, platform=CPU)
    assert info.value.rank == 1
    assert info.value.exit_code == 7
    assert "exited with code 7" in str(info.value)


def test_rank_killed_by_sigkill_is_reported_with_the_signal_name():
    def die():
        if px.get_rank() == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        px.barrier()

    with pytest.raises(px.WorkerError) as info:
        px.launch(die, platform=CPU)
    assert info.value.rank == 0
    assert info.value.signal_name == "SIGKILL"
    assert "SIGKILL" in str(info.value)


def test_segfault_is_reported_with_the_python_stack_of_the_crash():
    def crash():
        if px.get_rank() == 1:
            import ctypes

            ctypes.string_at(0)  # reads address 0: SIGSEGV
        px.barrier()

    with pytest.raises(px.WorkerError) as info:
        px.launch(crash, platform=CPU)
    assert info.value.signal_name == "SIGSEGV"
    assert "segmentation fault" in str(info.value)
    assert "Fatal Python error" in info.value.traceback
    assert "in crash" in info.value.traceback


def test_unpicklable_argument_is_named_before_anything_starts():
    lock = threading.Lock()
    with pytest.raises(px.SerializationError, match=r"positional argument 1 .*lock"):
        px.launch(lambda a, b: None, 1, lock, platform=CPU)
    with pytest.raises(px.SerializationError, match=r"keyword argument 'guard'"):
        px.launch(lambda guard: None, guard=lock, platform=CPU)


def test_unpicklable_return_value_is_named():
    def give_lock():
        return threading.Lock()

    with pytest.raises(px.WorkerError) as info:
        px.launch(give_lock, platform=CPU)
    assert info.value.exc_type == "SerializationError"
    assert "return value of rank" in str(info.value)


def test_system_exit_in_a_rank_is_a_failure_not_a_success():
    def quit_early():
        sys.exit(3)

    with pytest.raises(px.WorkerError) as info:
        px.launch(quit_early, platform=CPU)
    assert info.value.exc_type == "SystemExit"


def test_failure_in_the_caller_rank_stops_the_workers():
    def fail_in_caller():
        if px.get_rank() == 0:
            raise ValueError("caller broke")
        px.barrier()

    with pytest.raises(px.WorkerError) as info:
        px.launch(fail_in_caller, platform=CPU, caller_rank=0)
    assert info.value.rank == 0 and info.value.exc_type == "ValueError"


def test_worker_failure_interrupts_the_caller_rank_busy_in_python():
    def busy_caller():
        if px.get_rank() == 1:
            raise ValueError("worker broke")
        while True:  # the caller's own rank, computing, never in a collective
            sum(range(1000))

    start = time.monotonic()
    with pytest.raises(px.WorkerError) as info:
        px.launch(busy_caller, platform=CPU, caller_rank=0)
    assert time.monotonic() - start < 5
    assert info.value.rank == 1 and "worker broke" in str(info.value)


def test_port_is_free_again_after_a_failure():
    def report_port():
        if px.get_rank() == 1:
            raise ValueError(os.environ["MASTER_PORT"])
        px.barrier()

    with pytest.raises(px.WorkerError) as info:
        px.launch(report_port, platform=CPU)
    port = int(str(info.value).splitlines()[0].rsplit(" ", 1)[1])
    listening = [c for c in psutil.Process().net_connections() if c.status == "LISTEN" and c.laddr.port == port]
    assert listening == []
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))


def test_master_port_taken_by_another_program_gives_a_clear_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(px.LaunchError, match=f"master_port={port}.*already in use"):
            px.launch(px.get_rank, platform=px.Platform(device="cpu", n_procs=2, master_port=port))


def test_store_listens_on_loopback_only():
    def listening_addresses():
        if px.get_rank() != 0:
            return None
        port = int(os.environ["MASTER_PORT"])  # rank 0 is the caller here, which hosts the store
        return sorted(
            {c.laddr.ip for c in psutil.Process().net_connections() if c.laddr.port == port and c.status == "LISTEN"}
        )

    assert px.launch(listening_addresses, platform=CPU, caller_rank=0)[0] == ["127.0.0.1"]


SCRIPT_WAITING_RANKS = """
import os, threading, phalanx as px

def wait_forever():
    print(f"ready {os.getpid()}", flush=True)
    threading.Event().wait()

px.launch(wait_forever, platform=px.Platform(device="cpu", n_procs=2))
"""


def _start_script_and_wait_for_ranks(source: str, ranks: int = 2, stdin: bool = False):
    process = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(source)],
        stdin=subprocess.PIPE if stdin else None,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    pids = []
    while len(pids) < ranks:  # each rank announces itself once it runs the function
        line = process.stdout.readline()
        assert line, process.stderr.read()
        if "ready" in line:
            pids.append(int(line.split()[-1]))
    return process, [psutil.Process(pid) for pid in pids]


def test_ctrl_c_in_the_caller_stops_every_rank_and_raises_keyboard_interrupt():
    process, ranks = _start_script_and_wait_for_ranks(SCRIPT_WAITING_RANKS)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=20)
    assert "KeyboardInterrupt" in stderr
    assert process.returncode != 0
    _, alive = psutil.wait_procs(ranks, timeout=1)
    assert alive == []


def test_ranks_exit_when_the_caller_is_killed():
    process, ranks = _start_script_and_wait_for_ranks(SCRIPT_WAITING_RANKS)
    process.kill()
    process.wait(timeout=10)
    _, alive = psutil.wait_procs(ranks, timeout=5)
    assert alive == []


SCRIPT_EXITING_WITH_A_LAUNCH_IN_A_THREAD = """
import os, sys, threading, phalanx as px

def wait_forever():
    print(f"ready {os.getpid()}", flush=True)
    threading.Event().wait()

threading.Thread(target=px.launch, args=(wait_forever,), kwargs={"platform": px.Platform(device="cpu", n_procs=2)},
                 daemon=True).start()
sys.stdin.readline()  # the test says when: once both ranks run
"""


def test_ranks_of_a_launch_still_running_when_the_caller_exits_are_stopped():
    process, ranks = _start_script_and_wait_for_ranks(SCRIPT_EXITING_WITH_A_LAUNCH_IN_A_THREAD, stdin=True)
    process.stdin.write("exit\n")
    process.stdin.flush()
    process.wait(timeout=20)
    _, alive = psutil.wait_procs(ranks, timeout=5)
    assert alive == []


def test_rank_that_cannot_unpickle_the_call_is_a_launch_error(tmp_path, monkeypatch):
    (tmp_path / "vanishing.py").write_text("def job():\n    return 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import vanishing

    (tmp_path / "vanishing.py").unlink()  # the ranks cannot import it any more
    with pytest.raises(px.LaunchError, match="could not start or meet") as info:
        px.launch(vanishing.job, platform=CPU)
    assert isinstance(info.value.__cause__, px.WorkerError)
    assert "ModuleNotFoundError" in str(info.value)


def test_rank_stopped_during_teardown_by_another_crash_is_still_reported():
    def crash_late():
        if px.get_rank() == 1:
            os._exit(5)
        px.barrier()

    for _ in range(3):  # a race in the reporting order used to hide the crashed rank
        with pytest.raises(px.WorkerError) as info:
            px.launch(crash_late, platform=CPU)
        assert info.value.rank == 1 and info.value.exit_code == 5


def _rank_one_fails_after_rank_zero_returned():
    if px.get_rank() == 1:
        px.barrier()
        raise ValueError("rank 1 fails once rank 0 is done")
    px.barrier()
    return "rank 0 done"


def test_caller_rank_environment_is_restored_when_another_rank_fails_after_it_returned():
    before = dict(os.environ)
    with pytest.raises(px.WorkerError, match="rank 1 fails once rank 0 is done"):
        px.launch(_rank_one_fails_after_rank_zero_returned, platform=CPU, caller_rank=0)
    assert dict(os.environ) == before
    assert px.get_world_size() == 1 and px.get_rank() == 0


def _fail_in_rank_1_else_compute():
    if px.get_rank() == 1:
        raise ValueError("worker broke")
    while True:  # the caller's own rank, computing, never in a collective
        sum(range(1000))


def test_a_worker_that_fails_before_the_caller_rank_starts_its_function_still_stops_it(monkeypatch):
    """The worker's failure lands while the caller rank is still setting up: nothing to interrupt yet."""
    from phalanx.runners import caller, local

    recorded = threading.Event()
    real_fail, real_session = local.LocalJob.fail, caller.rank_session

    def fail(job, failure):
        real_fail(job, failure)
        if failure in job.failures:  # not the monitor's batched first call
            recorded.set()

    @contextlib.contextmanager
    def late_session(*args):
        with real_session(*args):
            assert recorded.wait(30), "rank 1 never failed"
            yield

    monkeypatch.setattr(local.LocalJob, "fail", fail)
    monkeypatch.setattr(caller, "rank_session", late_session)
    start = time.monotonic()
    with pytest.raises(px.WorkerError) as info:
        px.launch(_fail_in_rank_1_else_compute, platform=CPU, caller_rank=0)
    assert time.monotonic() - start < 20
    assert info.value.rank == 1 and "worker broke" in str(info.value)
