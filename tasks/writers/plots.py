"""Quick-look figures: PNG files beside the results, and the same image in the Prefect UI."""

from __future__ import annotations

import base64
import logging
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


class _Figures:
    """pyplot's ``subplots`` and ``close`` on bare matplotlib Figures: no backend is chosen
    for the process (a notebook running a flow keeps its inline plots), no figure is kept
    in pyplot's registry, and it works in threads."""

    @staticmethod
    def subplots(*args, figsize=None, dpi=None, **kwargs):
        from calypso.registry.access.landlock import imported

        # Imported where matplotlib may read and write its font cache in the home folder
        # (a writer runs confined to its proposal); savefig's canvas with it.
        imported("matplotlib.backends.backend_agg")
        figure = imported("matplotlib.figure").Figure(figsize=figsize, dpi=dpi)
        return figure, figure.subplots(*args, **kwargs)

    @staticmethod
    def close(figure) -> None:  # nothing holds a bare Figure: garbage collection frees it
        pass


def _pyplot() -> type[_Figures]:
    return _Figures


# A quick look's panel is ~400 pixels wide at its 90 dpi: colouring and resampling a
# detector's million pixels for it was most of a small run's quick look.
PANEL_PIXELS = 400
# zlib's fastest level: the PNG is ~1.3x larger and written several times faster.
PNG_OPTIONS = {"pil_kwargs": {"compress_level": 1}}
# An image larger than its panel is resampled before its colours are looked up, not
# after: matplotlib's default colours every pixel first (a 600-frame map of 2,000 bins
# and a Pilatus 1M frame: 0.37 s of a diffraction quick look's 0.6 s; now 0.2 s).
LARGE_IMAGE = {"interpolation_stage": "data"}


