"""Recorder: TensorBoard event files written by the master rank only, read back with TensorBoard's own reader."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib
import pytest
import torch
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import metadata as hparams_metadata

import phalanx as px
from phalanx.recorder import Recorder
from tests.conftest import CPU, run_script

pytestmark = pytest.mark.timeout(120)


def _read(log_dir: Path) -> event_accumulator.EventAccumulator:
    events = event_accumulator.EventAccumulator(str(log_dir))
    events.Reload()
    return events


def _scalars(events: event_accumulator.EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return sorted((event.step, event.value) for event in events.Scalars(tag))


def _scalars_as_served(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    """Scalars as the TensorBoard server's Python loader (`--load_fast=false`) reads them."""
    from tensorboard.backend.event_processing import plugin_event_accumulator
    from tensorboard.util import tensor_util

    events = plugin_event_accumulator.EventAccumulator(str(log_dir))
    events.Reload()
    return sorted((event.step, tensor_util.make_ndarray(event.tensor_proto).item()) for event in events.Tensors(tag))


def _files_under(directory: Path) -> list[Path]:
    return sorted(path for path in directory.rglob("*"))


def _writer_pid(event_file: Path) -> int:
    # events.out.tfevents.<time>.<host>.<pid>.<counter>
    return int(event_file.name.split(".")[-2])


def _record_a_run(log_dir: Path) -> tuple[int, bool]:
    """What a training function records; runs on every rank. Returns (pid, has a writer)."""

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with Recorder(log_dir) as rec:
        for loss in (0.5, 0.25, 0.125):
            rec.scalar("loss", loss)
            rec.step()
        rec.scalar("accuracy", torch.tensor(0.75), step=10)
        figure, axes = plt.subplots()
        axes.plot([0, 1, 2], [0.5, 0.25, 0.125])
        rec.figure("curve", figure)
        rec.image("sample", torch.linspace(0, 1, 3 * 4 * 6).reshape(3, 4, 6))
        rec.params({"lr": 0.1, "optimizer": "sgd"}, {"final/loss": 0.125})
        return os.getpid(), rec.writer is not None


def test_two_ranks_record_into_one_run_written_by_rank_zero(tmp_path):
    log_dir = tmp_path / "runs" / "baseline"
    (rank0_pid, rank0_writes), (_, rank1_writes) = px.launch(_record_a_run, log_dir, platform=CPU)

    assert (rank0_writes, rank1_writes) == (True, False)
    files = _files_under(tmp_path / "runs")
    assert files == [log_dir, *log_dir.glob("events.out.tfevents.*")]  # hparams too: no subfolder
    assert len(files) == 2 and _writer_pid(files[1]) == rank0_pid

    events = _read(log_dir)
    assert _scalars(events, "loss") == [(0, 0.5), (1, 0.25), (2, 0.125)]
    assert _scalars(events, "accuracy") == [(10, 0.75)]
    assert _scalars(events, "final/loss") == [(3, 0.125)]
    (sample,) = events.Images("sample")
    assert (sample.step, sample.width, sample.height) == (3, 6, 4)
    assert [image.step for image in events.Images("curve")] == [3]
    hparams = events.PluginTagToContent("hparams")
    session = hparams_metadata.parse_session_start_info_plugin_data(hparams[hparams_metadata.SESSION_START_INFO_TAG])
    assert session.hparams["lr"].number_value == 0.1
    assert session.hparams["optimizer"].string_value == "sgd"
    experiment = hparams_metadata.parse_experiment_plugin_data(hparams[hparams_metadata.EXPERIMENT_TAG])
    assert [metric.name.tag for metric in experiment.metric_infos] == ["final/loss"]


def test_non_master_rank_creates_no_writer_file_or_directory(tmp_path):
    def record_in_own_directory():
        log_dir = tmp_path / f"rank{px.get_rank()}"
        with Recorder(log_dir) as rec:
            rec.scalar("loss", 1.0)
            rec.image("sample", torch.zeros(3, 2, 2))
            rec.params({"lr": 0.1}, {"final/loss": 1.0})
            rec.step()
            rec.flush()
            return rec.enabled, rec.writer is None, rec.count, log_dir.exists()

    assert px.launch(record_in_own_directory, platform=CPU) == [(True, False, 1, True), (False, True, 1, False)]
    assert [path.name for path in tmp_path.iterdir()] == ["rank0"]


def test_figures_are_closed_on_every_rank(tmp_path):
    def draw_and_record():

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rec = Recorder(tmp_path)
        kept, _ = plt.subplots()
        rec.figure("kept", kept, close=False)
        rec.figure("closed", plt.subplots()[0])
        rec.close()
        return plt.get_fignums() == [kept.number]

    assert px.launch(draw_and_record, platform=CPU) == [True, True]


