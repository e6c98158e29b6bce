"""Parameter sweeps: every point of a grid runs as its own job on one device slot.

A slot is one GPU (one rank on it) or, on CPU, one process. As many points run at once as
there are slots; each point is a normal `launch` of one rank, so a failing point is reported
with its traceback and the others go on. With a `log_dir`, each finished point's result is
written there, and a second run with the same `log_dir` skips the points already done.

What a `log_dir` holds is read back only if this user wrote it: each finished point has a JSON
record (its parameters and the name of its value file) and a value file (cloudpickle, since a
value can be any object). Both are read through `phalanx.files.read_trusted`, so a file that
another user could have written or replaced is refused, unread, before any point runs: a
pickle from a stranger would run their code here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import queue
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import cloudpickle

from phalanx.errors import PhalanxError, SerializationError, UntrustedFileError
from phalanx.files import PRIVATE_MODE, check_trusted_folder, read_trusted, write_atomically
from phalanx.launch import run_job
from phalanx.platform import Platform

__all__ = ["SweepResult", "grid_points", "sweep"]


@dataclasses.dataclass
class SweepResult:
    """One point of a sweep: its parameters, and its value or its error."""

    params: dict[str, Any]
    value: Any = None
    error: PhalanxError | None = None  # WorkerError, or LaunchError if the point could not start
    skipped: bool = False  # True when the value was read back from an earlier run's log_dir

    @property
    def ok(self) -> bool:
        return self.error is None


def grid_points(grid: Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The points of a grid: a dict of lists (every combination) or a list of dicts (as given)."""
    if isinstance(grid, Mapping):
        names = list(grid)
        for name, values in grid.items():
            if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
                raise PhalanxError(f"sweep grid[{name!r}] must be a list of values, got {values!r}")
        return [dict(zip(names, combination, strict=True)) for combination in itertools.product(*grid.values())]
    points = [dict(point) for point in grid]
    if not all(isinstance(point, dict) for point in points):
        raise PhalanxError("a sweep grid is a dict of lists or a list of dicts")
    return points


