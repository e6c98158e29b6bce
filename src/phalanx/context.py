"""`Context`: a training session's state in one object, checkpointed and restored exactly.

Register models, optimizers, schedulers, scalers, loaders, recorders and plain counters as
attributes. `save(path)` writes one file (the master writes, atomically; every rank waits)
holding all of it plus every rank's random number generator states and every loader's
position, so that a run resumed with `load(path)` continues exactly as if never stopped,
even mid-epoch. Loading runs no code from the file (`weights_only=True`).
"""

from __future__ import annotations

import atexit
import collections
import copy
import glob
import os
import pickle
import random
import re
import stat
import sys
import threading
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch.torch_version import TorchVersion

from phalanx import dist as ranks
from phalanx.errors import CheckpointError
from phalanx.files import create_exclusive, temporary_beside
from phalanx.rank_state import on_rank_finish
from phalanx.training import ShardedLoader, prepare_model, unwrap_model

__all__ = [
    "Context",
    "read_checkpoint",
    "read_weights_only",
    "rng_state",
    "set_rng_state",
    "wait_for_saves",
    "write_atomically",
    "written_by_context",
]

_META = "__phalanx__"
_FORMAT_VERSION = 1
_PLAIN = (int, float, bool, str, bytes, type(None), torch.Tensor)


def _is_plain(value: Any) -> bool:
    """Values a weights-only load can restore: numbers, strings, tensors and containers of them."""
    if isinstance(value, _PLAIN):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain(item) for item in value)
    if isinstance(value, dict):
        return all(isinstance(key, (str, int)) and _is_plain(item) for key, item in value.items())
    return False


def _is_stateful(value: Any) -> bool:
    return callable(getattr(value, "state_dict", None)) and callable(getattr(value, "load_state_dict", None))


