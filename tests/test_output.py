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
