"""TensorBoard logging from a launched function: the master rank writes, every other rank does nothing.

TensorBoard and matplotlib are imported only when a Recorder that writes is created, so importing
this module stays cheap.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from phalanx.dist import is_master
from phalanx.errors import PhalanxError

if TYPE_CHECKING:
    import numpy
    import torch
    from matplotlib.figure import Figure
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.writer import FileWriter

__all__ = ["Recorder"]

_INSTALL_FIX = 'install it with `pip install "phalanx[tensorboard]"` (or `pip install tensorboard`)'


def _summary_writer_class() -> type[SummaryWriter]:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise PhalanxError(
            f"Recorder writes TensorBoard event files but TensorBoard cannot be imported ({error}): {_INSTALL_FIX}."
        ) from error
    return SummaryWriter


class Recorder:
    """Record scalars, figures, images and hyper-parameters as TensorBoard event files.

    Only the master rank (global rank 0) writes; on every other rank each call returns at once and
    nothing is created, so the same code runs on every rank. `count` is the global step that values
    are recorded at unless a call names its own `step`; `step()` advances it. `state_dict()` keeps it
    in a checkpoint, so that a resumed run continues its curves where they stopped.

    `log_dir` is the run's directory (created on the master when missing); `enabled` overrides the
    choice of the rank that writes (default: `phalanx.is_master()`).

    Example::

        def train():
            with Recorder("runs/baseline") as rec:
                for batch in loader:
                    loss = ...
                    rec.scalar("loss/train", loss)
                    rec.step()
                rec.params({"lr": 0.1}, {"final/loss": loss.item()})

        px.launch(train, platform=px.Platform(device="cpu", n_procs=2))   # one run, written by rank 0
    """

    def __init__(self, log_dir: str | os.PathLike[str], *, enabled: bool | None = None) -> None:
        self.log_dir = Path(log_dir)
        self.enabled = is_master() if enabled is None else bool(enabled)
        self._count = 0
        self._closed = False
        self._writer: SummaryWriter | None = None
        if self.enabled:
            self._writer = _summary_writer_class()(log_dir=str(self.log_dir))

    @property
    def writer(self) -> SummaryWriter | None:
        """The `SummaryWriter` on the rank that writes (for its other `add_*` methods); None elsewhere."""
        return self._writer

    @property
    def count(self) -> int:
        """The current global step, starting at 0."""
        return self._count

    def step(self) -> None:
        """Advance the global step by one."""
        self._count += 1

    def scalar(self, tag: str, value: float | torch.Tensor, step: int | None = None) -> None:
        """Record a number or a 0-d tensor under `tag` at `step` (default: `count`)."""
        writer = self._writer_to_use()
        if writer is not None:
            writer.add_scalar(tag, value, global_step=self._step_or_count(step))

    def figure(self, tag: str, figure: Figure | list[Figure], step: int | None = None, close: bool = True) -> None:
        """Record a matplotlib figure (or a list of them) as an image; `close` closes it afterwards."""
        writer = self._writer_to_use()
        if writer is not None:
            writer.add_figure(tag, figure, global_step=self._step_or_count(step), close=close)
        elif close:
            # Every rank draws its figures; closing them only where they are written would leave
            # them open on the other ranks, where pyplot keeps every open figure alive.
            pyplot = sys.modules.get("matplotlib.pyplot")
            if pyplot is not None:
                for one in figure if isinstance(figure, list) else [figure]:
                    pyplot.close(one)

    def image(
        self,
        tag: str,
        image: torch.Tensor | numpy.ndarray,
        step: int | None = None,
        dataformats: str = "CHW",
    ) -> None:
        """Record an image (a tensor or an array) at `step` (default: `count`).

        `dataformats` names the axes of `image`: "CHW" (default), "HWC", "HW"; values are floats in
        [0, 1] or uint8 in [0, 255].
        """
        writer = self._writer_to_use()
        if writer is not None:
            writer.add_image(tag, image, global_step=self._step_or_count(step), dataformats=dataformats)

    def params(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        """Record the run's hyper-parameters with its final metrics, for TensorBoard's HPARAMS tab.

        `hparams` values are numbers, strings, booleans or None; `metrics` are recorded as scalars
        at `count`, so their tags should differ from those given to `scalar`.
        """
        writer = self._writer_to_use()
        if writer is None:
            return
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        # SummaryWriter.add_hparams would open a second writer in a timestamped subfolder, which
        # TensorBoard shows as a separate run; the same summaries written here stay in this run.
        file_writer = self._event_file(writer)
        for summary in hparams_summaries(hparams, metrics):
            file_writer.add_summary(summary)
        for tag, value in metrics.items():
            writer.add_scalar(tag, value, global_step=self._count)

    def flush(self) -> None:
        """Write pending events to disk now (they are otherwise written every two minutes)."""
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file; recording afterwards raises. Closing twice is harmless."""
        self._closed = True
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def state_dict(self) -> dict[str, int]:
        """The state a checkpoint needs: `{"count": n}`."""
        return {"count": self._count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at the step stored by `state_dict()`.

        On the rank that writes, it also writes the restart marker of `SummaryWriter(purge_step=count)`:
        TensorBoard then hides the points at steps >= count that the interrupted run recorded after
        its checkpoint, so each step shows once.
        """
        count = state.get("count") if isinstance(state, dict) else None
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(
                f"Recorder.load_state_dict({state!r}) is not valid: it needs {{'count': n}} with a whole "
                "number n >= 0, as returned by Recorder.state_dict()."
            )
        if self._writer is not None:
            self._mark_restart(self._writer, count)
        self._count = count

    def __enter__(self) -> Recorder:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Recorder({str(self.log_dir)!r}, enabled={self.enabled}, count={self._count})"

    def _writer_to_use(self) -> SummaryWriter | None:
        if self._closed:
            raise PhalanxError(f"{self!r} is closed: record before close() or create a new Recorder.")
        return self._writer

    def _step_or_count(self, step: int | None) -> int:
        return self._count if step is None else step

    def _event_file(self, writer: SummaryWriter) -> FileWriter:
        """The writer of `writer`'s event file, for the events SummaryWriter has no `add_*` method for."""
        if writer.file_writer is None:  # SummaryWriter.close() drops it
            raise PhalanxError(
                f"the SummaryWriter of {self!r} was closed directly (rec.writer.close()): close the Recorder "
                "instead (rec.close()), once everything is recorded."
            )
        return writer.file_writer

    def _mark_restart(self, writer: SummaryWriter, count: int) -> None:
        # The marker SummaryWriter(purge_step=count) writes: readers drop the events they have
        # already read at steps >= count, the leftovers of a run that went on past its checkpoint.
        # Written twice: the TensorBoard server's Python loader takes a run's first marker for the
        # start of its first session and purges only from the second on.
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog

        file_writer = self._event_file(writer)
        for _ in range(2):
            file_writer.add_event(Event(step=count, session_log=SessionLog(status=SessionLog.START)))
