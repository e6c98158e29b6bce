"""DDPW's front door on phalanx: change `from ddpw import ...` to `from phalanx.compat.ddpw import ...`.

    from phalanx.compat.ddpw import Platform, Wrapper       # was: from ddpw import Platform, Wrapper

    def task(global_rank, local_rank, process_group, args):          # DDPW 5.3
        print(f"This is GPU {global_rank}(G)/{local_rank}(L); args = {args}")

    def run(*args, **kwargs):                                          # DDPW 5.4, 5.5
        print(f"GPU {kwargs['global_rank']}(G)/{kwargs['local_rank']}(L); args = {args}")

    Wrapper(platform=Platform(device="gpu", n_gpus=4)).start(task, ("example",))
    Wrapper(platform=Platform(device="gpu", n_gpus=4)).start(run, "example")

This covers DDPW 5.0 to 5.5, whose `Platform` has the same fields (`n_gpus`,
`n_cpus`, `ram`, ...). 5.3 calls `task(global_rank, local_rank, group, args)`; 5.4 and 5.5
call `task(*args, **kwargs, global_rank=..., local_rank=..., group=..., platform=...)`;
phalanx reads which one a task expects from its parameters (`calling_convention`). `Platform`
keeps DDPW's argument names and defaults and maps them onto `phalanx.Platform`; `Wrapper`
and `wrapper` run on `px.Wrapper` and `px.wrapper`; DDPW's utilities (`to`,
`get_dataset_sampler`, `set_device`, `optimiser_to`, ...) live here too, and `functional`
names this module, so `from ddpw import functional as DF` becomes
`from phalanx.compat.ddpw import functional as DF`. What differs from DDPW, and why, is in
docs/migration/ddpw.md: CPU runs have `n_gpus` ranks, a failing rank raises instead of
returning normally, the port is a free one.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler

import phalanx as px
from phalanx.devices import device_count, is_available, rank_device
from phalanx.wrapper import calling_convention

__all__ = [
    "Device",
    "Platform",
    "Wrapper",
    "average_params_grads",
    "calling_convention",
    "device",
    "functional",
    "get_dataset_sampler",
    "has_batch_norm",
    "optimiser_to",
    "seed_generators",
    "set_device",
    "to",
    "wrapper",
]

_SPAWN_METHODS = (None, "fork", "spawn", "forkserver")
_PHALANX_DEVICES = {"cpu": "cpu", "gpu": "cuda", "mps": "mps"}


class Device(enum.Enum):
    """DDPW's device kinds: where the task runs."""

    CPU = "cpu"
    GPU = "gpu"
    SLURM = "slurm"
    MPS = "mps"

    @staticmethod
    def from_str(device: str | Device) -> Device:
        """The `Device` for a name ("cpu", "gpu", "slurm", "mps", any case) or a `Device`."""
        if isinstance(device, Device):
            return device
        if isinstance(device, str):
            for member in Device:
                if member.value == device.strip().lower():
                    return member
        raise px.PlatformError(
            "device", device, "allowed are 'cpu', 'gpu', 'slurm' and 'mps' (or a Device)", owner="ddpw Platform"
        )


