"""Rank output reaches the caller, a line at a time, prefixed with the rank unless switched off."""

from __future__ import annotations

import sys

import pytest

import phalanx as px

pytestmark = pytest.mark.timeout(60)


def speak():
    print(f"hello from {px.get_rank()}")
    print(f"warning from {px.get_rank()}", file=sys.stderr)
    print("no newline at the end", end="")


def test_rank_output_is_prefixed_with_its_rank(capsys):
    px.launch(speak, platform=px.Platform(device="cpu", n_procs=2))
    out, err = capsys.readouterr()
    assert "[rank 0] hello from 0\n" in out and "[rank 1] hello from 1\n" in out
    assert "[rank 0] warning from 0\n" in err and "[rank 1] warning from 1\n" in err
    assert "[rank 1] no newline at the end\n" in out


def test_prefix_can_be_switched_off(capsys):
    px.launch(speak, platform=px.Platform(device="cpu", n_procs=2, rank_prefix=False))
    out, _ = capsys.readouterr()
    assert "hello from 1\n" in out and "[rank" not in out


def test_console_logs_can_be_silenced(capsys):
    px.launch(speak, platform=px.Platform(device="cpu", n_procs=2, console_logs=False))
    out, err = capsys.readouterr()
    assert "hello" not in out and "warning" not in err


def test_failure_report_keeps_the_output_tail_even_when_silenced():
    def say_then_die():
        print("last words", file=sys.stderr, flush=True)
        import os

        os._exit(3)

    with pytest.raises(px.WorkerError) as info:
        px.launch(say_then_die, platform=px.Platform(device="cpu", n_procs=1, console_logs=False))
    assert "last words" in info.value.failures[0].output_tail
    assert "last words" in str(info.value)


def test_progress_bar_keeps_its_final_state_through_a_launch(capsys):
    def progress():
        import sys

        for step in range(3):
            sys.stderr.write(f"\rstep {step}/3")
            sys.stderr.flush()
        sys.stderr.write("\rdone 3/3\n")

    px.launch(progress, platform=px.Platform(device="cpu", n_procs=1))
    _, err = capsys.readouterr()
    assert err.endswith("[rank 0] done 3/3\n")


def test_redraws_arriving_separately_are_shown_in_place_at_once(capsys):
    from phalanx.runners.output import RankOutput

    output = RankOutput(1, "stderr", show=True, prefix=True)
    output.feed(b"\rstep 0/3")  # not known to be complete until the next carriage return
    assert capsys.readouterr().err == ""
    output.feed(b"\rstep 1/3\rstep 2")
    assert capsys.readouterr().err == "\r[rank 1] step 1/3"  # the newest complete state only
    output.feed(b"/3\rdone\n")
    assert capsys.readouterr().err == "[rank 1] done\n"


def test_output_tail_keeps_the_last_state_of_a_redrawn_line():
    from phalanx.runners.output import RankOutput

    output = RankOutput(0, "stderr", show=False, prefix=True)
    output.feed(b"10%\r20%\r30%\nnext")
    output.close()
    assert output.tail_text() == "30%\nnext"
