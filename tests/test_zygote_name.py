"""The zygote and its workers name themselves: no stray copy of the user's program in `ps` or `top`."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from phalanx.runners.zygote import _rank_name
from tests.conftest import run_script

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process names are read from /proc"),
]

HAS_SETPROCTITLE = importlib.util.find_spec("setproctitle") is not None

# In a fresh caller: one launch (when it returns, the zygote has named itself: that comes before
# it serves), then the names of the caller, the zygote and the workers, as JSON.
NAMES = """
    import json, os, sys
    {before}
    import phalanx as px
    from phalanx.runners import zygote

    def names(pid="self"):
        with open(f"/proc/{{pid}}/comm") as comm, open(f"/proc/{{pid}}/cmdline") as cmdline:
            return comm.read().strip(), cmdline.read().strip("\\0").replace("\\0", " ")

    workers = px.launch(names, platform=px.Platform(device="cpu", n_procs=2))
    helper = zygote.get_zygote()
    print(json.dumps({{"caller": [os.getpid(), *names()], "zygote": [helper.pid, helper.started_by, *names(helper.pid)],
                      "workers": workers}}))
"""


def _names(before: str = "", env: dict | None = None) -> dict:
    result = run_script(NAMES.format(before=before), env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def test_the_zygote_forked_at_import_and_its_workers_are_named_for_what_they_are():
    names = _names()
    caller_pid, caller_comm, caller_args = names["caller"]
    _, started_by, comm, args = names["zygote"]
    assert started_by == "fork"
    assert comm == "phalanx-zygote" != caller_comm
    assert [worker[0] for worker in names["workers"]] == ["phalanx-rank-0", "phalanx-rank-1"]
    if HAS_SETPROCTITLE:
        assert args.startswith(f"phalanx zygote (for pid {caller_pid}: {sys.executable} -c ") and args.endswith(")")
        for rank, (_, worker_args) in enumerate(names["workers"]):
            assert worker_args.startswith(f"phalanx rank {rank} (for pid {caller_pid}: {sys.executable} -c ")
    else:
        assert args == caller_args  # only the short name changes


def test_without_setproctitle_only_the_short_names_change():
    names = _names(before='sys.modules["setproctitle"] = None  # as if it were not installed')
    _, _, caller_args = names["caller"]
    _, _, comm, args = names["zygote"]
    assert (comm, args) == ("phalanx-zygote", caller_args)
    assert names["workers"] == [["phalanx-rank-0", caller_args], ["phalanx-rank-1", caller_args]]


def test_a_zygote_started_with_exec_is_named_too():
    names = _names(env={"PHALANX_FORK_ZYGOTE": "0"})
    caller_pid = names["caller"][0]
    _, started_by, comm, args = names["zygote"]
    assert (started_by, comm) == ("exec", "phalanx-zygote")
    if HAS_SETPROCTITLE:
        assert args.startswith(f"phalanx zygote (for pid {caller_pid}: {sys.executable} -c ")
    assert [worker[0] for worker in names["workers"]] == ["phalanx-rank-0", "phalanx-rank-1"]


@pytest.mark.parametrize(
    ("rank", "name"),
    [(0, "phalanx-rank-0"), (99, "phalanx-rank-99"), (100, "phalanx-r100"), (123456, "phalanx-r123456")],
)
def test_a_rank_name_fits_the_kernels_15_characters(rank, name):
    assert _rank_name(rank) == name