@dataclasses.dataclass
class Platform:
    """DDPW's `Platform`: its fields, names and defaults, run by phalanx.

    `to_phalanx()` gives the `phalanx.Platform` it stands for; it is built once here, so that
    a bad value raises `PlatformError` at construction. Fields that only SLURM reads (`name`
    aside, which phalanx takes from the function) go to phalanx only for device="slurm", as
    in DDPW. `master_port=None` (the default) lets phalanx take a free port atomically where
    DDPW drew a random one at import. `spawn_method` and `verbose` are accepted and unused:
    phalanx forks its workers from a clean copy of the interpreter taken at import (never from
    a process that holds CUDA or threads), whatever the start method, and prints no setup log.

    Example::

        Platform(device="cpu", n_gpus=2).to_phalanx()   # Platform(device='cpu', n_procs=2, backend='gloo', ...)
    """

    name: str = "ddpw"
    device: Device | str = Device.GPU
    partition: str = "general"
    n_nodes: int = 1
    n_gpus: int = 1
    n_cpus: int = 1
    ram: int = 32
    spawn_method: str | None = "fork"
    ipc_protocol: str = "tcp"
    master_addr: str = "localhost"
    master_port: str | int | None = None
    ipc_groups: list[list[int]] | None = dataclasses.field(default_factory=list)
    backend: str | None = "gloo"
    seed: int = 1889
    timeout_min: int = 2880
    slurm_additional_parameters: dict | None = None
    console_logs: str = "./logs"
    verbose: bool | None = True
    upon_finish: Callable[[], Any] | None = None

    def __post_init__(self) -> None:
        self.device = Device.from_str(self.device)
        self.to_phalanx()

    @property
    def world_size(self) -> int:
        """Ranks in the job: GPUs per node, times nodes on SLURM."""
        return self.n_gpus * (self.n_nodes if self.device is Device.SLURM else 1)

    @property
    def requires_ipc(self) -> bool:
        """Whether the ranks communicate: more than one of them, and `ipc_groups` not None."""
        return self.ipc_groups is not None and self.world_size > 1

    def to_phalanx(self) -> px.Platform:
        """The `phalanx.Platform` this DDPW platform describes (raises `PlatformError` on bad values)."""
        kind = Device.from_str(self.device)
        self._check_unmapped()
        common: dict[str, Any] = {
            "n_gpus": self.n_gpus,
            "master_addr": self.master_addr,
            "master_port": _port(self.master_port),
            "backend": str(self.backend) if self.backend is not None else None,
            "seed": self.seed,
        }
        if kind is Device.SLURM:
            return px.Platform(
                device="cuda",
                cluster="slurm",
                n_nodes=self.n_nodes,
                n_cpus=self.n_cpus,
                partition=self.partition,
                ram=self.ram,
                time=self.timeout_min,
                slurm_additional_parameters=self.slurm_additional_parameters,
                log_dir=self.console_logs,
                **common,
            )
        if kind is not Device.CPU and kind.value not in _available_kinds():
            raise px.PlatformError(
                "device",
                kind.value,
                f"no {kind.value.upper()} is visible here",
                "Use device='cpu' (phalanx then runs n_gpus CPU ranks), or run where the device is.",
                owner="ddpw Platform",
            )
        if kind is Device.GPU and self.n_gpus > device_count("cuda"):
            visible = device_count("cuda")
            raise px.PlatformError(
                "n_gpus",
                self.n_gpus,
                f"only {visible} GPU(s) are visible here; DDPW would quietly run {visible} rank(s) instead",
                f"Pass n_gpus={visible} or fewer.",
                owner="ddpw Platform",
            )
        return px.Platform(device=_PHALANX_DEVICES[kind.value], cluster="local", **common)

    def _check_unmapped(self) -> None:
        """Fields phalanx does not use still get checked, so that a typo does not pass silently."""
        if self.ipc_protocol != "tcp":
            raise px.PlatformError(
                "ipc_protocol",
                self.ipc_protocol,
                "phalanx's ranks always meet through a TCP store",
                "Leave ipc_protocol='tcp'.",
                owner="ddpw Platform",
            )
        if self.spawn_method not in _SPAWN_METHODS:
            raise px.PlatformError(
                "spawn_method", self.spawn_method, f"allowed are {_SPAWN_METHODS}", owner="ddpw Platform"
            )
        if self.upon_finish is not None and not callable(self.upon_finish):
            raise px.PlatformError(
                "upon_finish", self.upon_finish, "it must be callable or None", owner="ddpw Platform"
            )
        _check_groups(self.ipc_groups, self.world_size)

    def print(self) -> None:
        """Print the DDPW fields and the phalanx platform they map to."""
        fields = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self))
        print(f"ddpw Platform({fields})\n  runs as {self.to_phalanx()!r}\n  world size: {self.world_size}", flush=True)