def display_factor(shape: tuple[int, ...], pixels: int = PANEL_PIXELS) -> int:
    """The whole-number binning that brings an image near ``pixels`` on its longer side."""
    return max(1, max(shape) // pixels)


def binned(image: np.ndarray, factor: int, reduce=np.nanmean) -> np.ndarray:
    """``image`` reduced by ``reduce`` over ``factor`` x ``factor`` blocks (the rows and
    columns past the last whole block dropped): what a small panel can show."""
    if factor == 1:
        return image
    rows, columns = (n - n % factor for n in image.shape)
    blocks = image[:rows, :columns].reshape(rows // factor, factor, columns // factor, factor)
    return reduce(blocks, axis=(1, 3))


def _fixed_margins(figure) -> None:
    """Margins in inches for tick labels, axis labels and the title: matplotlib's
    ``tight_layout`` measures every text first, half of a small run's quick look."""
    width, height = figure.get_size_inches()
    columns = max(
        1,
        len(
            {
                axis.get_subplotspec().colspan.start
                for axis in figure.axes
                if axis.get_subplotspec() is not None
            }
        ),
    )
    figure.subplots_adjust(
        left=0.85 / width,
        right=1 - 0.2 / width,
        bottom=0.6 / height,
        top=1 - 0.62 / height,
        wspace=1.1 * columns / width,
        hspace=0.6 / height,
    )


def plot_spectra(
    path: Path,
    curves: list[tuple[str, np.ndarray, np.ndarray]],
    chi_curves: list[tuple[str, np.ndarray, np.ndarray]],
    kweight: float,
    title: str,
) -> None:
    """Normalised (flattened) mu(E) and k^w·chi(k), side by side, as a PNG."""
    plt = _pyplot()
    columns = 2 if chi_curves else 1
    figure, axes = plt.subplots(1, columns, figsize=(5.5 * columns, 4), dpi=90, squeeze=False)
    for label, energy, flat in curves:
        axes[0, 0].plot(energy, flat, label=label, lw=1)
    axes[0, 0].set_xlabel("energy (eV)")
    axes[0, 0].set_ylabel("flattened normalised mu(E)")
    if len(curves) <= 8:
        axes[0, 0].legend(fontsize=7)
    if chi_curves:
        for label, k, chi in chi_curves:
            axes[0, 1].plot(k, chi * k**kweight, label=label, lw=1)
        axes[0, 1].set_xlabel("k (1/Å)")
        axes[0, 1].set_ylabel(f"k^{kweight:g} chi(k) (1/Å^{kweight:g})")
    figure.suptitle(title, fontsize=9)
    _fixed_margins(figure)
    figure.savefig(path, **PNG_OPTIONS)
    plt.close(figure)


def plot_diffraction(
    path: Path,
    curves: list[tuple[str, np.ndarray, np.ndarray]],
    xlabel: str,
    title: str,
    frames_map: np.ndarray | None = None,
    n_frames: int = 0,
    frame: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    radial_map: np.ndarray | None = None,
    rings: np.ndarray | None = None,
) -> None:
    """The quick look of a diffraction scan, as a PNG: the mean patterns; the patterns of
    every frame as an image (``frames_map``: frames down, radial across, frames averaged
    into at most a few hundred rows); one frame as measured, its mask shaded and the
    rings the geometry puts at the strongest peaks (``rings``, in the units of
    ``radial_map``, the radial position of each pixel) drawn over it: rings off the
    frame's own rings mean a wrong calibration."""
    plt = _pyplot()
    panels = 1 + (frames_map is not None) + (frame is not None)
    figure, axes = plt.subplots(1, panels, figsize=(5 * panels, 4), dpi=90, squeeze=False)
    axis = axes[0, 0]
    for label, radial, intensity in curves:
        axis.plot(radial, intensity, label=label, lw=1)
    axis.set(xlabel=xlabel, ylabel="mean intensity", title="mean pattern")
    if 1 < len(curves) <= 8:
        axis.legend(fontsize=7)
    column = 1
    if frames_map is not None:
        radial = curves[0][1]
        shown = axes[0, column].imshow(
            frames_map, aspect="auto", origin="upper", cmap="viridis", **LARGE_IMAGE,
            extent=(radial[0], radial[-1], n_frames, 0),
            vmin=np.nanpercentile(frames_map, 1), vmax=np.nanpercentile(frames_map, 99.5),
        )  # fmt: skip
        figure.colorbar(shown, ax=axes[0, column], label="intensity")
        axes[0, column].set(xlabel=xlabel, ylabel="frame", title="every frame")
        column += 1
    if frame is not None:
        axis = axes[0, column]
        measured_shape = frame.shape
        factor = display_factor(measured_shape)
        frame = binned(np.asarray(frame, dtype=np.float32), factor)
        finite = frame[np.isfinite(frame) & (frame > 0)]
        high = np.percentile(finite, 99.5) if finite.size else 1.0
        axis.imshow(np.log1p(np.clip(frame, 0, high)), cmap="gray", origin="upper", **LARGE_IMAGE)
        if mask is not None and mask.shape == measured_shape:
            mask = binned(mask != 0, factor, np.any)
            shade = np.ma.masked_where(~mask, np.ones(mask.shape))
            axis.imshow(shade, cmap="autumn", alpha=0.35, origin="upper")
        if radial_map is not None and rings is not None and len(rings):
            centres = slice(factor // 2, None, factor)  # the binned pixels' centres
            radial_map = radial_map[centres, centres][: frame.shape[0], : frame.shape[1]]
            axis.contour(radial_map, levels=np.sort(rings), colors="cyan", linewidths=0.6)
        axis.set(title="one frame, mask and rings", xticks=[], yticks=[])
    figure.suptitle(title, fontsize=9)
    _fixed_margins(figure)
    figure.savefig(path, **PNG_OPTIONS)
    plt.close(figure)


def image_markdown(title: str, text: str, png: bytes, path: Path) -> str:
    """A PNG inline in a markdown artifact, under ``title`` and ``text``, with its file."""
    encoded = base64.b64encode(png).decode()
    text = f"{text}\n\n" if text else ""
    return f"### {title}\n\n{text}![{path.name}](data:image/png;base64,{encoded})\n\n`{path}`"


def publish_image(path: Path, description: str) -> None:
    """Show a PNG in the run's Prefect artifacts (a markdown artifact with the image inline)."""
    try:
        from prefect.artifacts import create_markdown_artifact

        from calypso.tasks.writers.publication import published_path

        # in a flow run the PNG waits in its part folder until the run publishes
        png = published_path(path).read_bytes()
        create_markdown_artifact(
            markdown=image_markdown(description, "", png, path), description=description
        )
    except Exception:  # no Prefect API to report to: the result itself is written
        logger.debug("image artifact not created", exc_info=True)


def _cell_edges(centres: np.ndarray) -> np.ndarray:
    """Edges of the cells around ``centres`` (half way between neighbours), for pcolormesh."""
    centres = np.asarray(centres, dtype=float)
    if len(centres) == 1:
        return np.array([centres[0] - 0.5, centres[0] + 0.5])
    middle = (centres[1:] + centres[:-1]) / 2
    return np.concatenate([[2 * centres[0] - middle[0]], middle, [2 * centres[-1] - middle[-1]]])


def plot_slices(path: Path, panels: list[tuple[str, np.ndarray]], title: str) -> None:
    """Reconstructed slices side by side (up to 4 a row), on one grey scale, as a PNG."""
    plt = _pyplot()
    values = np.concatenate([image[image != 0].ravel() for _, image in panels] or [np.zeros(1)])
    low, high = np.percentile(values, [0.5, 99.5]) if values.size else (0.0, 1.0)
    columns = min(4, len(panels))
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(
        rows, columns, figsize=(3.2 * columns, 3.4 * rows), dpi=90, squeeze=False
    )
    for axis in axes.ravel():
        axis.set_axis_off()
    for axis, (label, image) in zip(axes.ravel(), panels, strict=False):
        high = high if high > low else low + 1
        axis.imshow(image, cmap="gray", vmin=low, vmax=high, **LARGE_IMAGE)
        axis.set_title(label, fontsize=8)
    figure.suptitle(title, fontsize=8)
    _fixed_margins(figure)
    figure.savefig(path, **PNG_OPTIONS)
    plt.close(figure)


def plot_mx_scan(
    path: Path,
    n_spots: np.ndarray,
    heat: np.ndarray | None,
    title: str,
    best: dict | None = None,
    axes_positions: list[tuple[str, np.ndarray]] | None = None,
) -> None:
    """Spots per image against frame number, and the grid heat map with the centring cell,
    on the motors' positions when ``axes_positions`` gives them ((name, values) of the
    rows, then of the columns), else on row and column numbers."""
    plt = _pyplot()
    columns = 2 if heat is not None else 1
    figure, axes = plt.subplots(1, columns, figsize=(5.5 * columns, 4), dpi=90, squeeze=False)
    axes[0, 0].plot(np.arange(len(n_spots)), n_spots, lw=1, marker=".", ms=3)
    axes[0, 0].set_xlabel("frame")
    axes[0, 0].set_ylabel("spots")
    if heat is not None:
        (row_name, row_at), (column_name, column_at) = axes_positions or [
            ("grid row", np.arange(heat.shape[0])),
            ("grid column", np.arange(heat.shape[1])),
        ]
        shown = axes[0, 1].pcolormesh(
            _cell_edges(column_at), _cell_edges(row_at), heat, cmap="viridis", shading="flat"
        )
        if len(row_at) < 2 or row_at[-1] > row_at[0]:
            axes[0, 1].invert_yaxis()  # the first row on top, as the image shows it
        figure.colorbar(shown, ax=axes[0, 1], label="spots")
        if best is not None:
            axes[0, 1].plot(column_at[best["column"]], row_at[best["row"]], "r+", ms=16, mew=2)
        axes[0, 1].set_xlabel(column_name)
        axes[0, 1].set_ylabel(row_name)
    figure.suptitle(title, fontsize=8)
    _fixed_margins(figure)
    figure.savefig(path, **PNG_OPTIONS)
    plt.close(figure)