def _point_key(params: dict[str, Any]) -> str:
    text = json.dumps(params, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


_RECORD_VERSION = 1
_PRIVATE_FOLDER_MODE = 0o700


def _points_folder(log_dir: str | os.PathLike) -> Path:
    """`log_dir/points`, created private; refused if another user could write either folder."""
    log_dir = Path(log_dir)
    log_dir.mkdir(mode=_PRIVATE_FOLDER_MODE, parents=True, exist_ok=True)
    folder = log_dir / "points"
    folder.mkdir(mode=_PRIVATE_FOLDER_MODE, exist_ok=True)
    check_trusted_folder(log_dir)  # whoever can write log_dir can put a folder of theirs at points
    check_trusted_folder(folder)
    return folder


def _read_finished(folder: Path, key: str) -> bytes | None:
    """The pickled value of a point an earlier run finished, or None; only files this user wrote.

    Nothing is unpickled here: the record is JSON, and the value's bytes are returned only once
    `read_trusted` accepted its file.
    """
    record_path = folder / f"{key}.json"
    if not os.path.lexists(record_path):  # lexists: a planted link is refused below, not skipped
        return None
    try:
        record = json.loads(read_trusted(record_path))
    except ValueError as error:  # UnicodeDecodeError too
        raise PhalanxError(
            f"sweep record {str(record_path)!r} is not valid JSON ({error}); remove it to run that point again"
        ) from error
    value_file = record.get("value_file") if isinstance(record, dict) else None
    if not isinstance(value_file, str) or Path(value_file).name != value_file or value_file in ("", ".", ".."):
        raise PhalanxError(
            f"sweep record {str(record_path)!r} names no value file in its folder ({value_file!r}); "
            "remove it to run that point again"
        )
    try:
        return read_trusted(folder / value_file)
    except FileNotFoundError as error:
        raise PhalanxError(
            f"sweep record {str(record_path)!r} names {value_file!r}, which is missing; "
            "remove the record to run that point again"
        ) from error


def _write_finished(folder: Path, key: str, params: dict[str, Any], value: Any) -> None:
    """The value first, then the record that says the point is done: a crash between reruns it."""
    value_file = f"{key}.pkl"
    write_atomically(folder / value_file, cloudpickle.dumps(value), mode=PRIVATE_MODE)
    record = {"version": _RECORD_VERSION, "params": params, "value_file": value_file}
    text = json.dumps(record, sort_keys=True, indent=1, default=repr)
    write_atomically(folder / f"{key}.json", text.encode(), mode=PRIVATE_MODE)


def _slots(platform: Platform) -> list[dict[str, str]]:
    """One environment override per slot: a GPU each for cuda, nothing to pin for CPU processes."""
    resolved = platform.resolve()
    if resolved.device == "cuda":
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        gpus = visible.split(",") if visible else [str(index) for index in range(resolved.n_procs)]
        return [{"CUDA_VISIBLE_DEVICES": gpu} for gpu in gpus[: resolved.n_procs]]
    return [{} for _ in range(resolved.n_procs)]


def _run_point(fn: Callable[..., Any], params: dict[str, Any]) -> Any:
    return fn(**params)


def sweep(
    fn: Callable[..., Any],
    grid: Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]],
    platform: Platform | None = None,
    log_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> list[SweepResult]:
    """Run `fn(**point)` for every point of `grid`, as many at once as the platform has slots.

    `platform` gives the device and the slots: `n_procs` GPUs, or `n_procs` CPU processes
    (default: every visible GPU, else one process). Results come back in grid order, each
    with its parameters and its value or `WorkerError`; failures do not stop other points.
    `log_dir` keeps finished points (private files, JSON records) for a rerun to skip; a file
    there that another user could have written raises `UntrustedFileError` before any point runs.
    A `fn` that cannot be pickled (it holds a lock, say) raises `SerializationError` before any
    point runs, too.

    Example::

        results = px.sweep(train, {"lr": [0.1, 0.01], "depth": [2, 4]},
                           platform=px.Platform(device="cpu", n_procs=2), log_dir="runs/sweep")
        best = max((r for r in results if r.ok), key=lambda r: r.value)
    """
    platform = platform or Platform()
    points = grid_points(grid)
    _check_sendable(fn)
    results = [SweepResult(params=point) for point in points]
    folder = None
    finished: dict[int, bytes] = {}
    if log_dir is not None:
        # Every file is checked before any value is unpickled and before any point runs.
        try:
            folder = _points_folder(log_dir)
            for index, point in enumerate(points):
                saved = _read_finished(folder, _point_key(point))
                if saved is not None:
                    finished[index] = saved
        except UntrustedFileError as error:
            raise UntrustedFileError(f"sweep(log_dir={str(log_dir)!r}) was refused, no point ran: {error}") from error
    todo: queue.Queue[int] = queue.Queue()
    for index in range(len(points)):
        if index in finished:
            results[index].value = cloudpickle.loads(finished[index])  # a file this user wrote
            results[index].skipped = True
        else:
            todo.put(index)
    bar = _progress_bar(len(points), sum(r.skipped for r in results), progress)
    lock = threading.Lock()

    def work(environment: dict[str, str]) -> None:
        one_rank = dataclasses.replace(platform, n_procs=1, n_gpus=None, cluster="local")
        while True:
            try:
                index = todo.get_nowait()
            except queue.Empty:
                return
            point = points[index]
            try:
                value = _launch_with_environment(fn, point, environment, one_rank)
            except PhalanxError as error:
                results[index].error = error
            else:
                results[index].value = value
                if folder is not None:
                    _write_finished(folder, _point_key(point), point, value)
            with lock:
                if bar is not None:
                    bar.update()

    threads = [threading.Thread(target=work, args=(slot,), daemon=True) for slot in _slots(platform)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if bar is not None:
        bar.close()
    return results


def _check_sendable(fn: Callable[..., Any]) -> None:
    """Refuse, before any point runs, a function that cannot reach the points' processes.

    Otherwise every point would fail alike, each with the same pickling error.
    """
    try:
        cloudpickle.dumps(fn)
    except Exception as error:
        text = repr(fn)
        text = text if len(text) <= 80 else text[:77] + "..."
        raise SerializationError(
            f"sweep(): the function {text} cannot be sent to the points' processes ({type(error).__name__}: "
            f"{error}); no point ran. Pass a function that builds what it needs (a lock, an open file, a "
            "connection) inside itself, from picklable arguments."
        ) from error


def _launch_with_environment(
    fn: Callable[..., Any], point: dict[str, Any], environment: dict[str, str], platform: Platform
) -> Any:
    # Through launch's policy: a point gets the platform's restarts and set-up retries too.
    return run_job(_run_point, (fn, point), {}, platform, gather=False, rank_variables=environment)


def _progress_bar(total: int, done: int, wanted: bool) -> Any:
    if not wanted:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=done, desc="sweep", unit="point")
