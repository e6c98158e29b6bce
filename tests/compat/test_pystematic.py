"""phalanx.compat.pystematic: pystematic-torch's documented API, its Context snippet, real launches."""

from __future__ import annotations

import collections
import copy
import os
import pathlib
import threading

import cloudpickle
import pytest
import torch

import phalanx as px
from phalanx.compat import pystematic

pytestmark = pytest.mark.timeout(60)

CPU2 = px.Platform(device="cpu", n_procs=2)


class Dataset(torch.utils.data.Dataset):
    """The snippet's `Dataset()`: two features, a binary label."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tensor([float(index % 2), float(index % 3)]), torch.tensor([float(index % 2)])


def test_documented_names_are_under_pystematic_torch():
    documented = """move_to_device save_checkpoint load_checkpoint run_parameter_sweep is_distributed is_master
        get_num_processes get_rank broadcast_from_master distributed_barrier Context TorchContext Recorder
        SmartDataLoader""".split()
    assert all(callable(getattr(pystematic.torch, name)) for name in documented)
    for method in ("cuda", "cpu", "ddp", "state_dict", "load_state_dict", "autotransform"):
        assert callable(getattr(pystematic.torch.Context, method))
    for member in ("count", "step", "params", "scalar", "figure", "image", "state_dict", "load_state_dict"):
        assert hasattr(pystematic.torch.Recorder, member)
    assert callable(pystematic.torch.SmartDataLoader.to)


def test_context_snippet_runs_with_only_the_import_changed():
    # pystematic-torch's Context example, verbatim but for the import and ctx.cpu() for ctx.cuda().
    ctx = pystematic.torch.TorchContext()

    ctx.model = torch.nn.Sequential(torch.nn.Linear(2, 1), torch.nn.Sigmoid())

    # We use the smart dataloader so that batches are moved to the correct
    # device
    ctx.dataloader = pystematic.torch.SmartDataLoader(dataset=Dataset(), batch_size=2)
    ctx.loss_function = torch.nn.BCELoss()

    ctx.cpu()  # Move everything to cuda (cpu here)

    # Remember to initialize the optimizer after moving
    ctx.optimzer = torch.optim.SGD(ctx.model.parameters(), lr=0.01)

    for input, lbl in ctx.dataloader:
        output = ctx.model(input)

        loss = ctx.loss_function(output, lbl)

        ctx.optimzer.zero_grad()
        loss.backward()
        ctx.optimzer.step()

    assert ctx.dataloader.state_dict() == {"epoch": 1, "batches": 0} and len(ctx.dataloader) == 4


def _session(checkpoint: pathlib.Path | None = None) -> pystematic.Context:
    ctx = pystematic.torch.TorchContext()
    ctx.model = torch.nn.Sequential(torch.nn.Linear(2, 1), torch.nn.Sigmoid())
    ctx.dataloader = pystematic.torch.SmartDataLoader(dataset=Dataset(), batch_size=2, shuffle=True, loading_bar=False)
    ctx.loss_function = torch.nn.BCELoss()
    ctx.epoch = 0
    pystematic.params["checkpoint"] = checkpoint
    ctx.autotransform()  # checkpoint, then the rank's device (params["cuda"]), then DDP (two ranks)
    ctx.optimizer = torch.optim.SGD(ctx.model.parameters(), lr=0.1)
    return ctx


def _train_then_checkpoint(folder: pathlib.Path) -> dict[str, torch.Tensor]:
    pystematic.output_dir = folder
    ctx = _session()
    for input, lbl in ctx.dataloader:
        ctx.optimizer.zero_grad()
        ctx.loss_function(ctx.model(input), lbl).backward()
        ctx.optimizer.step()
    ctx.epoch += 1
    pystematic.torch.save_checkpoint(ctx.state_dict(), id=ctx.epoch)
    pystematic.torch.distributed_barrier()
    return {"wrapped": type(ctx.model).__name__, **px.unwrap_model(ctx.model).state_dict()}


def _resume(checkpoint: pathlib.Path) -> dict[str, torch.Tensor]:
    ctx = _session(checkpoint)
    return {"epoch": ctx.epoch, "loader": ctx.dataloader.state_dict(), **px.unwrap_model(ctx.model).state_dict()}


def test_context_saved_by_one_launch_is_restored_by_the_next(tmp_path):
    trained = px.launch(_train_then_checkpoint, tmp_path, platform=CPU2)
    assert trained[0]["wrapped"] == "DistributedDataParallel"
    checkpoint = tmp_path / "checkpoint-1.pt"
    assert checkpoint.exists() and not list(tmp_path.glob(".*tmp*"))
    resumed = px.launch(_resume, checkpoint, platform=CPU2)
    for rank in range(2):
        assert resumed[rank]["epoch"] == 1 and resumed[rank]["loader"] == {"epoch": 1, "batches": 0}
        for name in ("0.weight", "0.bias"):
            assert torch.equal(resumed[rank][name], trained[0][name])


def _distributed_facts(value: int) -> tuple:
    return (
        pystematic.torch.is_distributed(),
        pystematic.torch.is_master(),
        pystematic.torch.get_num_processes(),
        pystematic.torch.get_rank(),
        pystematic.torch.broadcast_from_master(value + pystematic.torch.get_rank()),
        pystematic.torch.distributed_barrier(),
    )


def test_distributed_helpers_answer_for_each_rank():
    first, second = px.launch(_distributed_facts, 5, platform=CPU2)
    assert first == (True, True, 2, 0, torch.tensor(5), None)
    assert second == (True, False, 2, 1, torch.tensor(5), None)
    assert _distributed_facts(5) == (False, True, 1, 0, torch.tensor(5), None)  # no launch: one process


def _shard(_: int) -> list[float]:
    loader = pystematic.SmartDataLoader(Dataset(), batch_size=2, loading_bar=False).to("cpu")
    return [float(x[0, 0] * 10 + x[0, 1]) for x, _ in loader] + [len(loader)]


def test_smart_dataloader_gives_each_rank_its_own_shard():
    first, second = px.launch(_shard, 0, platform=CPU2)
    assert first[-1] == second[-1] == 2
    assert not set(first[:-1]) & set(second[:-1])


def test_move_to_device_moves_nested_tensors_and_modules():
    batch = {"x": [torch.ones(1)], "y": (torch.zeros(1), "label")}
    assert pystematic.move_to_device("cpu", batch)["y"][1] == "label"
    moved = pystematic.move_to_device("cpu", torch.ones(1), torch.nn.Linear(1, 1))
    assert isinstance(moved, list) and isinstance(moved[1], torch.nn.Linear)


def _record(folder: pathlib.Path) -> tuple:
    recorder = pystematic.torch.Recorder(folder, console=True)
    recorder.count = 10
    recorder.scalar("loss", torch.tensor(0.5))
    recorder.step()
    recorder.params({"lr": 0.1})
    recorder.close()
    return recorder.state_dict(), sorted(path.name for path in folder.iterdir()) if folder.exists() else []


def test_recorder_counts_on_every_rank_and_only_the_master_writes(tmp_path):
    (state0, files), (state1, _) = px.launch(_record, tmp_path, platform=CPU2)
    assert state0 == state1 == {"count": 11}
    assert "scalars.csv" in files and any(name.startswith("events.out.tfevents") for name in files)
    assert (tmp_path / "scalars.csv").read_text() == "step, tag, value\n10, loss, 0.5\n"


def square(params: dict) -> int:
    if params["x"] < 0:
        raise ValueError(f"negative x={params['x']}")
    return params["x"] ** 2


def test_run_parameter_sweep_runs_every_params_dict():
    results = pystematic.torch.run_parameter_sweep(square, [{"x": 2}, {"x": 3}], max_num_processes=2)
    assert [(result.params["params"], result.value) for result in results] == [({"x": 2}, 4), ({"x": 3}, 9)]


def test_run_parameter_sweep_failure_raises_after_every_run():
    with pytest.raises(px.PhalanxError, match=r"1 of 2 runs failed.*'x': -1.*negative x=-1"):
        pystematic.run_parameter_sweep(square, [{"x": -1}, {"x": 1}], max_num_processes=2)


def test_load_checkpoint_runs_no_code_from_the_file(tmp_path):
    pystematic.save_checkpoint({"weights": torch.ones(2)}, id="ok", directory=tmp_path)
    assert torch.equal(pystematic.load_checkpoint(tmp_path / "checkpoint-ok.pt")["weights"], torch.ones(2))
    torch.save({"obj": Dataset()}, tmp_path / "code.pt")
    with pytest.raises(px.CheckpointError, match="refused"):
        pystematic.load_checkpoint(tmp_path / "code.pt")
    with pytest.raises(px.CheckpointError, match="does not exist"):
        pystematic.load_checkpoint(tmp_path / "missing.pt")


def test_cuda_moves_to_the_gpu_or_is_refused_clearly_without_one():
    ctx = pystematic.Context(model=torch.nn.Linear(1, 1))
    if not torch.cuda.is_available():
        with pytest.raises(px.PhalanxError, match=r"no CUDA GPU is visible here\. Use ctx\.cpu\(\)"):
            ctx.cuda()
        return
    assert next(ctx.cuda().model.parameters()).is_cuda


def test_save_checkpoint_never_writes_through_a_link_planted_where_its_temporary_goes(tmp_path):
    """Someone who can write the folder links the old, predictable temporary name to a file of yours."""
    import os

    yours = tmp_path / "yours.txt"
    yours.write_text("keep me")
    (tmp_path / f".checkpoint-1.pt.tmp-{os.getpid()}").symlink_to(yours)
    path = pystematic.save_checkpoint({"weights": torch.ones(2)}, id=1, directory=tmp_path)
    assert yours.read_text() == "keep me"
    assert torch.equal(pystematic.load_checkpoint(path)["weights"], torch.ones(2))


def test_load_checkpoint_reads_a_context_checkpoint_and_a_plain_torch_save_file(tmp_path):
    ctx = px.Context(model=torch.nn.Linear(2, 1), epoch=3)
    ctx.save(tmp_path / "context.pt", wait=True)
    assert pystematic.load_checkpoint(tmp_path / "context.pt")["epoch"] == 3
    torch.save({"step": 7}, tmp_path / "plain.pt")  # as pystematic-torch itself wrote checkpoints
    assert pystematic.load_checkpoint(str(tmp_path / "plain.pt")) == {"step": 7}


def test_load_checkpoint_refuses_a_cut_file_or_a_directory_clearly(tmp_path):
    path = pystematic.save_checkpoint({"weights": torch.ones(1000)}, id="cut", directory=tmp_path)
    path.write_bytes(path.read_bytes()[:200])  # a save that died halfway, written by something else
    with pytest.raises(px.CheckpointError, match="truncated or corrupt"):
        pystematic.load_checkpoint(path)
    with pytest.raises(px.CheckpointError, match="is a directory"):
        pystematic.load_checkpoint(tmp_path)


# -- checkpoints that pystematic-torch wrote ---------------------------------------------------


def _pystematic_session() -> pystematic.Context:
    """pystematic-torch's own test session (its ddp_exp), on the CPU."""
    ctx = pystematic.torch.Context()
    ctx.epoch = 0
    ctx.recorder = pystematic.torch.Recorder(tensorboard=False, file=False)
    ctx.model = torch.nn.Sequential(torch.nn.Linear(2, 1), torch.nn.Sigmoid())
    ctx.optimzer = torch.optim.SGD(ctx.model.parameters(), lr=0.01)
    ctx.dataloader = pystematic.torch.SmartDataLoader(dataset=Dataset(), batch_size=2, loading_bar=False)
    ctx.loss_function = torch.nn.BCELoss()
    return ctx


