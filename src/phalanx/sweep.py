"""Parameter sweeps: every point of a grid runs as its own job on one device slot.

A slot is one GPU (one rank on it) or, on CPU, one process. As many points run at once as
there are slots; each point is a normal `launch` of one rank, so a failing point is reported
with its traceback and the others go on. With a `log_dir`, each finished point's result is
written there, and a second run with the same `log_dir` skips the points already done.
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

from phalanx.errors import PhalanxError
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

    Example::

        results = px.sweep(train, {"lr": [0.1, 0.01], "depth": [2, 4]},
                           platform=px.Platform(device="cpu", n_procs=2), log_dir="runs/sweep")
        best = max((r for r in results if r.ok), key=lambda r: r.value)
    """
    platform = platform or Platform()
    points = grid_points(grid)
    results = [SweepResult(params=point) for point in points]
    folder = Path(log_dir) / "points" if log_dir is not None else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    todo: queue.Queue[int] = queue.Queue()
    for index, point in enumerate(points):
        saved = folder / f"{_point_key(point)}.pkl" if folder is not None else None
        if saved is not None and saved.exists():
            results[index].value = cloudpickle.loads(saved.read_bytes())
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
                    (folder / f"{_point_key(point)}.pkl").write_bytes(cloudpickle.dumps(value))
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


def _launch_with_environment(
    fn: Callable[..., Any], point: dict[str, Any], environment: dict[str, str], platform: Platform
) -> Any:
    from phalanx.runners.local import run_local

    return run_local(_run_point, (fn, point), {}, platform.resolve(), None, False, environment)


def _progress_bar(total: int, done: int, wanted: bool) -> Any:
    if not wanted:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=done, desc="sweep", unit="point")
