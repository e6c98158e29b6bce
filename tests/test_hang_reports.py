"""phalanx.runners.hangs: reading faulthandler dumps and tracebacks into a hang verdict (no processes).

The inputs are what real ranks produce: faulthandler dumps written on SIGUSR1 (`line 12 in f`,
newest frame first, the other threads before the main one), reversed `traceback.format_list`
stacks (`line 12, in f` and the source line) and tracebacks of gloo timeouts (oldest first).
"""

from __future__ import annotations

import time

import pytest

from phalanx.errors import RankFailure
from phalanx.runners.hangs import collective_in, hang_verdict, innermost_frame, looks_like_timeout, trim_dump

TORCH = "/venv/lib/python3.11/site-packages/torch/distributed"
PHALANX = "/venv/lib/python3.11/site-packages/phalanx"
THREADING = "/usr/lib/python3.11/threading.py"
GLOO = "[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78]"
GLOO_TIMEOUT = f"{GLOO} Timed out waiting 3000ms for recv operation to complete"

# A rank blocked in px.all_gather (torch's all_gather_object, which runs all_gather), with a
# DataLoader pin-memory thread: faulthandler lists that thread first and the main thread last.
DUMP_IN_ALL_GATHER_OBJECT = f"""\
Thread 0x00007f88323106c0 (most recent call first):
  File "{THREADING}", line 324 in wait
  File "/venv/lib/python3.11/site-packages/torch/utils/data/_utils/pin_memory.py", line 52 in _pin_memory_loop
  File "{THREADING}", line 982 in run
  File "{THREADING}", line 1045 in _bootstrap_inner
  File "{THREADING}", line 1002 in _bootstrap

Current thread 0x00007f88562b2b80 (most recent call first):
  File "{TORCH}/distributed_c10d.py", line 4287 in all_gather
  File "{TORCH}/c10d_logger.py", line 83 in wrapper
  File "{TORCH}/distributed_c10d.py", line 3513 in all_gather_object
  File "{TORCH}/c10d_logger.py", line 83 in wrapper
  File "{PHALANX}/dist.py", line 159 in all_gather
  File "/home/me/train.py", line 10 in step
  File "/home/me/train.py", line 21 in train
  File "{PHALANX}/rank_state.py", line 67 in call_rank_function
  File "{PHALANX}/runners/worker.py", line 211 in run_rank
  File "{PHALANX}/runners/zygote.py", line 654 in _become_worker
  File "{PHALANX}/runners/zygote.py", line 600 in _accept_job
  File "{PHALANX}/runners/zygote.py", line 560 in run
  File "{PHALANX}/runners/zygote.py", line 770 in _serve
  File "{PHALANX}/runners/zygote.py", line 273 in _fork_zygote
  File "{PHALANX}/__init__.py", line 92 in <module>
  File "/home/me/train.py", line 1 in <module>
"""

# A rank busy in its own code, with a background thread (a checkpoint being written) first.
DUMP_IN_USER_CODE = f"""\
Thread 0x00007f18b9a116c0 (most recent call first):
  File "/venv/lib/python3.11/site-packages/torch/serialization.py", line 880 in _save
  File "{THREADING}", line 982 in run
  File "{THREADING}", line 1045 in _bootstrap_inner
  File "{THREADING}", line 1002 in _bootstrap

Current thread 0x00007f18dd277b80 (most recent call first):
  File "/home/me/train.py", line 14 in load_batch
  File "/home/me/train.py", line 21 in train
  File "{PHALANX}/rank_state.py", line 67 in call_rank_function
  File "{PHALANX}/runners/worker.py", line 211 in run_rank
  File "{PHALANX}/runners/zygote.py", line 654 in _become_worker
"""

# The traceback a rank reports when gloo gives up waiting in all_gather_object.
TRACEBACK_ALL_GATHER_OBJECT_TIMEOUT = f"""\
Traceback (most recent call last):
  File "/home/me/train.py", line 10, in step
    px.all_gather({{"a": 1}})
  File "{PHALANX}/dist.py", line 159, in all_gather
    dist.all_gather_object(gathered, obj)
  File "{TORCH}/c10d_logger.py", line 83, in wrapper
    return func(*args, **kwargs)
           ^^^^^^^^^^^^^^^^^^^^^
  File "{TORCH}/distributed_c10d.py", line 3513, in all_gather_object
    all_gather(object_size_list, local_size, group=group)
  File "{TORCH}/c10d_logger.py", line 83, in wrapper
    return func(*args, **kwargs)
           ^^^^^^^^^^^^^^^^^^^^^
  File "{TORCH}/distributed_c10d.py", line 4287, in all_gather
    work.wait()
RuntimeError: {GLOO} Timed out waiting 3000ms for send operation to complete
"""


