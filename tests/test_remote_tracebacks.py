"""A rank's traceback names the caller's files and shows their lines: scripts, stdin, notebook cells."""

from __future__ import annotations

import linecache
import os
import subprocess
import sys
import textwrap

import pytest

from phalanx.runners import source_lines
from phalanx.runners.channel import dumps_call, loads_call
from tests.test_notebook import run_notebook

pytestmark = pytest.mark.timeout(180)

SCRIPT = """\
import phalanx as px

def divide(x):
    return 1 / x

def work():
    if px.get_rank() == 1:
        divide(0)
    return px.get_rank()

if __name__ == "__main__":
    try:
        px.launch(work, platform=px.Platform(device="cpu", n_procs=2))
    except px.WorkerError as error:
        print(error.traceback)
"""


def _line_of(source: str, text: str) -> int:
    return next(number for number, line in enumerate(source.splitlines(), 1) if line.strip() == text)


def _python(*arguments: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *arguments], input=stdin, capture_output=True, text=True, timeout=100, check=False
    )


def test_function_of_a_script_fails_with_the_script_name_and_its_lines(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    result = _python(str(script))
    assert result.returncode == 0, result.stderr
    assert f'File "{script}", line {_line_of(SCRIPT, "divide(0)")}, in work\n    divide(0)' in result.stdout
    assert f'File "{script}", line {_line_of(SCRIPT, "return 1 / x")}, in divide\n    return 1 / x' in result.stdout
    assert "<dynamic-code>" not in result.stdout


def test_function_read_from_stdin_fails_with_stdin_and_the_line_number():
    result = _python("-", stdin=SCRIPT)
    assert result.returncode == 0, result.stderr
    # Python itself has no lines for stdin either: the name and the number are what it shows.
    assert f'File "<stdin>", line {_line_of(SCRIPT, "divide(0)")}, in work' in result.stdout
    assert f'File "<stdin>", line {_line_of(SCRIPT, "return 1 / x")}, in divide' in result.stdout
    assert "ZeroDivisionError: division by zero" in result.stdout
    assert "<dynamic-code>" not in result.stdout


def test_function_of_a_notebook_cell_fails_with_the_cell_name_and_its_lines():
    cell = textwrap.dedent(
        """\
        def check(value):
            if value < 0:
                raise ValueError(f"negative: {value}")
            return value

        def work():
            return check(-px.get_rank())
        """
    )
    outputs = run_notebook(
        "import phalanx as px",
        cell,  # In[2]
        """\
try:
    px.launch(work, platform=px.Platform(device="cpu", n_procs=2))
except px.WorkerError as error:
    print(error.traceback)
""",
    )
    raising = 'raise ValueError(f"negative: {value}")'
    assert f'File "Cell In[2]", line {_line_of(cell, raising)}, in check\n    {raising}' in outputs[2]
    assert f'File "Cell In[2]", line {_line_of(cell, "return check(-px.get_rank())")}, in work' in outputs[2]
    assert "ValueError: negative: -1" in outputs[2]


def test_phalanx_run_reports_the_script_name_and_its_lines(tmp_path):
    source = "import phalanx as px\n\ndef divide(x):\n    return 1 / x\n\nif px.get_rank() == 1:\n    divide(0)\n"
    script = tmp_path / "job.py"
    script.write_text(source)
    result = _python("-m", "phalanx", "run", "--nproc-per-node", "2", "--device", "cpu", str(script))
    assert result.returncode == 1, result.stderr
    assert f'File "{script}", line {_line_of(source, "return 1 / x")}, in divide\n    return 1 / x' in result.stderr


def _function_from(filename: str, source: str, name: str):
    """A function compiled from `source` under `filename` whose module the ranks cannot import."""
    namespace = {"__name__": "a_module_no_rank_can_import"}
    exec(compile(source, filename, "exec"), namespace)
    return namespace[name]


def test_lines_held_only_in_the_callers_memory_travel_with_the_call():
    filename = "<held-in-memory>"
    source = "def fail():\n    raise RuntimeError('from memory')\n"
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    try:
        payload = dumps_call(_function_from(filename, source, "fail"), (), {})
        del linecache.cache[filename]  # as in a rank, which never had them
        fn, _, _ = loads_call(payload)
        assert fn.__code__.co_filename == filename
        assert linecache.getline(filename, 2) == "    raise RuntimeError('from memory')\n"
    finally:
        linecache.cache.pop(filename, None)


def test_code_from_a_module_file_keeps_its_name_and_sends_no_lines():
    def nested():  # sent by value, but its file is this module's: a rank reads it itself
        return 1

    payload = dumps_call(nested, (), {})
    fn, _, _ = loads_call(payload)
    assert fn.__code__.co_filename == __file__
    assert source_lines.sources_for({__file__: __file__}) == {}
    assert len(payload) < 2000  # this file's 5 kB of lines are not in it
    assert os.path.isfile(fn.__code__.co_filename)