# -- random number generators ------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """This process's generator states, as values a weights-only load accepts."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy
    except ImportError:
        pass
    else:
        kind, keys, position, has_gauss, cached = numpy.random.get_state()
        state["numpy"] = {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype("int64")),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` recorded."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy

        saved = state["numpy"]
        keys = saved["keys"].numpy().astype("uint32")
        numpy.random.set_state((saved["kind"], keys, saved["position"], saved["has_gauss"], saved["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- files --------------------------------------------------------------------------------------


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_in_flight: threading.Thread | None = None  # the master's last durable save, finishing in the background
_in_flight_failure: tuple[Path, str, CheckpointError] | None = None  # its path, the reason, the error


def _join_in_flight() -> tuple[Path, str, CheckpointError] | None:
    """Wait for the background save, if any; return (and forget) how it failed, if it did."""
    global _in_flight, _in_flight_failure
    if _in_flight is not None:
        _in_flight.join()
        _in_flight = None
    failure, _in_flight_failure = _in_flight_failure, None
    return failure


def wait_for_saves() -> None:
    """Block until the last `Context.save` is on disk and in place; raise its error if it failed.

    The next `save` and `load`, the end of a launched rank and the end of the interpreter call
    it, so a checkpoint is never left in flight.
    """
    failure = _join_in_flight()
    if failure is not None:
        raise failure[2]


def _report_unwritten_checkpoint_at_exit() -> None:
    """At interpreter exit: a background save that failed, and that nothing waited for, fails the program.

    An exception in an exit handler is printed as "Exception ignored in atexit callback" and the
    exit code stays 0, as if the checkpoint were on disk. Instead this prints one line and exits
    with code 1. The exit code is already decided when exit handlers run, so only `os._exit` can
    change it: the exit handlers registered before phalanx was imported, and the interpreter's
    own last clean-up, are skipped (the standard streams and logging are flushed first).
    """
    failure = _join_in_flight()
    if failure is None:
        return
    path, reason, _ = failure
    print(
        f"phalanx: checkpoint {path} was not written: {reason} (a previous checkpoint there is unchanged; "
        "call ctx.wait() before the program ends to get this as a CheckpointError)",
        file=sys.stderr,
    )
    if "logging" in sys.modules:
        sys.modules["logging"].shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass
    os._exit(1)


def _remove(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _remove_stale_temporaries(path: Path) -> None:
    """Remove the temporary files an earlier crash left beside `path`: this user's only, never followed."""
    uid = os.getuid() if hasattr(os, "getuid") else None
    for stale in glob.glob(glob.escape(str(path.parent / f".{path.name}.tmp-")) + "*"):
        try:
            info = os.lstat(stale)
        except OSError:
            continue
        if uid is None or info.st_uid == uid:  # unlink removes a link itself, not what it points to
            _remove(Path(stale))


def _is_directory(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)  # a link to a folder is replaced like a file
    except OSError:
        return False


def _cannot_write(path: Path, reason: object) -> CheckpointError:
    return CheckpointError(f"cannot write checkpoint {path}: {reason}; the previous file is unchanged")


def _put_in_place(fd: int, temporary: Path, path: Path, durable: bool) -> None:
    """fsync the written file (when durable) and close it, rename it over `path`, fsync the directory.

    The fsync goes through the descriptor the data was written to: the temporary is never
    opened again by name, so nothing put at that name meanwhile is flushed or followed.
    """
    try:
        try:
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except OSError as error:
        _remove(temporary)
        raise _cannot_write(path, error) from error
    if durable:
        _fsync_directory(path.parent)


def _put_in_place_in_background(fd: int, temporary: Path, path: Path, durable: bool) -> None:
    global _in_flight_failure
    try:
        _put_in_place(fd, temporary, path, durable)
    except CheckpointError as error:
        reason = error.__cause__ if error.__cause__ is not None else error
        _in_flight_failure = (path, str(reason), error)


def write_atomically(state: dict[str, Any], path: Path, durable: bool = True, background: bool = False) -> None:
    """Write `state` to `path` so that a crash at any instant leaves the old file or the new one.

    The data goes to a temporary file in the same directory and is renamed over `path` (a
    rename within a file system is atomic), so a process that dies mid-save never leaves half
    a file. With `durable`, the data is also flushed to disk (fsync) before the rename, so
    that a power loss cannot leave a renamed but incomplete file either. With `background`,
    the fsync and the rename happen in a thread and this returns once the bytes are written:
    the disk works while training goes on (`wait_for_saves` joins it). The rename goes there
    even without the fsync: renaming over the previous file makes ext4 start writing the new
    one back at once (its `auto_da_alloc`), which took 3 times as long as the write itself. Temporary
    files that an earlier crash left behind are removed.

    The temporary file has an unguessable name and is created with O_EXCL|O_NOFOLLOW, so a
    link that someone who can write the folder put in its place is never written through: the
    save fails with a `CheckpointError` instead. It gets the user's umask (checkpoints are the
    user's data, not phalanx's private files).
    """
    global _in_flight
    wait_for_saves()
    if _is_directory(path):
        raise CheckpointError(
            f"cannot write checkpoint {path}: it is a directory. Pass the path of a file inside it, "
            f"for example {path / 'ckpt.pt'}"
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise _cannot_write(path, error) from error
    _remove_stale_temporaries(path)
    temporary = temporary_beside(path)
    try:
        fd = create_exclusive(temporary, 0o666)
    except FileExistsError as error:
        raise CheckpointError(
            f"cannot write checkpoint {path}: its temporary file {temporary} already exists (a link or a file "
            "put there by someone who can write that folder?). Nothing was written through it and the "
            "previous file is unchanged; keep checkpoints in a folder only you can write."
        ) from error
    except OSError as error:
        raise _cannot_write(path, error) from error
    try:
        with os.fdopen(fd, "wb", closefd=False) as file:
            torch.save(state, file)
    except BaseException as error:
        os.close(fd)
        _remove(temporary)
        if isinstance(error, (OSError, RuntimeError)):  # torch reports a full disk as a RuntimeError
            raise _cannot_write(path, error) from error
        raise
    if background:
        _in_flight = threading.Thread(
            target=_put_in_place_in_background, args=(fd, temporary, path, durable), name="phalanx-checkpoint"
        )
        _in_flight.start()
    else:
        _put_in_place(fd, temporary, path, durable)


on_rank_finish(wait_for_saves)
atexit.register(_report_unwritten_checkpoint_at_exit)

_SAFE_TORCH = "2.6"  # before it, weights_only=True could be made to run code (CVE-2025-32434)


def _torch_loads_weights_only_safely() -> bool:
    """True when this torch's `torch.load(weights_only=True)` cannot be made to run code."""
    return TorchVersion(torch.__version__) >= _SAFE_TORCH


def read_weights_only(path: Path) -> Any:
    """Load any file `torch.save` wrote, onto the CPU, without running code from it.

    Every bad file raises a `CheckpointError` that says what is wrong: missing, a directory,
    truncated or corrupt, or holding objects only running code could rebuild (and any file,
    under a torch whose `weights_only=True` could be made to run code).
    """
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not _torch_loads_weights_only_safely():
        raise CheckpointError(
            f"checkpoint {path} was not loaded: this is torch {torch.__version__}, and before torch {_SAFE_TORCH} "
            "a checkpoint could run code even through torch.load(weights_only=True) (CVE-2025-32434). "
            f"Install torch>={_SAFE_TORCH} to load checkpoints."
        )
    if path.is_dir():
        raise CheckpointError(
            f"checkpoint {path} is a directory, not a checkpoint file: pass the path of the file that "
            f"Context.save wrote, for example {path / 'ckpt.pt'}"
        )
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; a cut or damaged one is not
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt: it is not a complete file written by torch.save. "
            "Nothing was loaded; use an earlier checkpoint."
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        code = re.search(r"GLOBAL (\S+)", str(error))
        if code is None:
            raise CheckpointError(
                f"checkpoint {path} is corrupt and cannot be read ({str(error).splitlines()[0][:200]}). "
                "Nothing was loaded; use an earlier checkpoint."
            ) from error
        raise CheckpointError(
            f"checkpoint {path} was refused: it holds {code.group(1)}, which only running code could rebuild. "
            "phalanx loads checkpoints with weights_only=True and runs nothing from them; save plain values, "
            "tensors and state_dicts instead."
        ) from error
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as error:
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt and cannot be read ({type(error).__name__}: "
            f"{str(error)[:200]}). Nothing was loaded; use an earlier checkpoint."
        ) from error
    return state


def written_by_context(state: Any) -> bool:
    """True when `state` is what `Context.state_dict` returns: it has phalanx's own entry."""
    return isinstance(state, Mapping) and _META in state


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load a `Context` checkpoint without running any code from it; clear errors for every bad file."""
    state = read_weights_only(path)
    if not isinstance(state, dict) or not written_by_context(state):
        raise CheckpointError(f"{path} is not a phalanx Context checkpoint (no {_META} entry)")
    return state


# -- the context --------------------------------------------------------------------------------


class Context:
    """Holds a training session's models, optimizers, loaders and counters; saves and restores them.

    Example::

        ctx = px.Context(model=model, optimizer=opt, loader=loader, epoch=0)
        ctx.load("ckpt.pt", missing_ok=True)      # exact resume, even mid-epoch
        while ctx.epoch < epochs:
            for x, y in ctx.loader:
                ...
            ctx.epoch += 1
            ctx.save("ckpt.pt")
    """

    def __init__(self, **entries: Any) -> None:
        for name, value in entries.items():
            setattr(self, name, value)

    def _entries(self) -> Iterator[tuple[str, Any]]:
        for name, value in vars(self).items():
            if not name.startswith("_"):
                yield name, value

    def __repr__(self) -> str:
        names = ", ".join(f"{name}={type(value).__name__}" for name, value in self._entries())
        return f"Context({names})"

    # -- state ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Every registered object's state and plain value, with this rank's generator states.

        Models are saved without their DDP wrapper, so a checkpoint loads into a wrapped or a
        plain model alike. Objects that have no state_dict and are not plain values (a loss
        function object, a lambda) are not saved.
        """
        state: dict[str, Any] = {}
        for name, value in self._entries():
            if _is_stateful(value):
                target = unwrap_model(value) if isinstance(value, torch.nn.Module) else value
                state[name] = target.state_dict()
            elif _is_plain(value):
                state[name] = value
        state[_META] = {"version": _FORMAT_VERSION, "world_size": ranks.get_world_size(), "rng": rng_state()}
        return state

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> None:
        """Restore what `state_dict` (or a checkpoint) holds: all of it, or nothing.

        Every entry is checked before anything changes: models (keys, shapes, tensors),
        optimizers (groups, parameters, state shapes), loaders (position), plain values (their
        kind), and that no state is None where one is needed. An object that still refuses its
        state while loading puts everything back as it was (a copy of what it replaces is kept,
        models' on the CPU). A refused state raises `CheckpointError` and changes nothing.
        `strict=False` leaves registered objects that `state` has no entry for as they are
        (instead of refusing the state).
        """
        if not isinstance(state, Mapping):
            raise CheckpointError(
                f"a Context state is a dict of entries by name, as state_dict() returns; got a {type(state).__name__}"
            )
        self._check_compatible(state, strict)
        meta = state.get(_META, {})
        registered = dict(self._entries())
        stateful = [(name, value) for name, value in registered.items() if _is_stateful(value) and name in state]
        stateful.sort(key=lambda entry: not isinstance(entry[1], torch.nn.Module))  # models first, as before
        plain = {
            name: value
            for name, value in state.items()
            if name != _META and not _is_stateful(registered.get(name)) and not _keeps_object(registered, name, value)
        }
        rng = meta.get("rng") if isinstance(meta, Mapping) else None
        if isinstance(rng, list):  # a checkpoint holds every rank's states
            rng = rng[ranks.get_rank()] if len(rng) == ranks.get_world_size() else None
        undo: list[tuple[str, Callable[[], None]]] = []
        step = ""
        try:
            for name, value in stateful:
                step = repr(name)
                target = unwrap_model(value) if isinstance(value, torch.nn.Module) else value
                undo.append((step, _keep(target)))
                target.load_state_dict(state[name])
            for name, value in plain.items():
                step = repr(name)
                undo.append((step, self._keep_attribute(name)))
                setattr(self, name, value)
            if rng is not None:
                step = "the random number generator states"
                undo.append((step, _keep_rng()))
                set_rng_state(rng)
        except Exception as error:
            unrestored = _undo(undo)
            message = (
                f"the checkpoint does not fit this Context, nothing was loaded: loading {step} failed "
                f"({type(error).__name__}: {str(error)[:300]}), and what was loaded before it was put back"
            )
            if unrestored:
                message += "; putting back " + ", ".join(unrestored) + " failed, so those may have changed"
            raise CheckpointError(message) from error

    def _keep_attribute(self, name: str) -> Callable[[], None]:
        previous = vars(self).get(name, _ABSENT)

        def put_back() -> None:
            if previous is _ABSENT:
                vars(self).pop(name, None)
            else:
                setattr(self, name, previous)

        return put_back

    def _check_compatible(self, state: Mapping[str, Any], strict: bool = True) -> None:
        problems = []
        for name, value in self._entries():
            if name not in state:
                if strict and _is_stateful(value):
                    problems.append(f"{name!r} is registered here but not in the checkpoint")
                continue
            problems += _entry_problems(name, value, state[name])
        if problems:
            raise CheckpointError(
                "the checkpoint does not fit this Context, nothing was loaded: " + "; ".join(problems[:10])
            )

    # -- files ------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike, durable: bool = True, wait: bool = False) -> None:
        """Write a checkpoint: every rank calls it; the master writes one file atomically; all wait.

        The file holds every rank's generator states and every loader's position. A process
        killed mid-save leaves the previous checkpoint. `durable=True` (the default) flushes the
        file to disk before it replaces `path`, so that a power loss cannot corrupt it either.
        That flush happens in the background: `save` returns once the state is written, and the
        next `save` or `load`, the end of the rank and the end of the program wait for it (a
        failure there raises `CheckpointError` at that point; at the end of the program it is
        reported in one line on stderr and the exit code is 1). `wait=True` returns only when the
        file is on disk and in place. `durable=False` skips the flush; the file still replaces
        `path` in the background, as above. A `path` that is a directory raises
        `CheckpointError` at once, on every rank.
        """
        path = Path(path)
        state = self.state_dict()
        everyone = ranks.all_gather(state[_META]["rng"]) if ranks.is_distributed() else [state[_META]["rng"]]
        state[_META]["rng"] = everyone
        error = None
        if ranks.is_master():
            try:
                write_atomically(state, path, durable, background=not wait)
                if wait:
                    wait_for_saves()
            except CheckpointError as failure:
                error = str(failure)
        error = ranks.broadcast_from_master(error)
        if error is not None:  # every rank raises, not only the master: no rank waits forever
            raise CheckpointError(error)

    def wait(self) -> None:
        """Block until the last `save` is on disk and in place (raises its `CheckpointError`)."""
        wait_for_saves()

    def load(self, path: str | os.PathLike, missing_ok: bool = False) -> bool:
        """Restore a checkpoint written by `save`; returns False if it is missing and `missing_ok`.

        Every rank reads the file itself and takes its own generator states from it.
        """
        path = Path(path)
        wait_for_saves()
        if not path.exists():
            if missing_ok:
                return False
            raise CheckpointError(f"checkpoint {path} does not exist (pass missing_ok=True to start afresh)")
        state = read_checkpoint(path)
        saved_world = state[_META].get("world_size")
        if saved_world != ranks.get_world_size():
            raise CheckpointError(
                f"checkpoint {path} was saved by {saved_world} ranks and this job has {ranks.get_world_size()}: "
                "an exact resume needs the same number of ranks. Load the model alone with "
                "torch.load(path, weights_only=True)[name] to change the world size."
            )
        self.load_state_dict(state)
        return True

    # -- placement --------------------------------------------------------------------------

    def to(self, device: torch.device | str) -> Context:
        """Move every registered model, optimizer state, tensor and loader to `device`."""
        device = torch.device(device)
        for name, value in self._entries():
            if isinstance(value, (torch.nn.Module, torch.Tensor)):
                setattr(self, name, value.to(device))
            elif isinstance(value, torch.optim.Optimizer):
                _move_optimizer_state(value, device)
            elif callable(getattr(value, "to", None)) and hasattr(value, "state_dict"):
                value.to(device)
        return self

    def cpu(self) -> Context:
        """Move everything to the CPU."""
        return self.to("cpu")

    def cuda(self) -> Context:
        """Move everything to this rank's GPU."""
        device = ranks.device()
        return self.to(device if device.type == "cuda" else torch.device("cuda"))

    def ddp(self, **ddp_kwargs: Any) -> Context:
        """Wrap every registered model with trainable parameters in DDP (when distributed).

        Create optimizers after this call, or over the parameters of the wrapped models.
        """
        for name, value in self._entries():
            if isinstance(value, torch.nn.Module) and any(p.requires_grad for p in value.parameters()):
                setattr(self, name, prepare_model(value, **ddp_kwargs))
        return self

    def apply(self, function: Callable[[str, Any], Any]) -> Context:
        """Replace each registered value by `function(name, value)`."""
        for name, value in list(self._entries()):
            setattr(self, name, function(name, value))
        return self


_ABSENT = object()

# Optimizer state entries that always have the shape of their parameter (torch's own
# optimizers); others (LBFGS's flat vectors, Adafactor's factored moments) are not checked.
_PARAM_SHAPED_STATE = frozenset(
    {"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "square_avg", "acc_delta", "sum", "exp_inf"}
    | {"grad_avg", "prev", "step_size", "ax"}
)


def _kind(value: Any) -> str:
    """A plain value's kind, for telling a checkpoint's value from the one registered here."""
    if isinstance(value, torch.Tensor):
        return "tensor"
    if isinstance(value, (bool, int, float)):
        return "number"
    if isinstance(value, (list, tuple)):
        return "list"
    return type(value).__name__


def _keeps_object(registered: dict[str, Any], name: str, saved: Any) -> bool:
    """True for None saved for an object `state_dict` does not save: nothing to restore, keep it."""
    value = registered.get(name, _ABSENT)
    return saved is None and value is not _ABSENT and not _is_stateful(value) and not _is_plain(value)


def _entry_problems(name: str, value: Any, saved: Any) -> list[str]:
    """What keeps `saved` from loading into `value`, registered as `name`; empty when it fits."""
    if _is_stateful(value):
        target = unwrap_model(value) if isinstance(value, torch.nn.Module) else value
        if saved is None:
            return [f"{name!r} ({type(target).__name__} here) needs its state, but the checkpoint holds None for it"]
        if isinstance(target, torch.nn.Module):
            return _module_mismatches(name, target, saved)
        if isinstance(target, torch.optim.Optimizer):
            return _optimizer_mismatches(name, target, saved)
        if isinstance(target, ShardedLoader):
            return [f"{name!r} {problem}" for problem in target._state_problems(saved)]
        if isinstance(target.state_dict(), Mapping) and not isinstance(saved, Mapping):
            return [
                f"{name!r} ({type(target).__name__} here) has a dict for its state, but the checkpoint holds a value "
                f"of type {type(saved).__name__}"
            ]
        return []
    if _is_plain(value):
        if value is None or saved is None or _kind(value) == _kind(saved):
            return []
        here, there = type(value).__name__, type(saved).__name__
        return [f"{name!r} is of type {here} here, but the checkpoint holds a value of type {there}"]
    if saved is None:
        return []
    return [
        f"{name!r} ({type(value).__name__} here) is not restored from checkpoints (it has no state_dict), but the "
        f"checkpoint holds a value of type {type(saved).__name__} for it"
    ]


def _module_mismatches(name: str, module: torch.nn.Module, saved: Any) -> list[str]:
    if not isinstance(saved, Mapping):
        return [f"{name!r} is a module here, but the checkpoint holds a value of type {type(saved).__name__}"]
    current = module.state_dict()
    problems = []
    missing = sorted(set(current) - set(saved))
    unexpected = sorted(set(saved) - set(current))
    if missing:
        problems.append(f"{name!r} misses {missing[:3]} in the checkpoint")
    if unexpected:
        problems.append(f"{name!r} has unexpected entries {unexpected[:3]} in the checkpoint")
    for key in sorted(set(current) & set(saved)):
        if not isinstance(current[key], torch.Tensor):  # a module's extra state: any value
            continue
        if not isinstance(saved[key], torch.Tensor):
            # torch would copy every other tensor first and raise only at the end
            problems.append(f"{name}.{key} is of type {type(saved[key]).__name__} in the checkpoint, expected a tensor")
        elif saved[key].shape != current[key].shape:
            problems.append(f"{name}.{key} has shape {tuple(saved[key].shape)}, expected {tuple(current[key].shape)}")
    return problems


def _optimizer_mismatches(name: str, optimizer: torch.optim.Optimizer, saved: Any) -> list[str]:
    if not isinstance(saved, Mapping):
        return [f"{name!r} is an optimizer here, but the checkpoint holds a value of type {type(saved).__name__}"]
    missing = [key for key in ("state", "param_groups") if key not in saved]
    if missing:
        return [f"{name!r} misses {missing} in the checkpoint"]
    groups, state = saved["param_groups"], saved["state"]
    if not isinstance(groups, (list, tuple)) or not all(
        isinstance(group, Mapping) and isinstance(group.get("params"), (list, tuple)) for group in groups
    ):
        return [f"{name!r} has param_groups in the checkpoint that are not a list of groups with their params"]
    if not isinstance(state, Mapping):
        return [f"{name!r} has a state of type {type(state).__name__} in the checkpoint, expected a dict"]
    saved_sizes = [len(group["params"]) for group in groups]
    sizes = [len(group["params"]) for group in optimizer.param_groups]
    if saved_sizes != sizes:
        return [f"{name!r} has parameter groups of sizes {saved_sizes} in the checkpoint, expected {sizes}"]
    # torch maps the saved parameter ids onto this optimizer's parameters in order
    parameters = {
        saved_id: parameter
        for saved_group, group in zip(groups, optimizer.param_groups, strict=True)
        for saved_id, parameter in zip(saved_group["params"], group["params"], strict=True)
    }
    problems = []
    for saved_id, entry in state.items():
        parameter = parameters.get(saved_id)
        if parameter is None:
            continue
        if not isinstance(entry, Mapping):
            problems.append(
                f"{name}.state[{saved_id}] is of type {type(entry).__name__} in the checkpoint, expected a dict"
            )
            continue
        for key, tensor in entry.items():
            if key in _PARAM_SHAPED_STATE and isinstance(tensor, torch.Tensor) and tensor.shape != parameter.shape:
                problems.append(
                    f"{name}.state[{saved_id}][{key!r}] has shape {tuple(tensor.shape)}, expected "
                    f"{tuple(parameter.shape)} (its parameter's)"
                )
    return problems


def _copy_to_cpu(value: Any) -> Any:
    """A copy of a state that no later load can change: tensors copied to the CPU, the rest deep-copied."""
    if isinstance(value, torch.Tensor):
        return value if value.is_meta else value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        copied = type(value)() if type(value) in (dict, collections.OrderedDict) else {}
        for key, item in value.items():
            copied[key] = _copy_to_cpu(item)
        if hasattr(value, "_metadata"):  # a module's state_dict: the versions its loading reads
            copied._metadata = copy.deepcopy(value._metadata)
        return copied
    if isinstance(value, list):
        return [_copy_to_cpu(item) for item in value]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_copy_to_cpu(item) for item in value)
    return copy.deepcopy(value)


def _keep(target: Any) -> Callable[[], None]:
    """Keep what puts `target` back as it is now; returns the function that does it."""
    if isinstance(target, torch.nn.Module):
        saved = _copy_to_cpu(target.state_dict())  # loading writes into the parameters themselves
        return lambda: target.load_state_dict(saved)
    # Loading may replace attributes (the optimizer's state, a loader's flags) or write into
    # them (a scaler's scale tensor): the attributes undo the one, the state the other. An
    # optimizer's loading replaces its state, never writes into it, so its attributes suffice.
    attributes = dict(vars(target)) if hasattr(target, "__dict__") else None
    saved = None if isinstance(target, torch.optim.Optimizer) else _copy_to_cpu(target.state_dict())

    def put_back() -> None:
        try:
            if saved is not None:
                target.load_state_dict(saved)
        finally:
            if attributes is not None:
                vars(target).clear()
                vars(target).update(attributes)

    return put_back


def _keep_rng() -> Callable[[], None]:
    saved = rng_state()
    return lambda: set_rng_state(saved)


def _undo(undo: list[tuple[str, Callable[[], None]]]) -> list[str]:
    """Run the put-backs, last first; return what could not be put back."""
    failed = []
    for step, put_back in reversed(undo):
        try:
            put_back()
        except Exception:
            failed.append(step)
    return failed


def _move_optimizer_state(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and key != "step":
                state[key] = value.to(device)