def _port(value: str | int | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise px.PlatformError(
            "master_port", value, "it must be a port number (a string of digits or an int)", owner="ddpw Platform"
        ) from None


def _check_groups(groups: list[list[int]] | None, world_size: int) -> None:
    if groups is None or groups == []:
        return
    seen: list[int] = []
    for group in groups:
        if not isinstance(group, (list, tuple)) or not all(isinstance(rank, int) for rank in group):
            raise px.PlatformError(
                "ipc_groups", groups, "it must be None, [] or a list of lists of global ranks", owner="ddpw Platform"
            )
        seen += group
    if sorted(seen) != list(range(world_size)):
        raise px.PlatformError(
            "ipc_groups",
            groups,
            f"every rank 0..{world_size - 1} must be in exactly one group",
            "List each global rank once, or pass [] for one group of every rank.",
            owner="ddpw Platform",
        )


def _available_kinds() -> set[str]:
    return {kind for kind, device_type in (("gpu", "cuda"), ("mps", "mps")) if is_available(device_type)}


def _phalanx_platform(platform: Platform | px.Platform) -> px.Platform:
    return platform if isinstance(platform, px.Platform) else platform.to_phalanx()


def _rank_group(groups: list[list[int]] | None) -> Any:
    """The group DDPW gives this rank's task: None without IPC, else this rank's own group."""
    if groups is None:
        return None
    group = dist.group.WORLD
    for ranks in groups:  # new_group is collective: every rank creates every group, in order
        made = dist.new_group(ranks=list(ranks))
        if px.get_rank() in ranks:
            group = made
    return group


def _core_wrapper_options(platform: Platform | px.Platform) -> dict[str, Any]:
    """What `px.Wrapper` and `px.wrapper` need to hand the task DDPW's platform and groups."""
    groups = getattr(platform, "ipc_groups", [])
    make_group = None if groups == [] else functools.partial(_rank_group, groups)
    return {"task_platform": platform, "make_group": make_group}


class Wrapper:
    """DDPW's `Wrapper`: `start(task, ...)` runs `task` on every rank, called as DDPW 5.3, 5.4 or 5.5 calls it.

    A task with four positional parameters is called as in DDPW 5.3, with `start(task, args)`:
    `task(global_rank, local_rank, group, args)`. A task that takes `**kwargs`, or parameters
    named `global_rank`, `local_rank` or `group` elsewhere, is called as in DDPW 5.5, with
    `start(task, *args, **kwargs)`: `task(*args, **kwargs, global_rank=..., local_rank=...,
    group=..., platform=...)`, `platform` being this `Platform`. `calling_convention` gives the
    whole rule; a task that fits neither raises `PhalanxError` before any rank starts.

    Runs on `px.Wrapper`; returns every rank's value (DDPW returned None) and raises
    `px.WorkerError` when a rank fails (DDPW returned normally). `platform.upon_finish` is
    called in the caller once every rank has finished.

    Example::

        def train(*args, **kwargs):
            batch_size, epochs = args
            return kwargs["global_rank"], kwargs["platform"].world_size

        Wrapper(Platform(device="cpu", n_gpus=2)).start(train, 32, 2)  # [(0, 2), (1, 2)]
    """

    def __init__(self, platform: Platform | px.Platform) -> None:
        self.platform = platform

    def start(self, target: Callable[..., Any], /, *args: Any, **kwargs: Any) -> list[Any]:
        """Run `target` on every rank of the platform; return the values by global rank."""
        core = px.Wrapper(_phalanx_platform(self.platform), **_core_wrapper_options(self.platform))
        values = core.start(target, *args, **kwargs)
        finish = getattr(self.platform, "upon_finish", None)
        if finish is not None:
            finish()
        return values


def wrapper(platform: Platform | px.Platform) -> Callable[[Callable[..., Any]], Callable[..., list[Any]]]:
    """DDPW's decorator: calling the decorated function runs it, with its own arguments, on every rank.

    A function that takes `**kwargs` (DDPW 5.4 and 5.5's `def run(*args, **kwargs)`), or
    parameters named `global_rank`, `local_rank` or `group`, also gets each of
    `global_rank`, `local_rank`, `group` and `platform` that it can take; any other function
    gets only its own arguments, as in DDPW 5.3 (`calling_convention` gives the whole rule).

    Example::

        @wrapper(Platform(device="cpu", n_gpus=2))
        def run(a, b):
            return a + b

        run(1, 2)  # [3, 3]

        @wrapper(Platform(device="cpu", n_gpus=2))
        def ranked(*args, **kwargs):
            return args, kwargs["global_rank"]

        ranked("x")  # [(('x',), 0), (('x',), 1)]
    """

    def decorate(fn: Callable[..., Any]) -> Callable[..., list[Any]]:
        launched = px.wrapper(_phalanx_platform(platform), **_core_wrapper_options(platform))(fn)
        finish = getattr(platform, "upon_finish", None)
        if finish is None:
            return launched

        # functools.wraps(fn) keeps `__wrapped__` pointing at `fn`: a rank that finds this
        # function by its module name unwraps it to `fn` rather than launching again.
        @functools.wraps(fn)
        def launched_then_finish(*args: Any, **kwargs: Any) -> list[Any]:
            values = launched(*args, **kwargs)
            finish()
            return values

        return launched_then_finish

    return decorate


# -- DDPW's utilities (ddpw.functional) -------------------------------------------------------


def seed_generators(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (`px.seed_everything`)."""
    px.seed_everything(seed)


def has_batch_norm(module: torch.nn.Module) -> bool:
    """Whether `module` holds a BatchNorm1d/2d/3d layer."""
    norms = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)
    return any(isinstance(layer, norms) for layer in module.modules())


def _target_device(kind: Device, local_rank: int) -> torch.device:
    """The device DDPW's `to` moves to: the rank's own (`px.device()` in a launched rank)."""
    if kind in (Device.CPU, Device.MPS):
        return rank_device(kind.value, local_rank)
    if not is_available("cuda"):
        raise px.PlatformError(
            "device",
            kind,
            "no CUDA GPU is visible here",
            "Pass device=Device.CPU, or the platform's device: to(module, local_rank, device=platform.device).",
            owner="ddpw to",
        )
    return rank_device("cuda", local_rank)


def to(
    module: torch.nn.Module, local_rank: int, sync_modules: bool = True, device: Device | str = Device.GPU
) -> torch.nn.Module:
    """Move `module` to `device` (the GPU `local_rank` for GPU and SLURM); wrap it in DDP when distributed.

    With more ranks than GPUs (gloo shares them), rank `local_rank` takes GPU `local_rank % count`,
    the one phalanx gives that rank (`px.device()`), where DDPW would fail on a missing GPU.

    Unlike DDPW, CPU and MPS modules are wrapped too when `sync_modules` and the launch has
    several ranks: phalanx runs several CPU ranks, whose gradients must be averaged. On GPUs,
    batch normalisation layers become SyncBatchNorm first, as in DDPW.
    """
    target = _target_device(Device.from_str(device), local_rank)
    module = module.to(target)
    if not sync_modules or not px.is_distributed():
        return module
    if target != px.device():
        raise px.PhalanxError(
            f"to(device={device!r}, local_rank={local_rank}) moves the module to {target}, but this rank computes "
            f"on {px.device()}: DDP needs the module on the rank's device. Pass the platform's device."
        )
    if target.type == "cuda" and has_batch_norm(module):
        module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return px.prepare_model(module)


def get_dataset_sampler(
    dataset: Dataset, global_rank: int, platform: Platform | None = None
) -> DistributedSampler | None:
    """This rank's `DistributedSampler` over `dataset`, or None when the launch has one rank.

    The number of shards is the launch's world size. DDPW gave no sampler on CPU; phalanx
    runs several CPU ranks, which need one. (`px.dataloader` also moves batches and calls
    `set_epoch` for you.)
    """
    world_size = px.get_world_size()
    if world_size == 1:
        return None
    return DistributedSampler(dataset, num_replicas=world_size, rank=global_rank)


def optimiser_to(optimiser: torch.optim.Optimizer, device: torch.device | str) -> None:
    """Move an optimiser's state tensors to `device`, in place."""
    px.Context(optimiser=optimiser).to(device)


def average_params_grads(module: torch.nn.Module, params: bool = False, grads: bool = True) -> None:
    """Average the parameters and/or the gradients of `module` over every rank, in place.

    DDPW's defaults: gradients only. (DDPW 5.x returned without averaging unless both were
    asked for; this averages what is asked.)
    """
    with torch.no_grad():
        for parameter in module.parameters():
            if grads and parameter.grad is not None:
                parameter.grad.copy_(px.all_reduce(parameter.grad, op="mean"))
            if params:
                parameter.copy_(px.all_reduce(parameter, op="mean"))


def device(module: torch.nn.Module) -> torch.device:
    """The device `module` lives on; this rank's device when it has no parameters."""
    for parameter in module.parameters():
        return parameter.device
    return px.device()


def _device_kind(platform: Platform | px.Platform) -> Device:
    if isinstance(platform, Platform):
        return Device.from_str(platform.device)
    device_type = px.device().type if platform.device == "auto" else platform.device
    return Device.GPU if device_type == "cuda" else Device.CPU


def set_device(local_rank: int, platform: Platform | px.Platform) -> None:
    """DDPW 5.5's `set_device`: make this rank's GPU the current CUDA device; nothing on CPU and MPS.

    The GPU is the one `to` moves to and phalanx computes on, `local_rank % visible GPUs`.
    phalanx has already made it current in each rank it starts; the call keeps DDPW code as
    it is. Without a GPU, a GPU or SLURM platform raises `PlatformError`.

    Example::

        def train(*args, **kwargs):
            set_device(kwargs["local_rank"], kwargs["platform"])
    """
    kind = _device_kind(platform)
    if kind in (Device.GPU, Device.SLURM):
        torch.cuda.set_device(_target_device(kind, local_rank))


# `from ddpw import functional as DF` becomes `from phalanx.compat.ddpw import functional as DF`.
functional = sys.modules[__name__]
