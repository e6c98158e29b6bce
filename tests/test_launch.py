"""launch() on the local runner: values come back by rank, in every calling style."""

from __future__ import annotations

import dataclasses
import os
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist

import phalanx as px
from tests.conftest import CPU, run_script

pytestmark = pytest.mark.timeout(60)


def rank_and_arg(x):
    return px.get_rank(), x


def test_values_come_back_indexed_by_global_rank():
    values = px.launch(rank_and_arg, "a", platform=px.Platform(device="cpu", n_procs=4))
    assert values == [(0, "a"), (1, "a"), (2, "a"), (3, "a")]


def test_keyword_arguments_reach_every_rank():
    def add(a, *, b):
        return a + b + px.get_rank()

    assert px.launch(add, 1, b=10, platform=CPU) == [11, 12]


def test_single_process_on_cpu_is_world_size_one():
    def facts():
        return px.get_world_size(), dist.is_initialized(), dist.get_backend()

    assert px.launch(facts, platform=px.Platform(device="cpu", n_procs=1)) == [(1, True, "gloo")]


def test_default_platform_runs_one_rank():
    assert px.launch(rank_and_arg, 5) == [(0, 5)]


def test_second_and_third_launch_in_one_process_work():
    for n in (2, 3, 2):
        assert [v for _, v in px.launch(rank_and_arg, n, platform=px.Platform(device="cpu", n_procs=n))] == [n] * n


def test_gather_false_returns_rank_zero_value():
    assert px.launch(rank_and_arg, "x", platform=CPU, gather=False) == (0, "x")


def test_lambda_closure_and_local_class_travel():
    offset = 100

    @dataclasses.dataclass
    class Box:
        value: int

    values = px.launch(lambda: Box(px.get_rank() + offset), platform=CPU)
    assert [box.value for box in values] == [100, 101]


def test_every_rank_gets_its_environment():
    def environment():
        names = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"]
        return {name: os.environ[name] for name in names}

    envs = px.launch(environment, platform=CPU)
    assert [e["RANK"] for e in envs] == ["0", "1"]
    assert [e["LOCAL_RANK"] for e in envs] == ["0", "1"]
    assert {e["WORLD_SIZE"] for e in envs} == {"2"}
    assert {e["LOCAL_WORLD_SIZE"] for e in envs} == {"2"}
    assert {e["NODE_RANK"] for e in envs} == {"0"}
    assert {e["MASTER_ADDR"] for e in envs} == {"127.0.0.1"}
    assert len({e["MASTER_PORT"] for e in envs}) == 1 and int(envs[0]["MASTER_PORT"]) > 0


def test_process_group_is_gloo_on_cpu_and_collectives_work():
    def collective():
        t = torch.tensor([float(px.get_rank() + 1)])
        dist.all_reduce(t)
        return dist.get_backend(), px.device(), t.item()

    assert px.launch(collective, platform=CPU) == [("gloo", torch.device("cpu"), 3.0)] * 2


def test_caller_environment_and_path_changes_after_import_reach_ranks(tmp_path, monkeypatch):
    (tmp_path / "late_module.py").write_text("VALUE = 'found'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PHALANX_TEST_SETTING", "42")
    monkeypatch.chdir(tmp_path)

    def look():
        import late_module

        return late_module.VALUE, os.environ["PHALANX_TEST_SETTING"], os.getcwd()

    assert px.launch(look, platform=CPU) == [("found", "42", str(tmp_path))] * 2


def test_caller_rank_zero_runs_in_the_caller_and_keeps_its_objects():
    seen = []

    def work():
        seen.append(px.get_rank())  # only the caller's own list is visible after the launch
        return os.getpid()

    pids = px.launch(work, platform=px.Platform(device="cpu", n_procs=3), caller_rank=0)
    assert pids[0] == os.getpid() and os.getpid() not in pids[1:]
    assert seen == [0]
    assert not dist.is_initialized()  # torn down, so that the caller can launch again
    assert "RANK" not in os.environ
    assert px.launch(rank_and_arg, 1, platform=CPU, caller_rank=1) == [(0, 1), (1, 1)]


def test_caller_rank_out_of_range_is_rejected():
    with pytest.raises(px.PlatformError, match="caller_rank"):
        px.launch(rank_and_arg, 1, platform=CPU, caller_rank=2)