def _pystematic_checkpoint(path: pathlib.Path, **changes) -> pathlib.Path:
    """A file as pystematic-torch's Context.state_dict and save_checkpoint write it: every item by name,
    None for what has no state (its SmartDataLoader is a plain DataLoader), nothing of phalanx's."""
    state = {
        "epoch": 1,
        "recorder": {"count": 2},
        "model": collections.OrderedDict(
            [("0.weight", torch.tensor([[-0.25, 0.5]])), ("0.bias", torch.tensor([-0.75]))]
        ),
        "optimzer": {
            "state": {0: {"momentum_buffer": None}, 1: {"momentum_buffer": None}},
            "param_groups": [
                {"lr": 0.01, "momentum": 0, "dampening": 0, "weight_decay": 0, "nesterov": False, "params": [0, 1]}
            ],
        },
        "dataloader": None,
        "loss_function": collections.OrderedDict(),
    }
    state.update(changes)
    state = {name: value for name, value in state.items() if value is not _ABSENT}
    torch.save(state, path)
    return path


_ABSENT = object()


def _everything(ctx: pystematic.Context) -> dict:
    return copy.deepcopy(
        {
            "model": ctx.model.state_dict(),
            "optimizer": ctx.optimzer.state_dict(),
            "counters": (ctx.epoch, ctx.recorder.count),
            "loader": ctx.dataloader.state_dict(),
            "names": sorted(vars(ctx)),
        }
    )


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[key], b[key]) for key in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_same, a, b))
    return a == b


