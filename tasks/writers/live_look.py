"""The live quick look: a live run's partial result drawn into the Prefect UI as the scan
runs (docs/live.md), one image artifact of the run redrawn in place.

What is drawn is the partial file's default NXdata, what ``silx view`` shows first when it
opens the file: the patterns of every frame for diffraction (frames not done yet blank),
the grid's heat map for MX, the edge step of every spectrum for an XAS map. Drawing reads
the file written last, in a thread of its own, so following the scan never waits for it.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from calypso.registry.access.landlock import within
from calypso.tasks.writers.plots import _fixed_margins, _pyplot, image_markdown

logger = logging.getLogger(__name__)

LOOK_EVERY_S = 3.0  # a redraw costs ~0.2 s of the flow process's core: a few a scan's minute
DESCRIPTION = "Live quick look"


def _axis_label(dataset: Any, fallback: str) -> str:
    if dataset is None:
        return fallback
    name = dataset.name.rsplit("/", 1)[-1]
    units = dataset.attrs.get("units")
    if isinstance(units, bytes):
        units = units.decode()
    return f"{name} ({units})" if units else name


def _extent(axis: Any, size: int) -> tuple[float, float] | None:
    """The data range an image's side spans, when its axis gives one value a pixel."""
    if axis is None:
        return None
    values = np.asarray(axis[()], dtype=float)
    if values.shape != (size,) or size < 2 or not np.isfinite(values).all():
        return None
    return float(values[0]), float(values[-1])


def plot_default_nxdata(path: Path, title: str, confinement: Any = None) -> bytes:
    """The default NXdata of the NeXus file ``path`` as a PNG: a curve for a 1D signal, an
    image for a 2D one (leading axes averaged for more); NaN (not done yet) left blank.

    Examples
    --------
    >>> png = plot_default_nxdata(Path("scan.partial.h5"), "running: 40 of 100 frames done")
    ... # doctest: +SKIP
    """
    from silx.io.nxdata import get_default

    # Opened where the kernel keeps the run inside its proposal (``confinement``), read here.
    with within(confinement, h5py.File, path, "r") as h5:
        nxdata = get_default(h5)
        if nxdata is None:
            raise ValueError(f"{path}: no default NXdata (its 'default' attributes) to draw")
        signal = np.asarray(nxdata.signal[()], dtype=float)
        axes = list(nxdata.axes)
        signal_name = nxdata.signal_dataset_name.rsplit("/", 1)[-1]
        while signal.ndim > 2:  # a cake per frame: the mean of the frames done
            done = np.isfinite(signal).sum(axis=0)
            with np.errstate(invalid="ignore", divide="ignore"):
                signal = np.where(done > 0, np.nansum(signal, axis=0) / done, np.nan)
            axes = axes[1:]
        plt = _pyplot()
        figure, axis = plt.subplots(figsize=(6, 4), dpi=80)
        finite = signal[np.isfinite(signal)]
        if signal.ndim == 1:
            x = np.asarray(axes[0][()]) if axes and axes[0] is not None else None
            x = x if x is not None and x.shape == signal.shape else np.arange(len(signal))
            axis.plot(x, signal, lw=1, marker=".", ms=3)
            axis.set(xlabel=_axis_label(axes[0] if axes else None, "point"), ylabel=signal_name)
        elif finite.size:
            rows, columns = signal.shape
            across = _extent(axes[1], columns) or (0, columns)
            down = _extent(axes[0], rows) or (0, rows)
            shown = axis.imshow(
                signal, aspect="auto", origin="upper", cmap="viridis",
                extent=(*across, down[1], down[0]), interpolation="nearest",
                vmin=np.percentile(finite, 1), vmax=np.percentile(finite, 99.5),
            )  # fmt: skip
            figure.colorbar(shown, ax=axis, label=signal_name)
            axis.set(xlabel=_axis_label(axes[1], "column"), ylabel=_axis_label(axes[0], "row"))
    figure.suptitle(title, fontsize=9)
    _fixed_margins(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def _import_drawing() -> None:
    """Import what a drawing needs while the scan begins: the first look is then not late
    by matplotlib's import."""
    try:
        import matplotlib.backends.backend_agg
        import matplotlib.figure  # noqa: F401
        import silx.io.nxdata  # noqa: F401
    except ImportError:  # the drawing says what is missing, if it is ever asked for
        pass


class LiveLook:
    """The live quick look of one run: one markdown artifact of the flow run, created at the
    first drawing and updated in place after (the Prefect UI and the portal show the latest),
    redrawn at most every ``every_s`` seconds, never two drawings at once. Best effort: the
    result never depends on it."""

    def __init__(self, name: str, confinement: Any = None, every_s: float = LOOK_EVERY_S) -> None:
        from prefect.context import FlowRunContext

        context = FlowRunContext.get()
        self.flow_run_id = context.flow_run.id if context and context.flow_run else None
        self.name = name
        self.confinement = confinement  # where the partial file is opened (its proposal)
        self.every_s = every_s
        self.artifact_id: Any = None
        self._lock = threading.Lock()
        self._drawing = False
        self._note: str | None = None
        self._at = float("-inf")
        if self.flow_run_id is not None:  # the drawing's imports (~0.6 s, more on busy cores)
            threading.Thread(target=_import_drawing, name="live-look-imports", daemon=True).start()

    def show(self, partial: Path, state: str) -> None:
        """Redraw from the partial file ``partial`` (``state``: what it holds), unless the
        last drawing is under way or younger than ``every_s``."""
        if self.flow_run_id is None or time.monotonic() - self._at < self.every_s:
            return
        with self._lock:
            if self._drawing or self._note is not None:
                return
            self._drawing = True
        self._at = time.monotonic()
        threading.Thread(
            target=self._draw, args=(partial, state), name="live-quick-look", daemon=True
        ).start()

    def close(self, note: str) -> None:
        """The scan is reduced: the image gives way to ``note`` (the result's own quick look
        is an artifact of its own), at once or after the drawing under way, which the run
        does not wait for."""
        with self._lock:
            self._note = note
            drawing = self._drawing
        if not drawing and self.artifact_id is not None:
            self._post(self._as_markdown(note))

    def _as_markdown(self, text: str) -> str:
        return f"### {DESCRIPTION}: {self.name}\n\n{text}\n"

    def _draw(self, partial: Path, state: str) -> None:
        try:
            png = plot_default_nxdata(partial, f"{self.name}: {state}", self.confinement)
            self._post(image_markdown(f"{DESCRIPTION}: {self.name}", state, png, partial))
        except FileNotFoundError:  # the result was published meanwhile
            pass
        except Exception:  # a quick look never stops the reduction
            logger.debug("live quick look not drawn", exc_info=True)
        with self._lock:
            self._drawing = False
            note = self._note
        if note is not None and self.artifact_id is not None:
            self._post(self._as_markdown(note))

    def _post(self, markdown: str) -> None:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.actions import ArtifactCreate, ArtifactUpdate

        try:
            with get_client(sync_client=True) as client:
                if self.artifact_id is None:
                    created = ArtifactCreate(
                        type="markdown", data=markdown, flow_run_id=self.flow_run_id,
                        description=f"{DESCRIPTION}: {self.name}",
                    )  # fmt: skip
                    self.artifact_id = client.create_artifact(created).id
                else:
                    client.update_artifact(self.artifact_id, ArtifactUpdate(data=markdown))
        except Exception:  # no Prefect API to report to
            logger.debug("live quick look not posted", exc_info=True)
