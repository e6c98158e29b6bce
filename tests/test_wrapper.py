"""DDPW's front door: its own documented snippets run with only the import changed."""

from __future__ import annotations

import pytest

from phalanx import PhalanxError, Platform, Wrapper
from phalanx.wrapper import calling_convention
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


# -- DDPW 5.4 and 5.5: the ranks as keywords, beside 5.3's positional call ------------------------


def test_keyword_task_gets_start_arguments_as_given_and_the_ranks_as_keywords():
    # DDPW 5.5's README: def run(*args, **kwargs); wrapper.start(task, *args, **kwargs).
    result = run_script(
        """
        from phalanx import Platform, Wrapper

        # some task
        def run(*args, **kwargs):
            # global and local ranks, and the process group in:
            # kwargs['global_rank'], # kwargs['local_rank'], kwargs['group']
            group, platform = kwargs['group'], kwargs['platform']
            return args, kwargs['lr'], kwargs['global_rank'], kwargs['local_rank'], group.size(), platform.n_procs

        if __name__ == '__main__':
            # platform (e.g., 4 GPUs)
            platform = Platform(device='cpu', n_gpus=2)

            # wrapper
            wrapper = Wrapper(platform=platform)

            # start
            print(wrapper.start(run, 'example', 3, lr=0.1))
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[(('example', 3), 0.1, 0, 0, 2, 2), (('example', 3), 0.1, 1, 1, 2, 2)]"


def test_keyword_only_task_gets_only_the_rank_keywords_it_names():
    # A DDPW 5.4 task names the ranks and the group but not 5.5's `platform`; it is not given one.
    def task(data, *, global_rank, local_rank, group):
        return data, global_rank, local_rank, group.size()

    values = Wrapper(Platform(device="cpu", n_procs=2)).start(task, "x")
    assert values == [("x", 0, 0, 2), ("x", 1, 1, 2)]


def test_decorated_keyword_function_gets_its_arguments_and_the_ranks_as_keywords():
    # DDPW 5.4/5.5's README decorator: the function reads the ranks from kwargs.
    result = run_script(
        """
        from phalanx import Platform, wrapper

        platform = Platform(device='cpu', n_gpus=2, n_cpus=1)

        @wrapper(platform)
        def run(*args, **kwargs):
            # global and local ranks, and the process group in:
            # kwargs['global_rank'], # kwargs['local_rank'], kwargs['group']
            print("task", args, kwargs['scale'], kwargs['global_rank'], kwargs['local_rank'], kwargs['group'].size())
            return kwargs['global_rank'] * kwargs['scale']

        if __name__ == '__main__':
            print(run(1, 2, scale=10))
        """
    )
    assert result.returncode == 0, result.stderr
    assert "[rank 0] task (1, 2) 10 0 0 2" in result.stdout and "[rank 1] task (1, 2) 10 1 1 2" in result.stdout
    assert result.stdout.splitlines()[-1] == "[0, 10]"


def test_task_matching_neither_convention_is_refused_naming_both():
    with pytest.raises(PhalanxError, match=r"neither.*5\.3 calls task\(global_rank, local_rank, group, args\).*5\.4"):
        Wrapper(Platform(device="cpu", n_procs=2)).start(lambda data: data, 1)


def test_positional_task_given_several_arguments_is_refused_with_the_fix():
    def task(global_rank, local_rank, group, args):
        return args

    with pytest.raises(PhalanxError, match=r"5\.3.*one value, args.*start\(task, \(a, b\)\).*\*\*kwargs"):
        Wrapper(Platform(device="cpu", n_procs=2)).start(task, 1, 2)


def test_keyword_call_that_cannot_bind_is_refused_before_any_rank_starts():
    # DDPW 5.4 spread one tuple; phalanx, like 5.5, passes it as one argument and says so.
    def task(a, b, **kwargs):
        return a + b

    with pytest.raises(PhalanxError, match=r"cannot take these arguments.*start\(task, a, b\)"):
        Wrapper(Platform(device="cpu", n_procs=2)).start(task, (1, 2))


@pytest.mark.parametrize(
    ("task", "convention"),
    [
        (lambda global_rank, local_rank, process_group, args: 0, "positional"),
        (lambda *args: 0, "positional"),
        (lambda *args, **kwargs: 0, "keywords"),
        (lambda batch_size, *, global_rank: 0, "keywords"),
        (lambda batch_size, epochs, global_rank, local_rank, group: 0, "keywords"),
        (lambda global_rank, local_rank, group: 0, "keywords"),
        (lambda data: 0, None),
    ],
)
def test_calling_convention_follows_the_documented_rules(task, convention):
    assert calling_convention(task) == convention