def test_a_pystematic_torch_checkpoint_loads_and_its_none_entry_keeps_the_loader(tmp_path):
    ctx = _pystematic_session()
    loader, loss_function = ctx.dataloader, ctx.loss_function
    ctx.load_state_dict(pystematic.torch.load_checkpoint(_pystematic_checkpoint(tmp_path / "checkpoint-1.pt")))
    assert (ctx.epoch, ctx.recorder.count) == (1, 2)
    assert torch.equal(ctx.model[0].weight, torch.tensor([[-0.25, 0.5]])) and ctx.model[0].bias.item() == -0.75
    assert ctx.optimzer.param_groups[0]["lr"] == 0.01
    assert ctx.dataloader is loader and ctx.dataloader.state_dict() == {"epoch": 0, "batches": 0}
    assert ctx.loss_function is loss_function


def test_autotransform_loads_a_pystematic_torch_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setitem(pystematic.params, "checkpoint", str(_pystematic_checkpoint(tmp_path / "checkpoint-1.pt")))
    ctx = _pystematic_session().autotransform()
    assert ctx.epoch == 1 and ctx.model[0].bias.item() == -0.75


def test_entries_a_pystematic_torch_checkpoint_lacks_or_does_not_know_are_left_alone(tmp_path):
    ctx = _pystematic_session()
    ctx.recorder.count = 5
    path = _pystematic_checkpoint(tmp_path / "checkpoint-1.pt", recorder=_ABSENT, optimzer=_ABSENT, extra=3)
    optimizer = copy.deepcopy(ctx.optimzer.state_dict())
    ctx.load_state_dict(pystematic.load_checkpoint(path))
    assert ctx.recorder.count == 5 and ctx.epoch == 1 and not hasattr(ctx, "extra")
    assert _same(ctx.optimzer.state_dict(), optimizer)