def test_closure_from_a_script_on_stdin_returns_every_rank_value():
    script = """
import phalanx as px

def make(scale):
    def work():
        return px.get_rank() * scale
    return work

print(px.launch(make(7), platform=px.Platform(device="cpu", n_procs=3)))
"""
    result = run_script("", stdin=script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[0, 7, 14]"


def test_function_defined_in_main_of_a_script(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(
        "import phalanx as px\n"
        "class Result:\n"
        "    def __init__(self, r): self.r = r\n"
        "def job():\n"
        "    return Result(px.get_rank())\n"
        "if __name__ == '__main__':\n"
        "    print([r.r for r in px.launch(job, platform=px.Platform(device='cpu', n_procs=2))])\n"
    )
    import subprocess

    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[0, 1]"


def test_a_package_that_imports_phalanx_at_its_top_has_its_functions_in_every_rank(tmp_path):
    """The zygote was copied while the package was half imported: the ranks import it afresh."""
    package = tmp_path / "trainer"
    package.mkdir()
    (package / "__init__.py").write_text("from trainer import jobs\n")
    (package / "jobs.py").write_text(
        "import phalanx as px  # the zygote is copied here, before `work` exists\n"
        "def work():\n"
        "    return px.get_rank() * 10\n"
    )
    result = run_script(
        """
        import trainer  # imports phalanx first, from inside the package
        import phalanx as px
        print(px.launch(trainer.jobs.work, platform=px.Platform(device="cpu", n_procs=2)))
        """,
        env={"PYTHONPATH": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[0, 10]"


def test_launch_works_when_the_caller_has_threads():
    """A caller with threads (as a notebook kernel has) gets a zygote started by exec."""
    script = """
import threading, phalanx as px
from phalanx.runners import zygote
stop = threading.Event()
threading.Thread(target=stop.wait, daemon=True).start()
zygote.shutdown()
print(px.launch(px.get_rank, platform=px.Platform(device="cpu", n_procs=2)), zygote.get_zygote().started_by)
stop.set()
"""
    result = run_script(script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[0, 1] exec"


def test_the_zygote_is_stopped_before_the_interpreter_tears_itself_down():
    """A zygote taken by fork shares the caller's pages: it must be gone before the exit frees them."""
    script = """
import atexit, os, select, sys

def check():  # registered first, so it runs after phalanx's own exit handler
    pidfd = os.pidfd_open(zygote_pid)
    ready, _, _ = select.select([pidfd], [], [], 10)
    print("stopped" if ready else "still running", flush=True)

atexit.register(check)
import phalanx as px
from phalanx.runners import zygote
print(px.launch(px.get_rank, platform=px.Platform(device="cpu", n_procs=2)), zygote.get_zygote().started_by)
zygote_pid = zygote.get_zygote().pid
"""
    result = run_script(script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["[0,", "1]", "fork", "stopped"]


def _register_exit_handler(folder):
    import atexit

    rank = px.get_rank()

    def record():  # what a user's exit handler does: flush something to disk, maybe with the group
        (folder / f"rank{rank}").write_text(f"flushed, group alive: {dist.is_initialized()}")

    atexit.register(record)
    return rank


def test_exit_handlers_registered_in_a_rank_run_before_the_rank_ends_with_the_group_alive(tmp_path):
    assert px.launch(_register_exit_handler, tmp_path, platform=CPU) == [0, 1]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["rank0", "rank1"]
    assert (tmp_path / "rank1").read_text() == "flushed, group alive: True"


def test_launches_from_several_threads_at_once_all_succeed():
    import threading

    results, start = {}, threading.Barrier(4)

    def one(index):
        start.wait()  # all four threads ask the zygote for workers at the same moment
        results[index] = px.launch(rank_and_arg, index, platform=CPU)

    threads = [threading.Thread(target=one, args=(index,)) for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert results == {index: [(0, index), (1, index)] for index in range(4)}


def test_a_module_that_launches_when_imported_fails_fast_instead_of_hanging(tmp_path):
    (tmp_path / "launches_on_import.py").write_text(
        textwrap.dedent(
            """
            import phalanx as px

            def work():
                return px.get_rank()

            px.launch(work, platform=px.Platform(device="cpu", n_procs=2))  # no __main__ guard
            """
        )
    )
    result = run_script(f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import launches_on_import", timeout=60)
    assert result.returncode != 0
    assert "that module launches when it is imported" in result.stderr
    assert 'if __name__ == "__main__":' in result.stderr


def test_workers_done_before_the_caller_reads_their_pids_are_collected(monkeypatch):
    """The zygote's exit reports can arrive in the same read as the pids: none may be lost."""
    import select
    import socket
    import time

    from phalanx.runners import processes
    from phalanx.runners.channel import FrameReader

    watch = processes.ProcessSet.watch

    def watch_once_every_worker_is_gone(job):
        expected = 1 + len(job.workers)  # the pids, then one exit report per worker
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            select.select([job._job_socket], [], [], deadline - time.monotonic())
            waiting = job._job_socket.recv(1 << 16, socket.MSG_PEEK)
            if len(list(FrameReader().feed(waiting))) >= expected:
                break
            time.sleep(0.01)  # some reports are in, not all: look again shortly (bounded above)
        watch(job)

    monkeypatch.setattr(processes.ProcessSet, "watch", watch_once_every_worker_is_gone)
    assert px.launch(rank_and_arg, "x", platform=CPU) == [(0, "x"), (1, "x")]


@pytest.mark.timeout(120)
def test_many_ranks_whose_function_returns_at_once_all_meet_first(capsys):
    """No rank may end while another still completes its connection to it (gloo's full mesh)."""
    for _ in range(5):
        assert px.launch(px.get_rank, platform=px.Platform(device="cpu", n_procs=24)) == list(range(24))
    assert "lost each other while connecting" not in capsys.readouterr().err
