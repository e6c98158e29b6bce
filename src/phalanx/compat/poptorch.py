"""PopTorch's distributed execution on phalanx: replace `import poptorch` and keep the code.

    from phalanx.compat import poptorch

    opts = poptorch.Options()
    opts.Distributed.configureProcessId(process_id, num_processes)   # joins the other processes
    opts.randomSeed(42)                                              # the same in every process
    loader = poptorch.DataLoader(opts, dataset, batch_size=2, shuffle=True)   # this process's subset
    model = poptorch.trainingModel(net, options=opts)                # DDP across the processes
    for data, labels in loader:
        output, loss = model(data, labels)                           # forward, backward, step

The processes meet through `px.launch` (see `phalanx.compat._process_group`): under mpirun,
srun or torchrun, inside a launch, or started by hand from Python, where the stated place
becomes `Platform(environment=Explicit(process_id, num_processes))`. There are no IPUs: the
IPU settings map onto torch as the migration page explains (docs/migration/poptorch.md), and
the IPU-only classes (`distributed.VirtualIpuManager`, `distributed.Partition`) raise
`IpuNotSupportedError` saying what to use instead.
"""

from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

import phalanx as px
from phalanx.compat._process_group import before_leaving, join

__all__ = [
    "DataLoader",
    "IpuNotSupportedError",
    "Options",
    "Partition",
    "VirtualIpuManager",
    "distributed",
    "inferenceModel",
    "trainingModel",
]

_DEFAULT_SEED = 0  # without opts.randomSeed: a value every process agrees on
_DEFAULT_LEARNING_RATE = 0.01  # PopTorch's trainingModel without an optimizer: SGD(lr=0.01)


class IpuNotSupportedError(px.PhalanxError, NotImplementedError):
    """A PopTorch name that only means something on Graphcore IPUs."""


def _whole(value: object, name: str, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"poptorch.Options: {name}({value!r}) needs a whole number >= {minimum}")
    return value


class _DistributedOptions:
    """`opts.Distributed`: this process's id and the number of processes."""

    def __init__(self) -> None:
        self._place: tuple[int, int] | None = None

    def configureProcessId(self, process_id: int, num_processes: int) -> _DistributedOptions:
        """Be process `process_id` of `num_processes`: joins the other processes (blocks until all came)."""
        join(
            process_id,
            num_processes,
            px.Platform,  # the device phalanx finds best here, the default backend for it
            f"Options().Distributed.configureProcessId({process_id!r}, {num_processes!r})",
        )
        self._place = (process_id, num_processes)
        return self

    @property
    def processId(self) -> int:
        """This process's id: the configured one, else its rank in phalanx (0 outside a launch)."""
        return self._place[0] if self._place is not None else px.get_rank()

    @property
    def numProcesses(self) -> int:
        """The number of processes: the configured one, else phalanx's world size (1 outside a launch)."""
        return self._place[1] if self._place is not None else px.get_world_size()


class _TrainingOptions:
    """`opts.Training`: gradient accumulation."""

    def __init__(self) -> None:
        self.gradient_accumulation = 1

    def gradientAccumulation(self, count: int) -> _TrainingOptions:
        """Add the gradients of `count` micro-batches before each optimizer step."""
        self.gradient_accumulation = _whole(count, "Training.gradientAccumulation")
        return self


class Options:
    """PopTorch's options, for the names that keep a meaning without IPUs.

    A step consumes `replicationFactor * Training.gradientAccumulation` micro-batches (the
    replicas of one process take turns on its one device); one call of a training model makes
    `deviceIterations` steps. Other IPU settings raise AttributeError naming the supported ones.
    """

    _SUPPORTED = ("deviceIterations", "replicationFactor", "randomSeed", "Training", "Distributed")

    def __init__(self) -> None:
        self.device_iterations = 1
        self.replication_factor = 1
        self.random_seed: int | None = None
        self.Training = _TrainingOptions()
        self.Distributed = _DistributedOptions()

    def deviceIterations(self, count: int) -> Options:
        """Optimizer steps per call of a training model (batches per call of an inference model)."""
        self.device_iterations = _whole(count, "deviceIterations")
        return self

    def replicationFactor(self, count: int) -> Options:
        """Replicas per process; on one device each replica's micro-batch is a turn of accumulation."""
        self.replication_factor = _whole(count, "replicationFactor")
        return self

    def randomSeed(self, seed: int) -> Options:
        """Seed torch, NumPy and `random` here, and the DataLoader's shuffle order."""
        self.random_seed = px.seed_everything(_whole(seed, "randomSeed", minimum=0))
        return self

    def _micro_batches_per_step(self) -> int:
        return self.replication_factor * self.Training.gradient_accumulation

    def _combined_factor(self) -> int:
        return self.device_iterations * self._micro_batches_per_step()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        raise AttributeError(
            f"poptorch.Options.{name} is an IPU setting that phalanx.compat.poptorch does not map onto torch; "
            f"the supported names are {', '.join(self._SUPPORTED)} (see docs/migration/poptorch.md)"
        )