@pytest.mark.parametrize(
    "changes, reason",
    [
        ({"model": {"0.weight": torch.zeros(1, 3), "0.bias": torch.zeros(1)}}, "model.0.weight has shape (1, 3)"),
        ({"model": {"0.weight": torch.zeros(1, 2)}}, "'model' misses ['0.bias']"),
        ({"optimzer": {"state": {}}}, "'optimzer' misses ['param_groups']"),
        ({"optimzer": 0.01}, "'optimzer' is an optimizer here, but the checkpoint holds a value of type float"),
        ({"recorder": {"count": "two"}}, "loading 'recorder' failed"),
        ({"epoch": "one"}, "'epoch' is of type int here, but the checkpoint holds a value of type str"),
    ],
    ids=["wrong shape", "missing key", "optimizer misses a key", "optimizer of a wrong type", "bad count", "bad epoch"],
)
def test_a_refused_pystematic_torch_checkpoint_changes_nothing(tmp_path, changes, reason):
    ctx = _pystematic_session()
    for input, lbl in ctx.dataloader:  # trained a little, and the loader one pass on
        ctx.optimzer.zero_grad()
        ctx.loss_function(ctx.model(input), lbl).backward()
        ctx.optimzer.step()
    ctx.recorder.count = 4
    before = _everything(ctx)
    state = pystematic.load_checkpoint(_pystematic_checkpoint(tmp_path / "checkpoint-1.pt", **changes))
    with pytest.raises(px.CheckpointError, match="nothing was loaded") as info:
        ctx.load_state_dict(state)
    assert reason in str(info.value)
    assert _same(_everything(ctx), before)


