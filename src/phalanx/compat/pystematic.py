"""pystematic-torch's API on phalanx: change `import pystematic` to `from phalanx.compat import pystematic`.

    from phalanx.compat import pystematic                       # was: import pystematic

    ctx = pystematic.torch.TorchContext()
    ctx.model = torch.nn.Sequential(torch.nn.Linear(2, 1), torch.nn.Sigmoid())
    ctx.dataloader = pystematic.torch.SmartDataLoader(dataset=Dataset(), batch_size=2)
    ctx.cuda()
    ...
    pystematic.torch.save_checkpoint(ctx.state_dict(), id=epoch)

Every name pystematic-torch documents under `pystematic.torch` is here, both as
`pystematic.torch.<name>` and as a module-level name. The processes come from `px.launch`
(pystematic's `--distributed --nproc_per_node` launcher is replaced by a `Platform`).
`params` holds pystematic's default experiment parameters and `output_dir` the folder
checkpoints go to; both belong to the process, so set them inside the launched function.
"""

from __future__ import annotations

import functools
import os
import pathlib
import types
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch as _torch

import phalanx as px
from phalanx.context import read_weights_only, write_atomically, written_by_context

__all__ = [
    "Context",
    "Recorder",
    "SmartDataLoader",
    "TorchContext",
    "broadcast_from_master",
    "distributed_barrier",
    "get_num_processes",
    "get_rank",
    "is_distributed",
    "is_master",
    "load_checkpoint",
    "move_to_device",
    "output_dir",
    "params",
    "run_parameter_sweep",
    "save_checkpoint",
    "torch",
]

# pystematic's default parameters (its "Default parameters" section); `autotransform` reads
# checkpoint, cuda and distributed. The launch parameters are phalanx's Platform's now.
params: dict[str, Any] = {
    "checkpoint": None,
    "cuda": True,
    "distributed": False,
    "node_rank": 0,
    "nproc_per_node": 1,
    "nnodes": 1,
    "master_addr": "127.0.0.1",
    "master_port": 29500,
}

# Where `save_checkpoint` writes; pystematic made one per run, phalanx leaves the choice to you.
output_dir: pathlib.Path = pathlib.Path("output")


# -- general ------------------------------------------------------------------------------------


def move_to_device(device: _torch.device | str, *args: Any) -> Any:
    """Move tensors (nested in lists, tuples, dicts) and modules to `device`.

    One object in, that object moved out; several in, a list of them out.
    """
    moved = [_move(arg, device) for arg in args]
    return moved[0] if len(moved) == 1 else moved


def _move(obj: Any, device: _torch.device | str) -> Any:
    if isinstance(obj, _torch.nn.Module):
        return obj.to(device)
    return px.to_device(obj, device)


def save_checkpoint(state_dict: dict[str, Any], id: Any, directory: str | os.PathLike | None = None) -> pathlib.Path:
    """Write `state_dict` to `<output_dir>/checkpoint-<id>.pt`, from the master only; returns the path.

    Every rank may call it; only the master writes. The file is written under a temporary
    name (created exclusively, so a planted link is never written through), flushed to disk
    and renamed, so a crash mid-save leaves no half file. `directory` overrides
    `output_dir`.
    """
    folder = pathlib.Path(directory if directory is not None else output_dir)
    path = folder / f"checkpoint-{id}.pt"
    if px.is_master():
        write_atomically(state_dict, path)  # Context.save's writer: O_EXCL|O_NOFOLLOW, fsync, rename
    return path


