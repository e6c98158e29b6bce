"""The project itself: lint is clean, the example runs, the README's commands are the ones CI runs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.timeout(120)


def test_ruff_finds_nothing():
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    result = subprocess.run(
        [ruff, "check", "src", "tests", "examples", "bench"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    result = subprocess.run(
        [ruff, "format", "--check", "src", "tests", "examples", "bench"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hello_example_runs_on_two_cpu_processes():
    result = subprocess.run(
        [sys.executable, "examples/hello.py"], cwd=ROOT, capture_output=True, text=True, timeout=100
    )
    assert result.returncode == 0, result.stderr
    assert "results by rank: [18.0, 18.0]" in result.stdout
    assert "[rank 1] rank 1 of 2 on cpu" in result.stdout


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = (
        'bash scripts/setup-clusters.sh && pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest'
    )
    assert command in readme and command in ci


def test_digits_example_trains_to_at_least_95_percent_and_resumes(tmp_path):
    arguments = [sys.executable, str(ROOT / "examples" / "digits.py"), "--epochs", "12"]
    arguments += ["--logdir", str(tmp_path / "logs"), "--checkpoint", str(tmp_path / "ckpt.pt")]
    result = subprocess.run(arguments, cwd=tmp_path, capture_output=True, text=True, timeout=110)
    assert result.returncode == 0, result.stderr
    accuracy = float(result.stdout.strip().splitlines()[-1].removeprefix("test accuracy: "))
    assert accuracy >= 0.95
    assert (tmp_path / "ckpt.pt").exists() and any((tmp_path / "logs").iterdir())
    resumed = subprocess.run(
        [*arguments[:3], "14", *arguments[4:], "--resume"], cwd=tmp_path, capture_output=True, text=True, timeout=110
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and "after epoch 12" in resumed.stdout
