"""Notebooks, for real: a Jupyter kernel runs cells that define functions and launch them."""

from __future__ import annotations

import re

import nbclient
import nbformat
import pytest

pytestmark = pytest.mark.timeout(180)

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def run_notebook(*cells: str) -> list[str]:
    """Execute the cells in a fresh kernel; return each cell's text output (streams and results)."""
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source) for source in cells])
    client = nbclient.NotebookClient(notebook, kernel_name="python3", timeout=120)
    client.execute()
    texts = []
    for cell in notebook.cells:
        parts = []
        for output in cell.outputs:
            if output.output_type == "stream":
                parts.append(output.text)
            elif output.output_type == "execute_result":
                parts.append(output.data.get("text/plain", ""))
            elif output.output_type == "error":
                parts.append(_ANSI.sub("", "\n".join(output.traceback)))
        texts.append("".join(parts))
    return texts


def test_function_and_class_defined_in_a_cell_launch_on_two_ranks():
    outputs = run_notebook(
        """
import phalanx as px

class Scaler:
    def __init__(self, factor):
        self.factor = factor

def work(scaler):
    print("computing on", px.get_rank())
    return Scaler(scaler.factor * (px.get_rank() + 1))
""",
        """
results = px.launch(work, Scaler(10), platform=px.Platform(device="cpu", n_procs=2))
print("results:", [r.factor for r in results])
""",
    )
    assert "results: [10, 20]" in outputs[1]
    assert "[rank 0] computing on 0" in outputs[1] and "[rank 1] computing on 1" in outputs[1]


def test_notebook_launches_twice_then_as_caller_rank_zero():
    outputs = run_notebook(
        """
import os, phalanx as px
from phalanx.runners import zygote

TWO = px.Platform(device="cpu", n_procs=2)

def where():
    return px.get_rank(), os.getpid()
""",
        "first = px.launch(where, platform=TWO)\nprint('first', [r for r, _ in first])",
        "second = px.launch(where, platform=TWO)\nprint('second', [r for r, _ in second])",
        """
kept = []
def remember():
    kept.append(px.get_rank())
    return px.get_rank(), os.getpid()
third = px.launch(remember, platform=px.Platform(device='cpu', n_procs=2), caller_rank=0)
print('third', [r for r, _ in third], 'kept', kept, 'caller pid used', third[0][1] == os.getpid())
print('zygote', zygote.get_zygote().started_by)
""",
    )
    assert "first [0, 1]" in outputs[1]
    assert "second [0, 1]" in outputs[2]
    assert "third [0, 1] kept [0] caller pid used True" in outputs[3]
    assert "zygote exec" in outputs[3]  # a kernel has threads: its zygote is started by exec


def test_failure_in_a_notebook_shows_the_remote_traceback():
    outputs = run_notebook(
        "import phalanx as px",
        """
def broken():
    if px.get_rank() == 1:
        raise ZeroDivisionError("cell code failed")
    px.barrier()

try:
    px.launch(broken, platform=px.Platform(device="cpu", n_procs=2))
except px.WorkerError as error:
    print("caught", error.rank, error.exc_type)
    print(error.traceback)
""",
    )
    assert "caught 1 ZeroDivisionError" in outputs[1]
    assert "cell code failed" in outputs[1] and "in broken" in outputs[1]
