"""Training helpers: batches and models on the rank's device, DDP, sharded resumable loading."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from phalanx import dist as ranks
from phalanx.errors import PhalanxError

__all__ = ["ShardedLoader", "dataloader", "prepare_model", "to_device", "unwrap_model"]


def to_device(obj: Any, device: torch.device | str | None = None, non_blocking: bool | None = None) -> Any:
    """Move every tensor inside `obj` to `device` (default: this rank's device).

    Tensors nested in lists, tuples, named tuples, dicts and dataclasses are moved; the
    containers are rebuilt with the same types; anything else is returned untouched.
    `non_blocking` defaults to True for pinned tensors going to an accelerator.

    Example::

        x, y = px.to_device(batch)            # in a rank: to cuda:LOCAL_RANK, or cpu
    """
    target = torch.device(device) if device is not None else ranks.device()
    return _move(obj, target, non_blocking)


def _move(obj: Any, target: torch.device, non_blocking: bool | None) -> Any:
    if isinstance(obj, torch.Tensor):
        asynchronous = non_blocking if non_blocking is not None else target.type != "cpu" and obj.is_pinned()
        return obj.to(target, non_blocking=asynchronous)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a named tuple
        return type(obj)(*(_move(item, target, non_blocking) for item in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_move(item, target, non_blocking) for item in obj)
    if isinstance(obj, Mapping):
        moved = {key: _move(value, target, non_blocking) for key, value in obj.items()}
        try:
            return type(obj)(moved)
        except TypeError:  # a mapping type that cannot be built from a dict (defaultdict, ...)
            rebuilt = copy.copy(obj)
            rebuilt.update(moved)
            return rebuilt
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        rebuilt = copy.copy(obj)
        for field in dataclasses.fields(obj):
            object.__setattr__(rebuilt, field.name, _move(getattr(obj, field.name), target, non_blocking))
        return rebuilt
    return obj


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DistributedDataParallel wrapper (the module itself otherwise)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def prepare_model(model: torch.nn.Module, **ddp_kwargs: Any) -> torch.nn.Module:
    """Move `model` to this rank's device and wrap it in DistributedDataParallel when distributed.

    A model already wrapped is returned as it is. A model without trainable parameters is
    only moved: DDP has nothing to synchronise for it. `ddp_kwargs` go to DDP
    (`device_ids` defaults to this rank's GPU on cuda).

    Example::

        model = px.prepare_model(Net())      # DDP on 2 ranks, the plain module on 1
    """
    if isinstance(model, DistributedDataParallel):
        return model
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"prepare_model() needs a torch.nn.Module, got {type(model).__name__}")
    target = ranks.device()
    model = model.to(target)
    if not ranks.is_distributed() or not any(p.requires_grad for p in model.parameters()):
        return model
    if target.type == "cuda":
        ddp_kwargs.setdefault("device_ids", [target.index])
    return DistributedDataParallel(model, **ddp_kwargs)


class _ResumableSampler(DistributedSampler):
    """DistributedSampler that can start a pass part-way, for an exact resume mid-epoch."""

    start_index = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.start_index :])

    def __len__(self) -> int:
        return max(0, super().__len__() - self.start_index)


class ShardedLoader:
    """This rank's shard of a dataset, in batches on the rank's device, that knows its position.

    Every pass (every `for batch in loader`) is a new epoch: the shuffle order changes
    (`set_epoch` is called for you) and is the same on every rank. `state_dict()` records the
    epoch and the batches consumed, so that a `Context` restores the loader mid-epoch.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        shuffle: bool,
        seed: int,
        drop_last: bool,
        device: torch.device | str | None,
        loader_kwargs: dict[str, Any],
    ) -> None:
        if "sampler" in loader_kwargs or "batch_sampler" in loader_kwargs:
            raise ValueError("dataloader() makes its own sampler: pass shuffle/seed/drop_last instead of a sampler")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.device = torch.device(device) if device is not None else ranks.device()
        self.sampler = _ResumableSampler(
            dataset,
            num_replicas=ranks.get_world_size(),
            rank=ranks.get_rank(),
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
        )
        # Its own generator: building an iterator then never draws from the global RNG, so a
        # run resumed mid-epoch draws the same random numbers as a run never stopped.
        self._generator = torch.Generator()
        loader_kwargs.setdefault("pin_memory", self.device.type == "cuda")
        self.loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=self.sampler,
            drop_last=drop_last,
            generator=self._generator,
            **loader_kwargs,
        )
        self.epoch = 0
        self.batches = 0
        self._in_pass = False
        self._resuming = False
        self._checked = False

    def __len__(self) -> int:
        """Batches in a whole pass over this rank's shard."""
        full = len(self.sampler) + self.sampler.start_index
        return full // self.batch_size if self.loader.drop_last else -(-full // self.batch_size)

    def __iter__(self) -> Iterator[Any]:
        if not self._checked:
            self._check_ranks_agree()
        if self._resuming:
            self._resuming = False
        elif self._in_pass:  # the last pass was left part-way: this is a new epoch
            self.epoch += 1
            self.batches = 0
        self._in_pass = True
        self.sampler.set_epoch(self.epoch)
        self.sampler.start_index = self.batches * self.batch_size
        self._generator.manual_seed(self.seed * 1_000_003 + self.epoch)
        return self._pass()

    def _pass(self) -> Iterator[Any]:
        for batch in self.loader:
            self.batches += 1
            yield to_device(batch, self.device)
        self._in_pass = False
        self.epoch += 1
        self.batches = 0

    def _check_ranks_agree(self) -> None:
        """Every rank must shuffle with the same seed over the same data, or shards overlap."""
        self._checked = True
        if not ranks.is_distributed():
            return
        mine = {"seed": self.seed, "shuffle": self.shuffle, "size": len(self.dataset), "batch_size": self.batch_size}
        everyone = ranks.all_gather(mine)
        for key in mine:
            values = [view[key] for view in everyone]
            if len(set(values)) > 1:
                by_rank = ", ".join(f"rank {rank}: {key}={value!r}" for rank, value in enumerate(values))
                raise PhalanxError(
                    f"dataloader(): the ranks disagree on {key} ({by_rank}). Every rank must pass the same "
                    f"{key}, or the shards overlap and some samples are never seen; pass seed=... explicitly "
                    "with a value that does not depend on the rank."
                )

    def state_dict(self) -> dict[str, int]:
        """The position: the epoch in progress and the batches of it already consumed."""
        return {"epoch": self.epoch, "batches": self.batches}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Continue from `state`: the next pass resumes that epoch after the consumed batches.

        A state that is not a position (`{"epoch": e, "batches": b}`, whole numbers >= 0) raises
        `ValueError` and changes nothing.
        """
        problems = self._state_problems(state)
        if problems:
            raise ValueError(
                f"ShardedLoader.load_state_dict(): the position {'; '.join(problems)}. Pass what state_dict() "
                "returned, for example {'epoch': 0, 'batches': 0}."
            )
        self.epoch = int(state["epoch"])
        self.batches = int(state["batches"])
        self._in_pass = False
        self._resuming = True

    @staticmethod
    def _state_problems(state: Any) -> list[str]:
        """What keeps `state` from being a loader position; empty when it is one (`Context` checks with it)."""
        if not isinstance(state, Mapping):
            return [f"is of type {type(state).__name__}, expected a dict with 'epoch' and 'batches'"]
        problems = []
        for key in ("epoch", "batches"):
            value = state.get(key)
            if key not in state:
                problems.append(f"misses {key!r}")
            elif isinstance(value, bool) or not isinstance(value, int) or value < 0:
                problems.append(f"has {key}={value!r}, expected a whole number >= 0")
        return problems

    def to(self, device: torch.device | str) -> ShardedLoader:
        """Deliver batches on `device` from now on."""
        self.device = torch.device(device)
        return self


def dataloader(
    dataset: Dataset,
    batch_size: int = 1,
    shuffle: bool = False,
    *,
    seed: int = 0,
    drop_last: bool = False,
    device: torch.device | str | None = None,
    **loader_kwargs: Any,
) -> ShardedLoader:
    """A loader over this rank's shard of `dataset`, with batches on the rank's device.

    The shards are disjoint and of equal length on every rank (the last one is padded with
    repeated samples; with `drop_last=True` the tail that does not divide evenly is dropped
    instead, and so is an incomplete last batch), so that no rank waits for another at the
    end of an epoch. With `shuffle=True` every pass has a new order, the same on every rank: the first
    pass checks that every rank passed the same `seed` and raises an error naming the ranks
    that disagree. Other keyword arguments go to `torch.utils.data.DataLoader`.

    Example::

        loader = px.dataloader(dataset, batch_size=64, shuffle=True)
        for x, y in loader:                  # x, y already on px.device()
            ...
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"dataloader(batch_size={batch_size!r}): it must be a whole number of at least 1")
    return ShardedLoader(dataset, batch_size, shuffle, seed, drop_last, device, dict(loader_kwargs))
