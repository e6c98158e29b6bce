"""Shared fixtures: every test that starts processes must leave none behind."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import psutil
import pytest

import phalanx as px
from phalanx.runners import zygote

CPU = px.Platform(device="cpu", n_procs=2)


def _become_subreaper() -> None:
    """Orphans of the scripts a test runs are re-parented here, so a leak cannot hide under init."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_child_subreaper = 36
        ctypes.CDLL(None).prctl(pr_set_child_subreaper, 1, 0, 0, 0)


_become_subreaper()


def _reap_orphans() -> None:
    helpers = set(zygote.helper_pids())
    for child in psutil.Process().children():
        try:
            if child.pid not in helpers and child.status() == psutil.STATUS_ZOMBIE:
                os.waitpid(child.pid, os.WNOHANG)
        except (psutil.NoSuchProcess, ChildProcessError):
            pass


def _leftovers() -> list[psutil.Process]:
    """Descendants of this test process, except the zygote phalanx keeps on purpose."""
    children = psutil.Process().children(recursive=True)
    helpers = set(zygote.helper_pids())  # after the children: a zygote started in between is one
    left = []
    for child in children:
        try:
            if child.pid in helpers or child.status() == psutil.STATUS_ZOMBIE:
                continue
            left.append(child)
        except psutil.NoSuchProcess:
            continue
    return left


@pytest.fixture(autouse=True)
def no_process_left_behind():
    """Fail the test if any process it started outlives it (the zygote alone may stay)."""
    before = {p.pid for p in _leftovers()}
    yield
    # Processes the test ran through subprocess are waited for by the test itself; anything
    # still alive now is a leak. Give exiting processes a bounded moment to be reaped.
    left = [p for p in _leftovers() if p.pid not in before]
    _, alive = psutil.wait_procs(left, timeout=5)
    _reap_orphans()
    assert not alive, f"processes left behind: {[(p.pid, p.cmdline()) for p in alive]}"


def run_script(source: str, *, timeout: float = 60, stdin: str | None = None, env: dict | None = None):
    """Run Python source in a fresh interpreter (as a user's script would be), return the result."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(source)] if stdin is None else [sys.executable, "-"],
        input=stdin if stdin is not None else None,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI a cluster test must run: a skip there (no MPI, no namespaces) is a failure."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("CI") and item.get_closest_marker("cluster") is not None:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"cluster test skipped in CI, where .ci/run must provide it: {reason}"
