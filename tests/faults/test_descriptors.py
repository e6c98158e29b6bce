"""Descriptors the caller held at `import phalanx` (see phalanx.runners.zygote's docstring).

A zygote taken by fork, and so every rank, holds the Python objects of the caller that use
those descriptors (a log file of `logging.basicConfig`, pytest's handlers): their numbers must
never be re-used by something else inside a rank, nor a pipe or socket be held open by the
zygote. Each test runs a script in a fresh interpreter, since what matters is what was open
when phalanx was imported.
"""

from __future__ import annotations

import textwrap

import pytest

from tests.conftest import run_script

pytestmark = pytest.mark.timeout(120)

# Each rank opens four data files, writes to them, logs a line through the root logger's
# handlers it inherited, closes those handlers, and writes again: a data file that shares a
# number with a handler would get the log line, or be closed under the rank (EBADF).
RANK_FUNCTION = """
import logging
import os

import phalanx as px


def write_data_and_log(folder):
    rank = px.get_rank()
    files = [open(os.path.join(folder, f"data-{rank}-{index}.txt"), "w") for index in range(4)]
    for file in files:
        file.write("data\\n")
        file.flush()
    logging.warning("the line of rank %d", rank)
    for handler in logging.getLogger().handlers:
        handler.close()
    for file in files:
        file.write("more\\n")
        file.close()
"""


def _assert_data_files_hold_only_data(folder, ranks=2):
    paths = sorted(folder.glob("data-*.txt"))
    assert len(paths) == 4 * ranks
    for path in paths:
        assert path.read_text() == "data\nmore\n", path.name


def test_a_log_file_opened_before_the_import_gets_the_ranks_lines_and_never_their_data(tmp_path):
    data, log = tmp_path / "data", tmp_path / "caller.log"
    data.mkdir()
    script = f"""
import logging
import os

held = [open(os.devnull) for _ in range(3)]  # the log file's number lies above a few others
logging.basicConfig(filename={str(log)!r}, level=logging.INFO)  # mode "a": O_APPEND
logging.info("the caller, before")
{RANK_FUNCTION}
from phalanx.runners import zygote

assert zygote.get_zygote().started_by == "fork"
px.launch(write_data_and_log, {str(data)!r}, platform=px.Platform(device="cpu", n_procs=2))
logging.info("the caller, after")
print("launched")
"""
    result = run_script(script, timeout=90)
    assert result.returncode == 0 and "launched" in result.stdout, result.stderr[-3000:]
    _assert_data_files_hold_only_data(data)
    lines = log.read_text().splitlines()
    assert lines[0] == "INFO:root:the caller, before" and lines[-1] == "INFO:root:the caller, after", lines
    assert sorted(lines[1:-1]) == ["WARNING:root:the line of rank 0", "WARNING:root:the line of rank 1"], lines


NESTED_TEST = f"""
{RANK_FUNCTION}

def test_ranks_under_pytest_keep_their_files(tmp_path):
    px.launch(write_data_and_log, str(tmp_path), platform=px.Platform(device="cpu", n_procs=2))
    paths = sorted(tmp_path.glob("data-*.txt"))
    assert len(paths) == 8
    for path in paths:
        assert path.read_text() == "data\\n" "more\\n", path.name
"""


@pytest.mark.parametrize("log_file", [False, True], ids=["pytest's null log file", "--log-file"])
def test_ranks_under_pytest_logging_capture_keep_their_files(tmp_path, log_file):
    # phalanx is imported while pytest collects the file: its log handlers are on the root
    # logger then, and their descriptors (os.devnull by default) are open.
    folder = tmp_path / "nested"
    folder.mkdir()
    (folder / "test_nested.py").write_text(textwrap.dedent(NESTED_TEST))
    log = tmp_path / "pytest.log"
    arguments = [str(folder), "-q", "-p", "no:cacheprovider"]
    if log_file:
        arguments += [f"--log-file={log}", "--log-file-level=WARNING"]
    script = f"import sys, pytest; sys.exit(pytest.main({arguments!r}))"
    result = run_script(script, timeout=90)
    assert result.returncode == 0 and "1 passed" in result.stdout, result.stdout[-3000:] + result.stderr[-2000:]
    if log_file:
        lines = log.read_text().splitlines()
        for rank in (0, 1):
            assert any(line.endswith(f"the line of rank {rank}") for line in lines), lines


def test_a_pipe_held_before_the_import_sees_end_of_file_once_the_caller_closes_it():
    script = """
import os
import select
import stat

read_end, write_end = os.pipe()

import phalanx as px
from phalanx.runners import zygote

assert zygote.get_zygote().started_by == "fork"


def write_to_the_pipe(fd):
    os.write(fd, b"from a rank")  # its copy is /dev/null: dropped
    return stat.S_ISCHR(os.fstat(fd).st_mode)


print(px.launch(write_to_the_pipe, write_end, platform=px.Platform(device="cpu", n_procs=2)))
os.close(write_end)
ready, _, _ = select.select([read_end], [], [], 10)
print("end of file" if ready and os.read(read_end, 100) == b"" else "the write end is held open elsewhere")
"""
    result = run_script(script, timeout=90)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == ["[True, True]", "end of file"]


def test_a_listening_socket_held_before_the_import_frees_its_port_once_the_caller_closes_it():
    script = """
import socket

listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen()
port = listener.getsockname()[1]

import phalanx as px
from phalanx.runners import zygote

assert zygote.get_zygote().started_by == "fork"
print(px.launch(lambda: "ran", platform=px.Platform(device="cpu", n_procs=2)))
listener.close()
again = socket.socket()
try:
    again.bind(("127.0.0.1", port))
    again.listen()
    print("port free")
except OSError as error:
    print(f"port still bound: {error}")
"""
    result = run_script(script, timeout=90)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == ["['ran', 'ran']", "port free"]
