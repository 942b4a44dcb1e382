"""Quick-look figures: PNG files beside the results, and the same image in the Prefect UI."""

from __future__ import annotations

import base64
import logging
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def plot_patterns(
    path: Path, curves: list[tuple[str, np.ndarray, np.ndarray]], xlabel: str, title: str
) -> None:
    """Azimuthally integrated patterns (one curve a scan), as a PNG."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4), dpi=90)
    for label, radial, intensity in curves:
        axis.plot(radial, intensity, label=label, lw=1)
    axis.set_xlabel(xlabel)
    axis.set_ylabel("mean intensity")
    if 1 < len(curves) <= 8:
        axis.legend(fontsize=7)
    axis.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def publish_image(path: Path, description: str) -> None:
    """Show a PNG in the run's Prefect artifacts (a markdown artifact with the image inline)."""
    try:
        from prefect.artifacts import create_markdown_artifact

        encoded = base64.b64encode(Path(path).read_bytes()).decode()
        create_markdown_artifact(
            markdown=f"### {description}\n\n![{path.name}](data:image/png;base64,{encoded})\n\n"
            f"`{path}`",
            description=description,
        )
    except Exception:  # no Prefect API to report to: the result itself is written
        logger.debug("image artifact not created", exc_info=True)


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
        axis.imshow(image, cmap="gray", vmin=low, vmax=high if high > low else low + 1)
        axis.set_title(label, fontsize=8)
    figure.suptitle(title, fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def plot_mx_scan(
    path: Path,
    n_spots: np.ndarray,
    heat: np.ndarray | None,
    title: str,
    best: dict | None = None,
) -> None:
    """Spots per image against frame number, and the grid heat map with the centring cell."""
    plt = _pyplot()
    columns = 2 if heat is not None else 1
    figure, axes = plt.subplots(1, columns, figsize=(5.5 * columns, 4), dpi=90, squeeze=False)
    axes[0, 0].plot(np.arange(len(n_spots)), n_spots, lw=1, marker=".", ms=3)
    axes[0, 0].set_xlabel("frame")
    axes[0, 0].set_ylabel("spots")
    if heat is not None:
        shown = axes[0, 1].imshow(heat, cmap="viridis", origin="upper")
        figure.colorbar(shown, ax=axes[0, 1], label="spots")
        if best is not None:
            axes[0, 1].plot(best["column"], best["row"], "r+", ms=16, mew=2)
        axes[0, 1].set_xlabel("grid column")
        axes[0, 1].set_ylabel("grid row")
    figure.suptitle(title, fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
