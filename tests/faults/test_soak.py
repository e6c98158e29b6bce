"""The short soak: 20 launches, a fifth of them faulty, nothing left behind (bench/soak.py runs 200)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SOAK = Path(__file__).resolve().parents[2] / "bench" / "soak.py"


@pytest.mark.timeout(120)
def test_twenty_launches_with_injected_faults_leak_nothing():
    result = subprocess.run(
        [sys.executable, str(SOAK), "--launches", "20"], capture_output=True, text=True, timeout=110
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 faulty: raise 1, exit 1, kill 1, hang 1" in result.stdout
    assert "wrong outcomes 0" in result.stdout
    assert "leaked: processes 0, file descriptors 0, listening ports 0, shared memory files 0, temporary files 0" in (
        result.stdout
    )