def _failure(exc_type: str = "RuntimeError", message: str = GLOO_TIMEOUT, **fields) -> RankFailure:
    return RankFailure(rank=0, exc_type=exc_type, message=message, traceback="", time=time.time(), **fields)


# -- looks_like_timeout -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        GLOO_TIMEOUT,
        "wait timeout after 3000ms, keys: /default_pg/0//cpu//0",  # the store's DistStoreError
        "Socket Timeout",
    ],
)
def test_a_collective_or_store_timeout_is_a_sign_of_a_hang(message):
    assert looks_like_timeout(_failure(message=message))


def test_an_ordinary_exception_is_no_sign_of_a_hang():
    assert not looks_like_timeout(_failure(exc_type="ValueError", message="shapes (2, 3) and (4,) differ"))


def test_an_nccl_watchdog_abort_is_a_sign_of_a_hang():
    tail = (
        "[rank1]:[E ProcessGroupNCCL.cpp:616] [Rank 1] Watchdog caught collective operation timeout: "
        "WorkNCCL(SeqNum=3, OpType=ALLREDUCE, Timeout(ms)=3000) ran for 3005 milliseconds before timing out."
    )
    killed = _failure(exc_type="", message="was killed by SIGABRT", signal_name="SIGABRT", output_tail=tail)
    assert looks_like_timeout(killed)


def test_an_abort_or_a_kill_without_a_timeout_message_is_no_sign_of_a_hang():
    aborted = _failure(exc_type="", message="was killed by SIGABRT", signal_name="SIGABRT", output_tail="double free")
    timed_out_then_killed = _failure(exc_type="", message="", signal_name="SIGKILL", output_tail="Timed out")
    assert not looks_like_timeout(aborted)
    assert not looks_like_timeout(timed_out_then_killed)  # only NCCL's abort says it timed out


# -- collective_in ------------------------------------------------------------------------------


def test_a_dump_names_the_collective_as_called_not_the_ones_torch_builds_it_from():
    assert collective_in(DUMP_IN_ALL_GATHER_OBJECT, newest_first=True) == "all_gather_object"


def test_a_traceback_names_the_collective_as_called_not_the_ones_torch_builds_it_from():
    assert collective_in(TRACEBACK_ALL_GATHER_OBJECT_TIMEOUT, newest_first=False) == "all_gather_object"


def test_a_single_collective_is_found_in_both_orders():
    oldest_first = [
        '  File "/home/me/train.py", line 5, in step',
        f'  File "{TORCH}/distributed_c10d.py", line 3252, in all_reduce',
    ]
    assert collective_in("\n".join(oldest_first), newest_first=False) == "all_reduce"
    assert collective_in("\n".join(reversed(oldest_first)), newest_first=True) == "all_reduce"


def test_a_stack_outside_any_collective_has_none():
    assert collective_in(DUMP_IN_USER_CODE, newest_first=True) is None


def test_an_empty_stack_has_no_collective():
    assert collective_in("", newest_first=True) is None
    assert collective_in("", newest_first=False) is None


def test_a_query_of_the_group_is_no_wait():
    busy = f"""\
Current thread 0x00007f18dd277b80 (most recent call first):
  File "{TORCH}/distributed_c10d.py", line 2401 in get_rank
  File "{PHALANX}/dist.py", line 67 in get_rank
  File "/home/me/train.py", line 14 in train
"""
    assert collective_in(busy, newest_first=True) is None


# A background thread of the user's waiting in barrier, as faulthandler lists it: before the main thread.
BARRIER_IN_A_BACKGROUND_THREAD = f"""\
Thread 0x00007f88323106c0 (most recent call first):
  File "{TORCH}/distributed_c10d.py", line 4822 in barrier
  File "/home/me/train.py", line 30 in sync_in_background
  File "{THREADING}", line 982 in run

"""


