"""pyTAGI's `pytagi.nn.ddp` on phalanx, for torch models: replace the import, keep the loop.

    from phalanx.compat.pytagi import DDPConfig, DDPSequential      # was: from pytagi.nn import ...

    config = DDPConfig(device_ids=[0, 1], backend="nccl", rank=rank, world_size=world_size)
    ddp_model = DDPSequential(torch.nn.Sequential(...), config, average=True)
    ddp_model.train()
    for x, y in loader:
        m_pred, v_pred = ddp_model(x)                                  # forward: numpy arrays back
        ddp_model.backward(loss_fn(ddp_model.output_z_buffer, y))       # gradients, synchronised
        ddp_model.step()                                                 # optimizer step

TAGI updates weights in closed form from output "deltas"; torch trains with gradients and an
optimizer. The mapping: `forward` keeps the output tensor (`output_z_buffer`), `backward`
takes a loss, or the gradient of one with respect to the output (`input_delta_z_buffer`), and
averages (or sums, `average=False`) the gradients over the ranks through DDP; `step` runs the
optimizer (SGD with lr=0.01 unless one is given). Variances: a torch network is deterministic,
so the output variance is zero. The processes meet through `px.launch` (see
`phalanx.compat._process_group`): under mpirun, inside a launch, or started by hand, where
the config's place becomes `Platform(environment=Explicit(rank, world_size))`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

import phalanx as px
from phalanx.compat._process_group import before_leaving, join

__all__ = ["DDPConfig", "DDPSequential"]

_DEFAULT_LEARNING_RATE = 0.01

OptimizerSpec = torch.optim.Optimizer | Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer] | None


class DDPConfig:
    """Where this process stands and how the ranks talk: pyTAGI's names, on phalanx.

    `device` (phalanx's addition) is "cuda" or "cpu"; by default "cuda" for backend "nccl",
    "cpu" otherwise. nccl has no CPU transport: with device="cpu" the gloo backend is used.
    """

    def __init__(
        self,
        device_ids: list[int],
        backend: str = "nccl",
        rank: int = 0,
        world_size: int = 1,
        *,
        device: str | None = None,
    ) -> None:
        self.device_ids = list(device_ids)
        self.backend = backend
        self.rank = rank
        self.world_size = world_size
        self.device = device or ("cuda" if backend == "nccl" else "cpu")

    def __repr__(self) -> str:
        return (
            f"DDPConfig(device_ids={self.device_ids!r}, backend={self.backend!r}, rank={self.rank!r}, "
            f"world_size={self.world_size!r}, device={self.device!r})"
        )

    def _platform(self) -> px.Platform:
        backend = "gloo" if self.device == "cpu" and self.backend == "nccl" else self.backend
        return px.Platform(device=self.device, backend=backend)


def _make_optimizer(optimizer: OptimizerSpec, model: torch.nn.Module) -> torch.optim.Optimizer:
    if optimizer is None:
        return torch.optim.SGD(model.parameters(), lr=_DEFAULT_LEARNING_RATE)
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    if callable(optimizer):
        return optimizer(model.parameters())
    raise TypeError(
        f"DDPSequential(optimizer={optimizer!r}): give a torch optimizer, a function of the parameters "
        "that makes one, or None for SGD(lr=0.01)"
    )


class DDPSequential:
    """A torch model trained with DDP across the ranks of `config`, with pyTAGI's members.

    `model` is any `torch.nn.Module` (pyTAGI's is a `Sequential`); it stays the object that
    holds the trained weights. `optimizer` (phalanx's addition) is a torch optimizer, or a
    function of the parameters that makes one; by default SGD with lr=0.01.
    """

    def __init__(
        self, model: torch.nn.Module, config: DDPConfig, average: bool = True, *, optimizer: OptimizerSpec = None
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"DDPSequential needs a torch.nn.Module (e.g. torch.nn.Sequential), got {type(model)}")
        stated = f"DDPConfig(rank={config.rank!r}, world_size={config.world_size!r})"
        join(config.rank, config.world_size, config._platform, stated)
        self.model = model
        self.config = config
        self.average = average
        self._check_device_ids()
        self._parallel = px.prepare_model(model)  # DDP when the world is larger than one
        before_leaving(self._drop_parallel)
        self.optimizer = _make_optimizer(optimizer, model)
        self._output: torch.Tensor | None = None
        self._host: tuple[np.ndarray, np.ndarray] | None = None
        self._delta: torch.Tensor | None = None

    def _check_device_ids(self) -> None:
        """pyTAGI puts rank r on cuda:device_ids[r]; phalanx on cuda:(local rank % GPUs): they must agree."""
        here = px.device()
        if here.type != "cuda" or len(self.config.device_ids) <= self.config.rank:
            return
        wanted = self.config.device_ids[self.config.rank]
        if wanted != here.index:
            raise px.PhalanxError(
                f"DDPConfig(device_ids={self.config.device_ids}) puts rank {self.config.rank} on cuda:{wanted}, "
                f"but phalanx placed it on {here} (local rank modulo the visible GPUs). Use device_ids "
                "[local rank % GPU count], or choose the GPUs with CUDA_VISIBLE_DEVICES."
            )

    def _drop_parallel(self) -> None:
        self._parallel = self.model

    # -- buffers ------------------------------------------------------------------------------

    @property
    def output_z_buffer(self) -> torch.Tensor:
        """The output tensor of the last forward pass, still attached to its autograd graph."""
        if self._output is None:
            raise RuntimeError("DDPSequential.output_z_buffer: no forward pass yet; call ddp_model(x) first")
        return self._output

    @output_z_buffer.setter
    def output_z_buffer(self, value: torch.Tensor) -> None:
        self._output = value
        self._delta = None
        self.output_to_host()

    @property
    def input_delta_z_buffer(self) -> torch.Tensor | None:
        """The gradient of the loss with respect to the output, that `backward()` pushes through the model.

        torch's sign: a gradient, the opposite of TAGI's delta (the change the output should make).
        """
        return self._delta

    @input_delta_z_buffer.setter
    def input_delta_z_buffer(self, value: Any) -> None:
        output = self.output_z_buffer
        delta = torch.as_tensor(value, dtype=output.dtype, device=output.device)
        if delta.numel() != output.numel():
            raise ValueError(
                f"DDPSequential.input_delta_z_buffer: {delta.numel()} values for an output of shape "
                f"{tuple(output.shape)}; give one gradient per output value"
            )
        self._delta = delta.reshape(output.shape)

    # -- passes -------------------------------------------------------------------------------

    def __call__(self, mu_x: Any, var_x: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """The forward pass: (mean, variance) of the output, as numpy arrays."""
        return self.forward(mu_x, var_x)

    def forward(self, mu_x: Any, var_x: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """Run the local replica on `mu_x` (numpy array or tensor, batch first); returns (mean, variance).

        `var_x` must be None or zero: a torch network takes points, not distributions. In
        training mode the output keeps its graph for `backward`; in eval mode no graph is built.
        """
        if var_x is not None and np.any(np.asarray(var_x) != 0):
            raise ValueError(
                "DDPSequential.forward(var_x=...): a torch model takes no input variance. Pass var_x=None, "
                "or add the noise to mu_x yourself (e.g. sampling) if the variance matters."
            )
        x = torch.as_tensor(mu_x, device=px.device())
        parameter = next(self.model.parameters(), None)
        if x.is_floating_point() and parameter is not None and x.dtype != parameter.dtype:
            x = x.to(parameter.dtype)  # numpy's float64 into a float32 model
        with torch.set_grad_enabled(self._parallel.training):
            self._output = self._parallel(x)
        self._delta = None
        self.output_to_host()
        return self.get_outputs()

    def backward(self, loss: torch.Tensor | None = None) -> None:
        """Compute the gradients and synchronise them over the ranks (mean, or sum when average=False).

        Give a `loss` of the last forward's output, or set `input_delta_z_buffer` to the
        gradient of your loss with respect to the output first.
        """
        output = self.output_z_buffer
        if not output.requires_grad:
            raise RuntimeError("DDPSequential.backward: the last forward ran in eval mode; call train() first")
        # DDP averages over the ranks; scaling the seed by the world size turns that mean into a sum.
        scale = 1.0 if self.average else float(px.get_world_size())
        if loss is not None:
            (loss * scale).backward()
        elif self._delta is not None:
            output.backward(self._delta * scale)
        else:
            raise RuntimeError(
                "DDPSequential.backward(): pass the loss, backward(loss), or set input_delta_z_buffer to the "
                "gradient of the loss with respect to output_z_buffer"
            )
        self._delta = None

    def step(self) -> None:
        """Update the parameters from the synchronised gradients (the optimizer's step), then clear them."""
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    # -- modes and helpers --------------------------------------------------------------------

    def train(self) -> None:
        """Training mode: forward passes keep their graph for `backward`."""
        self._parallel.train()

    def eval(self) -> None:
        """Evaluation mode: torch's eval(), and forward passes build no graph."""
        self._parallel.eval()

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        px.barrier()

    def get_outputs(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean, variance) of the last forward's output, on the host; the variance is zeros."""
        if self._host is None:
            raise RuntimeError("DDPSequential.get_outputs: no forward pass yet; call ddp_model(x) first")
        return self._host

    def output_to_host(self) -> None:
        """Copy the last output to host memory (forward does it already; kept for pyTAGI's scripts)."""
        if self._output is None:
            return
        mean = self._output.detach().to("cpu").numpy()
        self._host = (mean, np.zeros_like(mean))

    def get_device_with_index(self) -> str:
        """This rank's device, e.g. "cuda:0", or "cpu"."""
        return str(px.device())