# -- sweeps of a pystematic Experiment ---------------------------------------------------------


class _ParameterManager:
    """pystematic's, as far as a sweep sees it: defaults, checks, and the lock its help output holds."""

    def __init__(self, defaults: dict) -> None:
        self.defaults = defaults
        self._console_lock = threading.RLock()  # rich's Console holds one: the Experiment cannot be pickled

    def from_dict(self, values: dict, fail_on_unknown_values: bool = False) -> dict:
        unknown = sorted(set(values) - set(self.defaults))
        if fail_on_unknown_values and unknown:
            raise ValueError(f"'{unknown[0]}' is not a recognized parameter name.")
        return {**self.defaults, **values}


class Experiment:
    """pystematic's Experiment (pystematic/core.py), reduced to what run_parameter_sweep meets."""

    def __init__(self, main_function, defaults: dict) -> None:
        self.main_function = main_function
        self.name = main_function.__name__
        self.param_manager = _ParameterManager(defaults)

    def __call__(self, params: dict) -> None:
        self.run(params)

    def run(self, params: dict) -> None:
        self.main_function(self.param_manager.from_dict(params, fail_on_unknown_values=True))


def shifted(params: dict) -> tuple:
    return params["x"] + params["offset"], pystematic.params["offset"], os.getpid()


shifted = Experiment(shifted, {"x": 0, "offset": 10})  # what @pystematic.experiment does to the name


def test_run_parameter_sweep_runs_a_pystematic_experiment_with_its_defaults():
    with pytest.raises(TypeError, match="RLock"):
        cloudpickle.dumps(shifted)
    results = pystematic.torch.run_parameter_sweep(shifted, [{"x": 1}, {"x": 2, "offset": 20}], max_num_processes=2)
    assert [result.params["params"] for result in results] == [{"x": 1, "offset": 10}, {"x": 2, "offset": 20}]
    assert [result.value[:2] for result in results] == [(11, 10), (22, 20)]
    assert len({result.value[2] for result in results} | {os.getpid()}) == 3  # each run its own process
    assert "offset" not in pystematic.params


def test_run_parameter_sweep_refuses_params_an_experiment_does_not_declare_before_any_run(tmp_path):
    marker = tmp_path / "ran"
    experiment = Experiment(lambda params: marker.touch(), {"x": 0})
    with pytest.raises(px.PhalanxError, match=r"the params \{'y': 1\} do not fit experiment .*'y' is not a recognized"):
        pystematic.run_parameter_sweep(experiment, [{"x": 1}, {"y": 1}], max_num_processes=2)
    assert not marker.exists()
