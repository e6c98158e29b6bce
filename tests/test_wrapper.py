"""DDPW's front door: its own documented snippets run with only the import changed."""

from __future__ import annotations

import pytest

from tests.conftest import run_script

pytestmark = pytest.mark.timeout(60)


def test_ddpw_wrapper_snippet_runs_with_only_the_import_changed():
    # DDPW's usage snippet, device='cpu' on a machine without GPUs.
    result = run_script(
        """
        from phalanx import Platform, Wrapper

        # some task
        def task(global_rank, local_rank, process_group, args):
            print(f'This is GPU {global_rank}(G)/{local_rank}(L); args = {args}')

        # platform (e.g., 4 GPUs)
        platform = Platform(device='cpu', n_gpus=4)

        # wrapper
        wrapper = Wrapper(platform=platform)

        # start
        wrapper.start(task, ('example',))
        """
    )
    assert result.returncode == 0, result.stderr
    for rank in range(4):
        assert f"[rank {rank}] This is GPU {rank}(G)/{rank}(L); args = ('example',)" in result.stdout


def test_ddpw_decorator_snippet_runs_with_only_the_import_changed():
    result = run_script(
        """
        from phalanx import Platform, wrapper

        @wrapper(Platform(device='cpu', n_gpus=2, n_cpus=2))
        def run(a, b):
            # some task
            print("task", a, b)

        run(1, 2)
        """
    )
    assert result.returncode == 0, result.stderr
    assert "[rank 0] task 1 2" in result.stdout and "[rank 1] task 1 2" in result.stdout


def test_decorated_function_returns_every_rank_value_and_gets_a_process_group():
    result = run_script(
        """
        import phalanx as px

        def task(global_rank, local_rank, process_group, args):
            return global_rank, process_group.size(), args

        print(px.Wrapper(px.Platform(device='cpu', n_procs=2)).start(task, "x"))

        @px.wrapper(px.Platform(device='cpu', n_procs=2))
        def add(a, b):
            return a + b + px.get_rank()

        print(add(1, b=2))
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-2:] == ["[(0, 2, 'x'), (1, 2, 'x')]", "[3, 4]"]


def test_decorator_on_an_importable_module_function_does_not_relaunch(tmp_path):
    (tmp_path / "tasks.py").write_text(
        "import phalanx as px\n"
        "@px.wrapper(px.Platform(device='cpu', n_procs=2))\n"
        "def where():\n"
        "    return px.get_rank(), px.get_world_size()\n"
    )
    result = run_script(f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import tasks; print(tasks.where())")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[(0, 2), (1, 2)]"