def test_a_collective_in_another_thread_counts_when_the_main_thread_is_in_none():
    dump = (
        BARRIER_IN_A_BACKGROUND_THREAD
        + """\
Current thread 0x00007f88562b2b80 (most recent call first):
  File "/home/me/train.py", line 14 in load_batch
"""
    )
    assert collective_in(dump, newest_first=True) == "barrier"


def test_the_main_threads_collective_comes_before_another_threads():
    dump = f"""\
Thread 0x00007f88323106c0 (most recent call first):
  File "{TORCH}/distributed_c10d.py", line 4822 in barrier
  File "{THREADING}", line 982 in run

Current thread 0x00007f88562b2b80 (most recent call first):
  File "{TORCH}/distributed_c10d.py", line 3252 in all_reduce
  File "/home/me/train.py", line 14 in train
"""
    assert collective_in(dump, newest_first=True) == "all_reduce"


def test_the_last_chained_traceback_with_a_collective_names_it():
    """A timeout the user caught and turned into an error of their own, raised outside the collective."""
    chained = f"""\
{TRACEBACK_ALL_GATHER_OBJECT_TIMEOUT}
The above exception was the direct cause of the following exception:

Traceback (most recent call last):
  File "/home/me/train.py", line 12, in step
    raise TrainingError("peers did not answer") from error
TrainingError: peers did not answer: timed out
"""
    assert collective_in(chained, newest_first=False) == "all_gather_object"


def test_of_two_chained_timeouts_the_one_raised_last_names_the_collective():
    """The handler of an all_reduce timeout called barrier, which timed out too: barrier is where it waits."""
    chained = f"""\
Traceback (most recent call last):
  File "/home/me/train.py", line 10, in step
    dist.all_reduce(loss)
  File "{TORCH}/distributed_c10d.py", line 3252, in all_reduce
    work.wait()
RuntimeError: {GLOO_TIMEOUT}

During handling of the above exception, another exception occurred:

Traceback (most recent call last):
  File "/home/me/train.py", line 12, in step
    dist.barrier()
  File "{TORCH}/distributed_c10d.py", line 4822, in barrier
    work.wait()
RuntimeError: {GLOO_TIMEOUT}
"""
    assert collective_in(chained, newest_first=False) == "barrier"


def test_a_query_in_the_main_thread_does_not_hide_another_threads_collective():
    dump = (
        BARRIER_IN_A_BACKGROUND_THREAD
        + f"""\
Current thread 0x00007f88562b2b80 (most recent call first):
  File "{TORCH}/distributed_c10d.py", line 2401 in get_rank
  File "/home/me/train.py", line 14 in train
"""
    )
    assert collective_in(dump, newest_first=True) == "barrier"


# -- innermost_frame ----------------------------------------------------------------------------


def test_the_innermost_frame_is_the_main_threads_not_the_first_listed():
    assert innermost_frame(DUMP_IN_USER_CODE) == "still running, at /home/me/train.py:14 in load_batch"


def test_without_a_current_thread_the_main_thread_is_the_last_listed():
    dump = DUMP_IN_USER_CODE.replace("Current thread", "Thread")
    assert innermost_frame(dump) == "still running, at /home/me/train.py:14 in load_batch"


def test_the_innermost_frame_of_a_formatted_stack_without_thread_lines():
    stack = (
        '  File "/home/me/notebook.py", line 7, in spin\n    time.sleep(0.05)\n'
        '  File "/home/me/notebook.py", line 12, in train\n    spin()\n'
    )
    assert innermost_frame(stack) == "still running, at /home/me/notebook.py:7 in spin"


def test_a_stack_without_frames_is_still_running_somewhere():
    assert innermost_frame("") == "still running"
    assert innermost_frame("Current thread 0x00007f18dd277b80 (most recent call first):\n  <no Python frame>") == (
        "still running"
    )


# -- trim_dump ----------------------------------------------------------------------------------


def test_trim_dump_cuts_phalanx_frames_below_the_function_in_every_thread():
    trimmed = trim_dump(DUMP_IN_ALL_GATHER_OBJECT)
    assert "call_rank_function" not in trimmed and "_become_worker" not in trimmed
    assert 'train.py", line 1 in <module>' not in trimmed  # the caller's import of phalanx, in the zygote
    assert trimmed.splitlines()[-1] == '  File "/home/me/train.py", line 21 in train'
    assert "_pin_memory_loop" in trimmed and f'{THREADING}", line 1002 in _bootstrap' in trimmed  # other thread whole
    assert f'"{PHALANX}/dist.py", line 159 in all_gather' in trimmed  # phalanx frames above the user's stay