def test_state_dict_round_trip_continues_the_curve(tmp_path):
    with Recorder(tmp_path) as rec:
        for step in range(5):
            rec.scalar("loss", float(step))
            rec.step()
        torch.save(rec.state_dict(), tmp_path / "checkpoint.pt")

    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state == {"count": 5}
    with Recorder(tmp_path) as resumed:
        resumed.load_state_dict(state)
        assert resumed.count == 5
        for step in range(5, 10):
            resumed.scalar("loss", float(step))
            resumed.step()

    assert _scalars(_read(tmp_path), "loss") == [(step, float(step)) for step in range(10)]


def test_resume_hides_steps_recorded_after_the_checkpoint(tmp_path):
    def crash_after_checkpoint_then_resume():
        # In a fresh worker, so that the two event files sort by creation as they would across runs.
        state = {}
        with Recorder(tmp_path) as rec:
            for step in range(8):  # the checkpoint is taken at 5, the run dies at 7
                if step == 5:
                    state = rec.state_dict()
                rec.scalar("loss", float(step))
                rec.step()
        with Recorder(tmp_path) as resumed:
            resumed.load_state_dict(state)
            for step in range(5, 10):
                resumed.scalar("loss", 100.0 + step)
                resumed.step()

    px.launch(crash_after_checkpoint_then_resume, platform=CPU)
    expected = [(step, float(step)) for step in range(5)] + [(step, 100.0 + step) for step in range(5, 10)]
    assert _scalars(_read(tmp_path), "loss") == expected
    assert _scalars_as_served(tmp_path, "loss") == expected


def test_single_process_use_is_world_size_one(tmp_path):
    with Recorder(tmp_path) as rec:
        assert rec.enabled and rec.writer is not None
        rec.scalar("loss", torch.tensor(2.0))
        rec.image("sample", torch.zeros(4, 5, 3, dtype=torch.uint8), dataformats="HWC")

    events = _read(tmp_path)
    assert _scalars(events, "loss") == [(0, 2.0)]
    assert [(image.step, image.width, image.height) for image in events.Images("sample")] == [(0, 5, 4)]


def test_enabled_false_records_nothing_on_the_master(tmp_path):
    with Recorder(tmp_path / "off", enabled=False) as rec:
        rec.scalar("loss", 1.0)
        rec.step()
        assert rec.count == 1 and rec.writer is None
    assert not (tmp_path / "off").exists()


def test_recording_after_close_raises(tmp_path):
    rec = Recorder(tmp_path)
    rec.close()
    rec.close()
    with pytest.raises(px.PhalanxError, match="closed"):
        rec.scalar("loss", 1.0)


def test_params_after_the_writer_itself_was_closed_raises_with_the_fix(tmp_path):
    with Recorder(tmp_path) as rec:
        rec.writer.close()
        with pytest.raises(px.PhalanxError, match=r"closed directly \(rec\.writer\.close\(\)\).*rec\.close\(\)"):
            rec.params({"lr": 0.1}, {"final/loss": 1.0})
        with pytest.raises(px.PhalanxError, match=r"closed directly"):
            rec.load_state_dict({"count": 3})


@pytest.mark.parametrize("state", [{}, {"count": -1}, {"count": 1.5}, {"steps": 3}])
def test_load_state_dict_rejects_a_state_without_a_count(tmp_path, state):
    with Recorder(tmp_path, enabled=False) as rec, pytest.raises(ValueError, match=r"count.*state_dict"):
        rec.load_state_dict(state)


def test_missing_tensorboard_error_names_the_install_fix(tmp_path):
    log_dir = tmp_path / "runs"
    result = run_script(f"""
        import sys
        sys.modules["tensorboard"] = None  # as if it were not installed
        from phalanx.errors import PhalanxError
        from phalanx.recorder import Recorder
        try:
            Recorder({str(log_dir)!r})
        except PhalanxError as error:
            print(error)
        else:
            sys.exit("no error")
    """)
    assert result.returncode == 0, result.stderr
    assert 'pip install "phalanx[tensorboard]"' in result.stdout
    assert "pip install tensorboard" in result.stdout
    assert not log_dir.exists()


def test_only_a_writing_recorder_imports_tensorboard_and_matplotlib(tmp_path):
    result = run_script(f"""
        import sys
        from phalanx.recorder import Recorder
        with Recorder({str(tmp_path)!r}, enabled=False) as rec:
            rec.scalar("loss", 1.0)
        print(sorted(name for name in ("tensorboard", "torch.utils.tensorboard", "matplotlib") if name in sys.modules))
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