class DataLoader:
    """PopTorch's DataLoader: this process's subset of `dataset`, in combined batches.

    Each batch holds `batch_size * deviceIterations * replicationFactor *
    gradientAccumulation` samples, what one call of the model consumes. With
    `auto_distributed_partitioning` (the default) the processes take disjoint subsets: every
    process shuffles the whole dataset the same way (the seed set by `opts.randomSeed`, which
    must be the same everywhere) and takes every n-th sample. Batches arrive on this process's
    device. Other keyword arguments go to `torch.utils.data.DataLoader`.
    """

    def __init__(
        self,
        options: Options,
        dataset: Dataset,
        batch_size: int = 1,
        shuffle: bool = False,
        num_workers: int = 0,
        drop_last: bool = True,
        persistent_workers: bool | None = None,
        auto_distributed_partitioning: bool = True,
        **kwargs: Any,
    ) -> None:
        if not isinstance(options, Options):
            raise TypeError(f"poptorch.DataLoader(options, dataset, ...) needs an Options first, got {options!r}")
        self.options = options
        self.dataset = dataset
        self.batch_size = _whole(batch_size, "DataLoader batch_size") * options._combined_factor()
        self.seed = _DEFAULT_SEED if options.random_seed is None else options.random_seed
        if persistent_workers is not None:
            kwargs["persistent_workers"] = persistent_workers
        self._partitioned = auto_distributed_partitioning
        if auto_distributed_partitioning:
            self._check_processes_agree(shuffle)
            self._loader: Any = px.dataloader(
                dataset,
                self.batch_size,
                shuffle,
                seed=self.seed,
                drop_last=drop_last,
                num_workers=num_workers,
                **kwargs,
            )
        else:  # the script partitions the data itself: every process sees all of it
            order = torch.Generator().manual_seed(self.seed)
            self._loader = torch.utils.data.DataLoader(
                dataset,
                self.batch_size,
                shuffle,
                generator=order,
                drop_last=drop_last,
                num_workers=num_workers,
                **kwargs,
            )

    @property
    def combinedBatchSize(self) -> int:
        """Samples per batch: batch_size times deviceIterations, replicationFactor, gradientAccumulation."""
        return self.batch_size

    def _check_processes_agree(self, shuffle: bool) -> None:
        """The same shuffle seed everywhere, or the subsets overlap: say which processes differ."""
        everyone = px.all_gather((shuffle, self.seed))
        if shuffle and len({seed for _, seed in everyone}) > 1:
            seeds = ", ".join(f"process {rank}: randomSeed({seed})" for rank, (_, seed) in enumerate(everyone))
            raise px.PhalanxError(
                f"poptorch.DataLoader(shuffle=True): the processes use different shuffle seeds ({seeds}), so their "
                "subsets would overlap and some samples would never be seen. Call opts.randomSeed(N) with the "
                "same N in every process."
            )

    def __iter__(self) -> Iterator[Any]:
        if self._partitioned:
            return iter(self._loader)  # px.dataloader delivers on the device already
        return (px.to_device(batch) for batch in self._loader)

    def __len__(self) -> int:
        return len(self._loader)


def _split(value: Any, pieces: int) -> list[Any]:
    """A batch cut along its first dimension; anything that is not a tensor goes to every piece."""
    if isinstance(value, torch.Tensor) and value.dim() > 0:
        return list(value.chunk(pieces))
    return [value] * pieces


def _batch_size(inputs: Sequence[Any]) -> int:
    for value in inputs:
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    raise ValueError("poptorch model: no tensor input with a batch dimension to split into micro-batches")


def _loss_of(output: Any) -> torch.Tensor:
    """The model's loss: its only output, or the last one of a tuple or list (PopTorch's convention here)."""
    loss = output[-1] if isinstance(output, (tuple, list)) else output
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError(
            "poptorch.trainingModel: the model must return its loss, alone or as the last output, as a "
            f"one-element tensor; it returned {type(loss).__name__}"
        )
    return loss


def _detached(output: Any) -> Any:
    if isinstance(output, torch.Tensor):
        return output.detach()
    if isinstance(output, (tuple, list)):
        return type(output)(_detached(item) for item in output)
    return output