def test_trim_dump_cuts_each_thread_on_its_own():
    """The function runs in a thread of its own (listed first); the main thread below is kept whole."""
    dump = f"""\
Thread 0x00007f88323106c0 (most recent call first):
  File "/home/me/train.py", line 14 in step
  File "{PHALANX}/rank_state.py", line 67 in call_rank_function
  File "{THREADING}", line 982 in run

Current thread 0x00007f88562b2b80 (most recent call first):
  File "{THREADING}", line 1116 in _wait_for_tstate_lock
  File "/home/me/main.py", line 5 in <module>
"""
    assert trim_dump(dump).splitlines() == [
        "Thread 0x00007f88323106c0 (most recent call first):",
        '  File "/home/me/train.py", line 14 in step',
        "Current thread 0x00007f88562b2b80 (most recent call first):",
        f'  File "{THREADING}", line 1116 in _wait_for_tstate_lock',
        '  File "/home/me/main.py", line 5 in <module>',
    ]


def test_trim_dump_keeps_a_users_function_named_like_phalanxs_entry():
    dump = """\
Current thread 0x00007f18dd277b80 (most recent call first):
  File "/home/me/train.py", line 14 in step
  File "/home/me/train.py", line 30 in run_rank
  File "/home/me/train.py", line 40 in main
"""
    assert trim_dump(dump) == dump.strip()


def test_trim_dump_cuts_a_formatted_stack_and_its_source_lines():
    stack = (
        '  File "/home/me/train.py", line 7, in spin\n    time.sleep(0.05)\n'
        f'  File "{PHALANX}/rank_state.py", line 67, in call_rank_function\n    value = fn(*args, **kwargs)\n'
        f'  File "{PHALANX}/runners/joined.py", line 230, in run_joined\n'
        "    value = call_rank_function(fn, args, kwargs)\n"
    )
    assert trim_dump(stack) == '  File "/home/me/train.py", line 7, in spin\n    time.sleep(0.05)'


def test_trim_dump_of_nothing_is_nothing():
    assert trim_dump("") == ""
    assert trim_dump("\n\n") == ""


def test_trim_dump_keeps_a_crash_reports_first_lines():
    crash = f"""\
Fatal Python error: Segmentation fault

Current thread 0x00007f18dd277b80 (most recent call first):
  File "/home/me/ext.py", line 3 in crash
  File "{PHALANX}/rank_state.py", line 67 in call_rank_function
"""
    assert trim_dump(crash) == (
        "Fatal Python error: Segmentation fault\n\n"
        "Current thread 0x00007f18dd277b80 (most recent call first):\n"
        '  File "/home/me/ext.py", line 3 in crash'
    )


# -- hang_verdict -------------------------------------------------------------------------------


def test_the_verdict_names_who_waited_and_who_never_arrived():
    verdict = hang_verdict(
        [0, 1, 2],
        {0: "all_reduce", 1: "all_reduce"},
        {2: "still running, at train.py:10 in train"},
    )
    assert verdict == (
        "rank(s) [0, 1] waited in all_reduce; rank(s) [2] never arrived; rank 2: still running, at train.py:10 in train"
    )


def test_the_verdict_says_when_the_ranks_called_different_collectives():
    verdict = hang_verdict([0, 1, 2], {0: "barrier", 1: "all_gather_object", 2: "all_gather_object"}, {})
    assert verdict == (
        "rank(s) [1, 2] waited in all_gather_object; rank(s) [0] waited in barrier; "
        "the ranks called different collectives: every rank must call the same ones in the same order"
    )


def test_the_verdict_without_any_waiting_rank_says_where_each_one_is():
    verdict = hang_verdict([0, 1], {}, {1: "still running, at train.py:3 in spin", 0: "had returned"})
    assert verdict == "rank 0: had returned; rank 1: still running, at train.py:3 in spin"
    assert "never arrived" not in verdict


def test_the_verdict_when_every_rank_waits_in_the_same_collective():
    assert hang_verdict([0, 1], {1: "barrier", 0: "barrier"}, {}) == "rank(s) [0, 1] waited in barrier"


def test_the_verdict_of_nothing_is_empty():
    assert hang_verdict([], {}, {}) == ""
