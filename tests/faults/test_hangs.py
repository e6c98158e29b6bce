"""Hangs: with Platform(timeout=...), a job that stops progressing is stopped, with every stack."""

from __future__ import annotations

import time

import pytest
import torch

import phalanx as px

pytestmark = pytest.mark.timeout(60)

TIMEOUT = 3.0
HANGING = px.Platform(device="cpu", n_procs=3, timeout=TIMEOUT)
MARGIN = 4.0  # for the report: stacks, stop, reaping, on a loaded 2-core machine


def _rank_2_stuck_in_user_code(release_path: str):
    if px.get_rank() == 2:
        while True:  # never reaches the collective
            time.sleep(0.05)
    px.all_reduce(torch.ones(1))


def test_a_rank_that_never_reaches_a_collective_is_named_with_every_stack(tmp_path):
    start = time.monotonic()
    with pytest.raises(px.HangError) as info:
        px.launch(_rank_2_stuck_in_user_code, str(tmp_path), platform=HANGING)
    elapsed = time.monotonic() - start
    error = info.value
    assert elapsed < TIMEOUT + MARGIN
    assert error.never_arrived == [2]
    assert "rank(s) [0, 1] waited in all_reduce" in str(error)
    assert "rank(s) [2] never arrived" in str(error)
    assert "in _rank_2_stuck_in_user_code" in error.stacks[2]  # where the stuck rank was
    assert "_become_worker" not in error.stacks[2]  # phalanx's own frames are cut off
    assert isinstance(error, px.WorkerError)


def _mismatched_collectives():
    if px.get_rank() == 0:
        px.barrier()
    else:
        px.all_gather(torch.ones(1))
    px.all_reduce(torch.ones(1))


def test_ranks_calling_mismatched_collectives_are_stopped_with_a_report():
    start = time.monotonic()
    with pytest.raises(px.WorkerError) as info:
        px.launch(_mismatched_collectives, platform=HANGING)
    assert time.monotonic() - start < TIMEOUT + MARGIN
    # gloo either times out (a hang report naming both collectives) or fails at once
    error = info.value
    if isinstance(error, px.HangError):
        assert "the ranks called different collectives" in error.verdict, error.verdict
        assert "barrier" in error.verdict and "all_gather" in error.verdict
    else:  # gloo noticed at once: the cause is its error, raised inside one of the collectives
        assert error.exc_type == "RuntimeError", str(error)
        assert any(name in error.traceback for name in ("barrier", "all_gather", "all_reduce")), error.traceback


def _rank_1_never_returns():
    if px.get_rank() == 1:
        while True:
            time.sleep(0.05)
    return px.get_rank()


def test_a_rank_still_running_timeout_after_the_others_returned_is_reported_as_hung():
    start = time.monotonic()
    with pytest.raises(px.HangError) as info:
        px.launch(_rank_1_never_returns, platform=px.Platform(device="cpu", n_procs=2, timeout=2))
    assert time.monotonic() - start < 2 + MARGIN
    error = info.value
    assert error.rank == 1 and error.never_arrived == [1]
    assert "had not returned 2 s after rank 0 did" in str(error)
    assert "in _rank_1_never_returns" in error.stacks[1]


def _caller_rank_stuck():
    if px.get_rank() == 0:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the caller's own rank, busy and never arriving
            time.sleep(0.05)
    px.barrier()


def test_the_callers_own_rank_is_in_the_hang_report_too():
    with pytest.raises(px.HangError) as info:
        px.launch(_caller_rank_stuck, platform=px.Platform(device="cpu", n_procs=2, timeout=2), caller_rank=0)
    error = info.value
    assert 0 in error.stacks and "in _caller_rank_stuck" in error.stacks[0]
    assert error.never_arrived == [0]
