"""Elastic restarts: Platform(max_restarts=k) restarts the whole group, which resumes from its checkpoint."""

from __future__ import annotations

import pytest

import phalanx as px

pytestmark = pytest.mark.timeout(90)


def _train_failing_on_the_first_tries(path: str, failing_tries: int):
    """Six steps, a checkpoint every two; rank 1 fails at step 5 on the first `failing_tries` tries."""
    ctx = px.Context(step=0)
    ctx.load(path, missing_ok=True)
    resumed_from = ctx.step
    while ctx.step < 6:
        ctx.step += 1
        if ctx.step % 2 == 0:
            ctx.save(path)
        if ctx.step == 5 and px.get_rank() == 1 and px.get_restart_count() < failing_tries:
            raise ValueError(f"injected at step 5, try {px.get_restart_count()}")
    return resumed_from, px.get_restart_count()


def test_a_failed_group_is_restarted_and_resumes_from_its_last_checkpoint(tmp_path, capfd):
    platform = px.Platform(device="cpu", n_procs=2, max_restarts=2)
    values = px.launch(_train_failing_on_the_first_tries, str(tmp_path / "ckpt.pt"), 2, platform=platform)
    assert values == [(4, 2), (4, 2)]  # the third try resumed at step 4, the last checkpoint
    assert "restarting every rank (restart 2 of 2)" in capfd.readouterr().err


def test_the_error_after_the_last_try_lists_every_attempt(tmp_path):
    platform = px.Platform(device="cpu", n_procs=2, max_restarts=1)
    with pytest.raises(px.WorkerError) as info:
        px.launch(_train_failing_on_the_first_tries, str(tmp_path / "ckpt.pt"), 5, platform=platform)
    error = info.value
    assert len(error.attempts) == 2 and error.attempts[-1] is error
    assert "the job failed 2 times (1 try and 1 restart(s))" in str(error)
    assert "attempt 1: rank 1 raised ValueError: injected at step 5, try 0" in str(error)
    assert "attempt 2: rank 1 raised ValueError: injected at step 5, try 1" in str(error)


def test_without_max_restarts_the_first_failure_is_final(tmp_path):
    with pytest.raises(px.WorkerError) as info:
        px.launch(
            _train_failing_on_the_first_tries, str(tmp_path / "c.pt"), 1, platform=px.Platform(device="cpu", n_procs=2)
        )
    assert info.value.attempts == [] and "try 0" in str(info.value)