class _TrainingModel:
    """What `trainingModel` returns: calling it trains on one combined batch."""

    def __init__(self, model: torch.nn.Module, options: Options, optimizer: torch.optim.Optimizer | None) -> None:
        self.model = model
        self.options = options
        self._parallel = px.prepare_model(model)  # DDP across the processes: gradients are averaged
        before_leaving(self._drop_parallel)
        self.optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=_DEFAULT_LEARNING_RATE)

    def _drop_parallel(self) -> None:
        self._parallel = self.model

    def __call__(self, *inputs: Any) -> Any:
        """`deviceIterations` steps over `inputs`; returns the outputs of the last micro-batch, detached."""
        per_step = self.options._micro_batches_per_step()
        pieces = self.options._combined_factor()
        size = _batch_size(inputs)
        if size % pieces:
            raise ValueError(
                f"poptorch model: a batch of {size} samples does not divide into deviceIterations * "
                f"replicationFactor * gradientAccumulation = {pieces} micro-batches; use the poptorch.DataLoader "
                "with the same options, or a batch size that is a multiple of that product"
            )
        micro_batches = list(zip(*(_split(px.to_device(value), pieces) for value in inputs), strict=True))
        self._parallel.train()
        output = None
        for start in range(0, pieces, per_step):
            for turn, micro_batch in enumerate(micro_batches[start : start + per_step]):
                last = turn == per_step - 1
                # DDP averages over the processes once per step, on the last micro-batch's backward.
                no_sync = getattr(self._parallel, "no_sync", None)
                with contextlib.nullcontext() if last or no_sync is None else no_sync():
                    output = self._parallel(*micro_batch)
                    (_loss_of(output) / per_step).backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return _detached(output)


def trainingModel(
    model: torch.nn.Module, options: Options | None = None, optimizer: torch.optim.Optimizer | None = None
) -> Callable[..., Any]:
    """Wrap `model` (which returns its loss, alone or last) for training across the processes.

    Each call runs `deviceIterations` steps on its combined batch; a step is forward and
    backward over `replicationFactor * gradientAccumulation` micro-batches, the gradients
    averaged over them and over the processes, then `optimizer.step()` (default: SGD with
    lr=0.01, as PopTorch). `model` itself holds the trained weights.
    """
    return _TrainingModel(model, options or Options(), optimizer)


def inferenceModel(model: torch.nn.Module, options: Options | None = None) -> Callable[..., Any]:
    """Wrap `model` for inference: eval mode, no gradients, the outputs of the whole batch."""
    del options  # one device per process: the batch runs at once, whatever the IPU settings
    model = px.to_device(model.eval())

    def infer(*inputs: Any) -> Any:
        with torch.no_grad():
            return model(*(px.to_device(value) for value in inputs))

    return infer


_IPU_ONLY_ADVICE = (
    "phalanx runs on CPUs and GPUs and has no IPUs, so there is no partition to create or reset. Start the "
    "processes with `mpirun -np N python script.py` (each passes OMPI_COMM_WORLD_RANK and OMPI_COMM_WORLD_SIZE "
    "to opts.Distributed.configureProcessId), start them yourself (multiprocessing) with "
    "configureProcessId(i, N), or let phalanx start them: px.launch(lambda: process(px.get_rank(), "
    "px.get_world_size()), platform=px.Platform(n_procs=N)). See docs/migration/poptorch.md."
)


class _IpuOnly(type):
    """Metaclass of the IPU-only classes: using them in any way raises IpuNotSupportedError."""

    def _refuse(cls, what: str) -> IpuNotSupportedError:
        return IpuNotSupportedError(
            f"poptorch.distributed.{cls.__name__}{what} needs Graphcore IPUs. {_IPU_ONLY_ADVICE}"
        )

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        raise cls._refuse("(...)")

    def __getattr__(cls, name: str) -> Any:
        if name.startswith("_"):  # Python's and tools' own probes: plain absence
            raise AttributeError(name)
        raise cls._refuse(f".{name}")


class VirtualIpuManager(metaclass=_IpuOnly):
    """IPU partitions through vipu-cli: not supported; any use raises IpuNotSupportedError."""


class Partition(metaclass=_IpuOnly):
    """An IPU partition's description: not supported; any use raises IpuNotSupportedError."""


# `from phalanx.compat.poptorch.distributed import VirtualIpuManager`, as PopTorch's own
# `from poptorch.distributed import ...`, needs a module of that name.
distributed = types.ModuleType(f"{__name__}.distributed", "PopTorch's poptorch.distributed: IPU-only, not supported.")
distributed.VirtualIpuManager = VirtualIpuManager
distributed.Partition = Partition
sys.modules[distributed.__name__] = distributed