def load_checkpoint(checkpoint_file_path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint onto the CPU without running any code from it (`weights_only=True`).

    Any file `torch.save` wrote (pystematic's own checkpoints too), read as `Context.load`
    reads its own: a missing, cut, corrupt or unsafe file raises `px.CheckpointError`.
    """
    return read_weights_only(pathlib.Path(checkpoint_file_path))


def _run_experiment(experiment: Callable[[dict[str, Any]], Any], params: dict[str, Any]) -> Any:
    """One run, in its own process: while it runs, the module's `params` hold its values (as pystematic's do)."""
    module_params = globals()["params"]  # the argument has the name px.sweep passes it by
    defaults = dict(module_params)
    module_params.update(params)
    try:
        return experiment(params)
    finally:
        module_params.clear()
        module_params.update(defaults)


def _what_a_run_needs(experiment: Callable[[dict[str, Any]], Any], params: dict[str, Any]) -> tuple[Callable, dict]:
    """The callable and the params to send to a run's process.

    A pystematic `Experiment` cannot be pickled (its parameters' command-line help holds a
    lock), so its main function goes instead, with the run's values as `Experiment.run` would
    pass them: checked and completed with the experiment's defaults, here, before any run.
    Any other callable goes as it is.
    """
    main_function = getattr(experiment, "main_function", None)
    if not callable(main_function):
        return experiment, dict(params)
    from_dict = getattr(getattr(experiment, "param_manager", None), "from_dict", None)
    if not callable(from_dict):
        return main_function, dict(params)
    try:
        values = from_dict(dict(params), fail_on_unknown_values=True)
    except Exception as error:
        name = getattr(experiment, "name", main_function.__name__)
        raise px.PhalanxError(
            f"run_parameter_sweep(): the params {params!r} do not fit experiment {name!r} ({error}); no run was "
            "started. Pass only parameters the experiment declares."
        ) from error
    return main_function, dict(values)


def run_parameter_sweep(
    experiment: Callable[[dict[str, Any]], Any],
    list_of_params: list[dict[str, Any]],
    max_num_processes: int = 1,
    num_gpus_per_process: int | None = None,
) -> list[px.SweepResult]:
    """Run `experiment(params)` for every dict of `list_of_params`, `max_num_processes` at a time.

    `experiment` is a pystematic `Experiment` (its main function runs, with each dict completed
    by the experiment's defaults) or any callable that takes the params dict. Runs on
    `px.sweep`: with `num_gpus_per_process=1` each run gets one GPU of its own; with None the
    runs are CPU processes that see every GPU, as in pystematic. Returns every point's
    `px.SweepResult` (`params["params"]`: the values the run got); if any run failed, raises
    after all have run.
    """
    if num_gpus_per_process not in (None, 1):
        raise px.PlatformError(
            "num_gpus_per_process",
            num_gpus_per_process,
            "phalanx sweeps give each run one GPU (1) or none (None)",
            "Use 1, or px.launch with Platform(device='cuda', n_procs=k) inside the experiment for k GPUs.",
            owner="run_parameter_sweep",
        )
    device = "cpu" if num_gpus_per_process is None else "cuda"
    platform = px.Platform(device=device, n_procs=max_num_processes)
    runs = [_what_a_run_needs(experiment, point) for point in list_of_params]
    function = runs[0][0] if runs else experiment  # the same for every run
    grid = [{"params": values} for _, values in runs]
    results = px.sweep(functools.partial(_run_experiment, function), grid, platform=platform, progress=False)
    failed = [result for result in results if not result.ok]
    if failed:
        raise px.PhalanxError(
            f"{len(failed)} of {len(results)} runs failed; the first, with params {failed[0].params['params']}: "
            f"{failed[0].error}. (px.sweep returns every run's result, failures included.)"
        ) from failed[0].error
    return results


# -- distributed --------------------------------------------------------------------------------


def is_distributed() -> bool:
    """True inside a launch of more than one rank."""
    return px.is_distributed()


def is_master() -> bool:
    """True on global rank 0 (and outside a launch)."""
    return px.is_master()


def get_num_processes() -> int:
    """The number of ranks (1 outside a launch)."""
    return px.get_world_size()


def get_rank() -> int:
    """This process's global rank (0 outside a launch)."""
    return px.get_rank()


def broadcast_from_master(value: Any) -> Any:
    """The master's `value` on every rank. Numbers come back as tensors, as in pystematic; other objects as they are."""
    value = px.broadcast_from_master(value)
    if isinstance(value, (bool, int, float, _torch.Tensor)):
        return _torch.as_tensor(value)
    return value


def distributed_barrier() -> None:
    """Wait until every rank gets here (returns at once outside a launch)."""
    px.barrier()


# -- context ------------------------------------------------------------------------------------


class Context(px.Context):
    """pystematic's Context: register models, optimizers, loaders, counters as attributes.

    `state_dict`/`load_state_dict`, `cpu`/`cuda`/`to` and `ddp` are phalanx's (with exact
    resume: random states and loader positions are saved too); `autotransform` applies
    pystematic's parameters. `save(path)`/`load(path)` are phalanx's atomic checkpoint files.

    Example::

        ctx = TorchContext()
        ctx.model = torch.nn.Linear(2, 1)
        ctx.autotransform()          # checkpoint, device, DDP as `params` and the launch say
    """

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> None:
        """Restore `state`, all of it or nothing: phalanx's checkpoints, and pystematic-torch's.

        A state without phalanx's own entry was written by pystematic-torch's Context, and is
        read as pystematic-torch reads it: an entry for a name not registered here is ignored,
        and an entry that is None (what pystematic-torch saved for objects without a state: a
        DataLoader, a tensor, a SmartDataLoader) or absent leaves that object as it is. Every
        other entry is checked and loaded as `px.Context.load_state_dict` does.
        """
        if isinstance(state, Mapping) and not written_by_context(state):
            registered = {name for name in vars(self) if not name.startswith("_")}
            state = {name: value for name, value in state.items() if name in registered and value is not None}
            strict = False
        super().load_state_dict(state, strict=strict)

    def cuda(self) -> Context:
        """Move everything to this rank's GPU."""
        if not _torch.cuda.is_available():
            raise px.PhalanxError(
                "Context.cuda(): no CUDA GPU is visible here. Use ctx.cpu(), or ctx.to(px.device()) to follow "
                "the launch's device."
            )
        super().cuda()
        return self

    def autotransform(self) -> Context:
        """Load `params["checkpoint"]` if set, move to the rank's device if `params["cuda"]`, then DDP.

        The device is the launch's (`px.device()`): cuda on a GPU launch, cpu on a CPU launch.
        Models are wrapped in DDP when the launch has several ranks (or `params["distributed"]`).
        """
        if params["checkpoint"]:
            self.load_state_dict(load_checkpoint(params["checkpoint"]))
        if params["cuda"]:
            self.to(px.device())
        if params["distributed"] or px.is_distributed():
            self.ddp()
        return self


TorchContext = Context


class SmartDataLoader:
    """pystematic's loader: this rank's shard, batches on the device set with `to`, a progress bar on the master.

    Runs on `px.dataloader` (one shard per rank, a new shuffle every pass, the same on every
    rank, exact resume in a Context). Batches arrive on the CPU until `to` (or
    `Context.cuda/cpu/to`) names a device. Other keyword arguments (`batch_size`,
    `num_workers`, `drop_last`, ...) are DataLoader's.
    """

    def __init__(
        self,
        dataset: _torch.utils.data.Dataset,
        shuffle: bool = False,
        random_seed: int | None = None,
        sampler: Any = None,
        batch_sampler: Any = None,
        move_output: bool = True,
        loading_bar: bool = True,
        **kwargs: Any,
    ) -> None:
        if sampler is not None or batch_sampler is not None:
            raise px.PhalanxError(
                "SmartDataLoader(sampler=..., batch_sampler=...) is not supported: phalanx shards the dataset "
                "over the ranks itself. Pass shuffle= and random_seed=, or use torch's DataLoader with your sampler."
            )
        batch_size = kwargs.pop("batch_size", 1)
        drop_last = kwargs.pop("drop_last", False)
        seed = 0 if random_seed is None else random_seed
        self.loader = px.dataloader(
            dataset, batch_size, shuffle, seed=seed, drop_last=drop_last, device="cpu", **kwargs
        )
        self._move_output = move_output
        self._loading_bar = loading_bar
        self._device: _torch.device | None = None

    @property
    def dataset(self) -> _torch.utils.data.Dataset:
        return self.loader.dataset

    @property
    def batch_size(self) -> int:
        return self.loader.batch_size

    def to(self, device: _torch.device | str) -> SmartDataLoader:
        """Deliver the batches on `device` from now on."""
        self._device = _torch.device(device)
        if self._move_output:
            self.loader.to(self._device)
        return self

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        batches = iter(self.loader)
        if self._loading_bar and px.is_master():
            try:
                from tqdm import tqdm
            except ImportError:
                return batches
            return iter(tqdm(batches, total=len(self.loader), leave=True))
        return batches

    def state_dict(self) -> dict[str, int]:
        """The position in the data: epoch and batches consumed (for an exact resume)."""
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a position that `state_dict` returned."""
        self.loader.load_state_dict(state)


class Recorder:
    """pystematic's Recorder: scalars, figures, images, parameters; TensorBoard, a CSV file and the console.

    Only the master records (phalanx's rule: one writer per run). `count` is the step values
    are recorded at; `step()` advances it. TensorBoard goes through `px.Recorder`.
    `output_dir` defaults to the module's `output_dir`.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike | None = None,
        tensorboard: bool = True,
        file: bool = True,
        console: bool = False,
    ) -> None:
        self.output_dir = pathlib.Path(output_dir if output_dir is not None else _default_output_dir())
        self._counter = 0
        self._active = px.is_master()
        self._tensorboard = px.Recorder(self.output_dir) if tensorboard and self._active else None
        self._file = file
        self._console = console
        self._pending: dict[str, float] = {}

    @property
    def count(self) -> int:
        """The step values are recorded at; assign it or call `step()`."""
        return self._counter

    @count.setter
    def count(self, value: int) -> None:
        self._counter = value

    def silence(self) -> None:
        """Record nothing from now on in this process."""
        self._active = False

    def step(self) -> None:
        """Advance `count` by one (the console shows the step's scalars)."""
        self._counter += 1
        if self._active and self._console and self._pending:
            print("\n".join(f"{tag}: {value}" for tag, value in self._pending.items()), flush=True)
        self._pending = {}

    def params(self, params_dict: dict[str, Any]) -> None:
        """Record the run's parameters (TensorBoard's HPARAMS tab)."""
        if self._active and self._tensorboard is not None:
            self._tensorboard.params(params_dict, {})

    def scalar(self, tag: str, scalar: float | _torch.Tensor) -> None:
        """Record a number under `tag` at `count`."""
        if not self._active:
            return
        value = scalar.detach().cpu().item() if isinstance(scalar, _torch.Tensor) else scalar
        if self._tensorboard is not None:
            self._tensorboard.scalar(tag, value, step=self._counter)
        if self._file:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            scalars = self.output_dir / "scalars.csv"
            header = "" if scalars.exists() else "step, tag, value\n"
            with scalars.open("a") as file:
                file.write(f"{header}{self._counter}, {tag}, {value}\n")
        if self._console:
            self._pending[tag] = value

    def figure(self, tag: str, fig: Any) -> None:
        """Record a matplotlib figure (and, with `file`, save it under figures/)."""
        if not self._active:
            return
        if self._file:
            folder = self.output_dir / "figures"
            folder.mkdir(parents=True, exist_ok=True)
            fig.savefig(folder / f"{tag.replace('/', '.')}-{self._counter}.png")
        if self._tensorboard is not None:
            self._tensorboard.figure(tag, fig, step=self._counter)

    def image(self, tag: str, image: Any) -> None:
        """Record an image: a CHW tensor or array with values in [0, 1] or uint8."""
        if self._active and self._tensorboard is not None:
            if isinstance(image, _torch.Tensor):
                image = image.detach().cpu()
            self._tensorboard.image(tag, image, step=self._counter)

    def state_dict(self) -> dict[str, int]:
        """`{"count": n}`, for a checkpoint."""
        return {"count": self._counter}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue at the step a checkpoint holds."""
        self._counter = int(state["count"])
        if self._tensorboard is not None:
            self._tensorboard.load_state_dict({"count": self._counter})

    def close(self) -> None:
        """Flush and close the TensorBoard file."""
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None


def _default_output_dir() -> pathlib.Path:
    return output_dir


# `pystematic.torch.<name>`: the namespace pystematic-torch documents. (The module itself
# imports torch as `_torch`, so that `torch` here is this namespace.)
torch = types.SimpleNamespace(
    move_to_device=move_to_device,
    save_checkpoint=save_checkpoint,
    load_checkpoint=load_checkpoint,
    run_parameter_sweep=run_parameter_sweep,
    is_distributed=is_distributed,
    is_master=is_master,
    get_num_processes=get_num_processes,
    get_rank=get_rank,
    broadcast_from_master=broadcast_from_master,
    distributed_barrier=distributed_barrier,
    Context=Context,
    TorchContext=TorchContext,
    Recorder=Recorder,
    SmartDataLoader=SmartDataLoader,
)
