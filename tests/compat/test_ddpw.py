"""phalanx.compat.ddpw: DDPW's documented snippets with only the import changed, its Platform and utilities."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist

import phalanx as px
from phalanx.compat import ddpw
from phalanx.compat.ddpw import Device, Platform, Wrapper, wrapper
from tests.conftest import run_script

pytestmark = pytest.mark.timeout(60)

NO_GPU = not torch.cuda.is_available()


# -- the snippets of DDPW's introduction ---------------------------------------------------------


def test_usage_snippet_runs_with_only_the_import_changed():
    # DDPW's "Usage" block; device='cpu' (no GPU here) and 2 ranks instead of 4 GPUs.
    result = run_script(
        """
        from phalanx.compat.ddpw import Platform, Wrapper

        # some task
        def task(global_rank, local_rank, process_group, args):
            print(f'This is GPU {global_rank}(G)/{local_rank}(L); args = {args}')

        # platform (e.g., 4 GPUs)
        platform = Platform(device='cpu', n_gpus=2)

        # wrapper
        wrapper = Wrapper(platform=platform)

        # start
        wrapper.start(task, ('example',))
        """
    )
    assert result.returncode == 0, result.stderr
    for rank in range(2):
        assert f"[rank {rank}] This is GPU {rank}(G)/{rank}(L); args = ('example',)" in result.stdout


def test_decorator_snippet_runs_with_only_the_import_changed():
    # DDPW's "As a decorator" block, device='cpu'; the task prints so that we see it ran.
    result = run_script(
        """
        from phalanx.compat.ddpw import Platform, wrapper

        @wrapper(Platform(device='cpu', n_gpus=2, n_cpus=2))
        def run(a, b):
            # some task
            print("task", a, b)

        run(1, 2)
        """
    )
    assert result.returncode == 0, result.stderr
    assert "[rank 0] task 1 2" in result.stdout and "[rank 1] task 1 2" in result.stdout


# -- Platform: DDPW's names and defaults, mapped onto px.Platform --------------------------------


def test_platform_has_ddpw_field_names_and_defaults():
    defaults = {
        f.name: f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        for f in dataclasses.fields(Platform)
    }
    assert defaults == {
        "name": "ddpw",
        "device": Device.GPU,
        "partition": "general",
        "n_nodes": 1,
        "n_gpus": 1,
        "n_cpus": 1,
        "ram": 32,
        "spawn_method": "fork",
        "ipc_protocol": "tcp",
        "master_addr": "localhost",
        "master_port": None,  # DDPW: a random port drawn at import; here a free one taken at launch
        "ipc_groups": [],
        "backend": "gloo",
        "seed": 1889,
        "timeout_min": 2880,
        "slurm_additional_parameters": None,
        "console_logs": "./logs",
        "verbose": True,
        "upon_finish": None,
    }
    assert [d.value for d in Device] == ["cpu", "gpu", "slurm", "mps"]
    assert Device.from_str("CPU") is Device.CPU and Platform(device="cpu").device is Device.CPU


def test_cpu_platform_maps_onto_phalanx_platform():
    platform = Platform(device="cpu", n_gpus=2, master_port="29555", seed=3, n_cpus=4)
    mapped = platform.to_phalanx()
    assert (mapped.device, mapped.n_procs, mapped.backend, mapped.cluster) == ("cpu", 2, "gloo", "local")
    assert (mapped.master_addr, mapped.master_port, mapped.seed) == ("localhost", 29555, 3)
    assert mapped.n_cpus is None  # DDPW reads n_cpus on SLURM only
    assert (platform.world_size, platform.requires_ipc) == (2, True)


def test_slurm_platform_maps_its_slurm_fields():
    platform = Platform(
        device="slurm", n_nodes=2, n_gpus=3, n_cpus=6, ram=64, partition="example", timeout_min=90, console_logs="l"
    )
    mapped = platform.to_phalanx()
    assert (mapped.cluster, mapped.device, mapped.n_nodes, mapped.n_procs) == ("slurm", "cuda", 2, 3)
    assert (mapped.partition, mapped.time, mapped.ram, mapped.n_cpus, mapped.log_dir) == ("example", 90, 64, 6, "l")
    assert platform.world_size == 6


def test_gpu_device_maps_to_cuda_ranks_or_is_refused_clearly_without_a_gpu():
    if NO_GPU:
        with pytest.raises(px.PlatformError, match=r"ddpw Platform\(device='gpu'\).*no GPU is visible.*device='cpu'"):
            Platform(device="gpu", n_gpus=2)
        return
    mapped = Platform(device="gpu", n_gpus=1).to_phalanx()
    assert (mapped.device, mapped.n_procs) == ("cuda", 1)
    with pytest.raises(px.PlatformError, match="n_gpus"):  # DDPW would quietly run fewer ranks
        Platform(device="gpu", n_gpus=torch.cuda.device_count() + 1)


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"device": "tpu"}, "device"),
        ({"device": "cpu", "ipc_protocol": "file"}, "ipc_protocol"),
        ({"device": "cpu", "n_gpus": 2, "ipc_groups": [[0, 1], [1]]}, "ipc_groups"),
        ({"device": "cpu", "master_port": "http"}, "master_port"),
        ({"device": "cpu", "spawn_method": "clone"}, "spawn_method"),
        ({"device": "cpu", "n_gpus": 0}, "n_gpus"),
    ],
)
def test_bad_values_raise_platform_error_naming_the_field(fields, named):
    with pytest.raises(px.PlatformError, match=rf"\({named}="):
        Platform(**fields)


# -- Wrapper and wrapper -------------------------------------------------------------------------


def _describe(global_rank, local_rank, process_group, args):
    size = None if process_group is None else dist.get_world_size(process_group)
    return global_rank, local_rank, size, args


def test_wrapper_start_gives_ranks_group_and_args_and_returns_every_value():
    values = Wrapper(platform=Platform(device="cpu", n_gpus=2)).start(_describe, ("example",))
    assert values == [(0, 0, 2, ("example",)), (1, 1, 2, ("example",))]


def test_ipc_groups_give_each_rank_its_own_group_or_none():
    def group_sum(global_rank, local_rank, process_group, args):
        if process_group is None:
            return None
        value = torch.tensor([global_rank + 1])
        dist.all_reduce(value, group=process_group)
        return dist.get_world_size(process_group), int(value)

    assert Wrapper(Platform(device="cpu", n_gpus=2, ipc_groups=[[1], [0]])).start(group_sum) == [(1, 1), (1, 2)]
    assert Wrapper(Platform(device="cpu", n_gpus=2, ipc_groups=[[0, 1]])).start(group_sum) == [(2, 3), (2, 3)]
    assert Wrapper(Platform(device="cpu", n_gpus=2, ipc_groups=None)).start(group_sum) == [None, None]


def test_seed_is_the_same_on_every_rank_as_in_ddpw():
    def draw(global_rank, local_rank, process_group, args):
        return torch.rand(1).item()

    first, second = Wrapper(Platform(device="cpu", n_gpus=2, seed=7)).start(draw)
    assert first == second == torch.rand(1, generator=torch.Generator().manual_seed(7)).item()


def test_upon_finish_runs_once_in_the_caller_after_every_rank():
    calls = []
    platform = Platform(device="cpu", n_gpus=2, upon_finish=lambda: calls.append("done"))
    Wrapper(platform).start(_describe)
    assert calls == ["done"]


def test_a_failing_rank_raises_worker_error_where_ddpw_returned_normally():
    def fail_on_one(global_rank, local_rank, process_group, args):
        if global_rank == 1:
            raise ValueError("bad shard")

    with pytest.raises(px.WorkerError, match="bad shard") as caught:
        Wrapper(Platform(device="cpu", n_gpus=2)).start(fail_on_one)
    assert caught.value.rank == 1


_FINISHED: list[str] = []


@wrapper(Platform(device="cpu", n_gpus=2, upon_finish=lambda: _FINISHED.append("finished")))
def add_on_every_rank(a, b):
    return a + b + px.get_rank()


def test_decorated_module_function_runs_once_per_rank_then_upon_finish():
    # Found by its module name in the ranks: it must run there, not launch again.
    assert add_on_every_rank(1, b=2) == [3, 4]
    assert _FINISHED == ["finished"]


# -- the utilities (ddpw.functional) --------------------------------------------------------------


def _train_step(global_rank, local_rank, process_group, platform):
    DF = ddpw.functional
    DF.seed_generators(0)
    model = DF.to(torch.nn.Linear(2, 1), local_rank, device=platform.device)
    dataset = torch.arange(8.0).unsqueeze(1).repeat(1, 2)
    sampler = DF.get_dataset_sampler(dataset, global_rank, platform)
    batch = dataset[list(sampler)]
    model(batch).sum().backward()
    plain = px.unwrap_model(model)
    return type(model).__name__, sorted(int(i) for i in sampler), plain.weight.grad.clone(), DF.device(model).type


def test_to_wraps_in_ddp_and_the_sampler_shards_the_dataset_on_cpu_ranks():
    platform = Platform(device="cpu", n_gpus=2)
    (kind0, shard0, grad0, dev0), (kind1, shard1, grad1, dev1) = Wrapper(platform).start(_train_step, platform)
    assert kind0 == kind1 == "DistributedDataParallel" and dev0 == dev1 == "cpu"
    assert sorted(shard0 + shard1) == list(range(8)) and not set(shard0) & set(shard1)
    assert torch.equal(grad0, grad1)  # DDP averaged them


def _average(global_rank, local_rank, process_group, args):
    module = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        module.weight.fill_(float(global_rank))
    module.weight.grad = torch.full_like(module.weight, 10.0 * global_rank)
    ddpw.average_params_grads(module)  # DDPW's defaults: the gradients only
    after_grads = (module.weight.item(), module.weight.grad.item())
    ddpw.average_params_grads(module, params=True, grads=False)
    return after_grads, module.weight.item()


def test_average_params_grads_averages_what_is_asked_over_the_ranks():
    assert Wrapper(Platform(device="cpu", n_gpus=2)).start(_average) == [((0.0, 5.0), 0.5), ((1.0, 5.0), 0.5)]


def test_single_rank_helpers_work_without_a_launch():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    assert ddpw.has_batch_norm(model) and not ddpw.has_batch_norm(torch.nn.Linear(1, 1))
    assert ddpw.to(model, 0, device=Device.CPU) is model  # one process: moved, not wrapped
    assert ddpw.get_dataset_sampler(list(range(4)), 0, Platform(device="cpu")) is None
    optimiser = torch.optim.Adam(model.parameters())
    model(torch.ones(3, 2)).sum().backward()
    optimiser.step()
    ddpw.optimiser_to(optimiser, "cpu")
    assert all(state["exp_avg"].device.type == "cpu" for state in optimiser.state.values())
    assert ddpw.device(torch.nn.ReLU()) == px.device()


def test_to_the_gpu_moves_there_or_is_refused_clearly_without_a_gpu():
    if NO_GPU:
        with pytest.raises(px.PlatformError, match=r"no CUDA GPU is visible.*device=Device\.CPU"):
            ddpw.to(torch.nn.Linear(1, 1), 0)
        return
    assert ddpw.device(ddpw.to(torch.nn.Linear(1, 1), 0)) == torch.device("cuda", 0)


# -- DDPW 5.4 and 5.5: the ranks as keywords, and set_device --------------------------------------


def test_readme_5_5_callable_runs_with_only_the_import_changed():
    # DDPW 5.5's README "As a callable": def run(*args, **kwargs); start(task, *args, **kwargs).
    result = run_script(
        """
        from phalanx.compat.ddpw import Platform, Wrapper

        # some task
        def run(*args, **kwargs):
            # global and local ranks, and the process group in:
            # kwargs['global_rank'], # kwargs['local_rank'], kwargs['group']
            platform = kwargs['platform']
            print(f"GPU {kwargs['global_rank']}(G)/{kwargs['local_rank']}(L); args = {args}; "
                  f"note = {kwargs['note']}; {platform.device} of {platform.world_size}, ipc {platform.requires_ipc}")

        if __name__ == '__main__':
            # platform (e.g., 4 GPUs)
            platform = Platform(device='cpu', n_gpus=2)

            # wrapper
            wrapper = Wrapper(platform=platform)

            # start
            wrapper.start(run, 'example', 7, note='hello')
        """
    )
    assert result.returncode == 0, result.stderr
    for rank in range(2):
        expected = (
            f"[rank {rank}] GPU {rank}(G)/{rank}(L); args = ('example', 7); note = hello; Device.CPU of 2, ipc True"
        )
        assert expected in result.stdout


def test_readme_5_4_decorator_runs_with_only_the_import_changed():
    # DDPW 5.4/5.5's README "With the decorator": the ranks and the group arrive in kwargs.
    result = run_script(
        """
        from phalanx.compat.ddpw import Platform, wrapper

        platform = Platform(device="cpu", n_cpus=2, ram=8, n_gpus=2, verbose=True)

        @wrapper(platform)
        def run(*args, **kwargs):
            # global and local ranks, and the process group in:
            # kwargs['global_rank'], # kwargs['local_rank'], kwargs['group']
            print("task", args, kwargs['global_rank'], kwargs['local_rank'], kwargs['group'].size())

        if __name__ == '__main__':
            run('example')
        """
    )
    assert result.returncode == 0, result.stderr
    assert "[rank 0] task ('example',) 0 0 2" in result.stdout
    assert "[rank 1] task ('example',) 1 1 2" in result.stdout


class _TinyModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, (3, 3))
        self.fc = torch.nn.Linear(2 * 4 * 4, 3)

    def forward(self, x):
        return torch.nn.functional.log_softmax(self.fc(torch.relu(self.conv(x)).flatten(1)), 1)


def _mnist_style_train(*args, **kwargs):
    # DDPW 5.5's MNIST train(): positional data, ranks and platform from kwargs, DF.set_device.
    DF = ddpw.functional
    batch_size, epochs, dataset = args
    global_rank, local_rank, platform = kwargs["global_rank"], kwargs["local_rank"], kwargs["platform"]

    # set the current device
    DF.set_device(local_rank, platform)

    # move the (distributed) model to the correct device
    model = DF.to(_TinyModel(), local_rank, device=platform.device)

    # sample the dataset
    sampler = DF.get_dataset_sampler(dataset, global_rank, platform)
    data = torch.utils.data.DataLoader(dataset, batch_size, sampler=sampler)
    optim = torch.optim.SGD(model.parameters(), lr=1e-2)

    training_loss = torch.zeros(1).to(DF.device(model))
    for _ in range(epochs):
        for imgs, labels in data:
            optim.zero_grad()
            loss = torch.nn.functional.nll_loss(model(imgs), labels)
            loss.backward()
            optim.step()
            training_loss += loss.detach()
        training_loss /= len(data)

        if platform.requires_ipc:
            dist.all_reduce(training_loss, dist.ReduceOp.SUM)
            training_loss /= platform.world_size

    weights = px.unwrap_model(model).fc.weight.detach().clone()
    return len(list(sampler)), training_loss.item(), weights


def test_mnist_style_training_with_set_device_runs_on_two_cpu_ranks():
    # DDPW 5.5's MNIST main(): Wrapper(platform).start(train, batch_size, epochs, dataset).
    generator = torch.Generator().manual_seed(0)
    images, labels = torch.randn(8, 1, 6, 6, generator=generator), torch.randint(0, 3, (8,), generator=generator)
    dataset = torch.utils.data.TensorDataset(images, labels)

    platform = Platform(device="cpu", n_gpus=2)
    (shard0, loss0, weights0), (shard1, loss1, weights1) = Wrapper(platform).start(_mnist_style_train, 2, 2, dataset)
    assert shard0 == shard1 == 4  # each rank trained on its half
    assert loss0 == loss1 > 0  # averaged over the ranks
    assert torch.equal(weights0, weights1)  # DDP kept the replicas equal


def test_set_device_leaves_cuda_alone_on_cpu_ranks():
    def touches_cuda(*args, **kwargs):
        ddpw.set_device(kwargs["local_rank"], kwargs["platform"])
        return torch.cuda.is_initialized()

    assert Wrapper(Platform(device="cpu", n_gpus=2)).start(touches_cuda) == [False, False]


@pytest.mark.parametrize("kind", [Device.GPU, Device.SLURM])
def test_set_device_makes_the_rank_gpu_current_on_gpu_and_slurm_platforms(monkeypatch, kind):
    chosen = []
    monkeypatch.setattr(ddpw, "is_available", lambda device_type: True)
    monkeypatch.setattr(ddpw, "rank_device", lambda device_type, local_rank: torch.device(device_type, local_rank))
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    platform = Platform(device="cpu")
    platform.device = kind  # a GPU platform, on a machine that may have none
    ddpw.set_device(1, platform)
    assert chosen == [torch.device("cuda", 1)]


@pytest.mark.skipif(not NO_GPU, reason="needs a machine without a GPU")
def test_set_device_on_a_gpu_platform_without_a_gpu_is_refused_clearly():
    platform = Platform(device="cpu")
    platform.device = Device.GPU
    with pytest.raises(px.PlatformError, match=r"no CUDA GPU is visible"):
        ddpw.set_device(0, platform)


def _group_size(*args, **kwargs):
    group = kwargs["group"]
    return None if group is None else dist.get_world_size(group)


def test_keyword_tasks_get_the_group_of_ipc_groups_too():
    assert Wrapper(Platform(device="cpu", n_gpus=2, ipc_groups=[[1], [0]])).start(_group_size) == [1, 1]
    assert Wrapper(Platform(device="cpu", n_gpus=2, ipc_groups=None)).start(_group_size) == [None, None]


def test_task_matching_neither_convention_is_refused_before_any_rank_starts():
    started = []
    platform = Platform(device="cpu", n_gpus=2, upon_finish=lambda: started.append("finished"))
    with pytest.raises(px.PhalanxError, match=r"neither.*DDPW 5\.3 calls.*DDPW 5\.4 and 5\.5 call"):
        Wrapper(platform).start(lambda data: data, 1)
    assert started == []
