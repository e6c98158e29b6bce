"""Parameter sweeps: every point its own job, as many at once as there are slots."""

from __future__ import annotations

import json
import os
import stat
import threading

import pytest

import phalanx as px

pytestmark = pytest.mark.timeout(120)


def score(lr, depth):
    if lr == 0.5 and depth == 3:
        raise ValueError("this point diverged")
    return {"lr": lr, "depth": depth, "pid": os.getpid(), "world": px.get_world_size()}


GRID = {"lr": [0.1, 0.5], "depth": [1, 2, 3]}


def test_six_points_on_two_slots_with_one_failing_point(tmp_path):
    results = px.sweep(score, GRID, platform=px.Platform(device="cpu", n_procs=2), log_dir=tmp_path, progress=False)
    assert [r.params for r in results] == [
        {"lr": lr, "depth": depth} for lr in (0.1, 0.5) for depth in (1, 2, 3)
    ]  # grid order
    failed = [r for r in results if not r.ok]
    assert len(failed) == 1 and failed[0].params == {"lr": 0.5, "depth": 3}
    assert "this point diverged" in failed[0].error.traceback
    for result in results:
        if result.ok:
            assert result.value["lr"] == result.params["lr"] and result.value["world"] == 1
    assert len({r.value["pid"] for r in results if r.ok}) == 5  # every point its own process


def test_a_rerun_with_the_same_log_dir_skips_finished_points(tmp_path):
    platform = px.Platform(device="cpu", n_procs=2)
    first = px.sweep(score, GRID, platform=platform, log_dir=tmp_path, progress=False)
    again = px.sweep(score, GRID, platform=platform, log_dir=tmp_path, progress=False)
    assert [r.skipped for r in again] == [r.ok for r in first]  # only the failed point runs again
    assert [r.value for r in again if r.skipped] == [r.value for r in first if r.ok]
    assert not again[5].ok


def test_a_list_of_dicts_is_run_as_given():
    points = [{"lr": 0.1, "depth": 9}, {"lr": 0.2, "depth": 8}]
    results = px.sweep(score, points, platform=px.Platform(device="cpu", n_procs=2), progress=False)
    assert [r.value["depth"] for r in results] == [9, 8]


def test_a_bad_grid_is_refused():
    with pytest.raises(px.PhalanxError, match=r"grid\['lr'\] must be a list"):
        px.sweep(score, {"lr": 0.1}, progress=False)


def test_a_log_dir_keeps_a_json_record_and_a_private_value_file_per_finished_point(tmp_path):
    log_dir = tmp_path / "sweep"
    one_slot = px.Platform(device="cpu", n_procs=1)
    px.sweep(score, {"lr": [0.1], "depth": [1]}, platform=one_slot, log_dir=log_dir, progress=False)
    points = log_dir / "points"
    assert stat.S_IMODE(points.stat().st_mode) == 0o700 and stat.S_IMODE(log_dir.stat().st_mode) == 0o700
    (record_file,) = points.glob("*.json")
    record = json.loads(record_file.read_text())
    assert record["params"] == {"lr": 0.1, "depth": 1}
    assert sorted(os.listdir(points)) == sorted([record_file.name, record["value_file"]])
    assert all(stat.S_IMODE((points / name).stat().st_mode) == 0o600 for name in os.listdir(points))


class _HoldsALock:
    """A callable that cannot be pickled, as a pystematic Experiment cannot (its help output holds an RLock)."""

    def __init__(self, marker) -> None:
        self.marker = marker
        self.lock = threading.RLock()

    def __call__(self, lr):
        self.marker.touch()
        return lr


def test_a_function_that_cannot_be_pickled_is_refused_before_any_point_runs(tmp_path):
    marker = tmp_path / "ran"
    with pytest.raises(px.SerializationError, match=r"sweep\(\): the function .*_HoldsALock.* cannot be sent.*RLock"):
        px.sweep(_HoldsALock(marker), {"lr": [0.1, 0.2]}, platform=px.Platform(device="cpu", n_procs=2), progress=False)
    assert not marker.exists()
