"""The NeXus groups of one scan's reduced spectra, assembled from its part files as they
finish.

A map's batches are reduced on the workers while the writer copies the ones that have
finished into the result (:class:`SpectraAssembly`): the copy, ~250 MB for 10^4 spectra,
overlaps the reduction instead of following it. The layout comes from the scan's first
batch (its energy axis, fit ranges, EXAFS or not); batches finishing before it wait for
it. chi(k) is written last: its k axis is the longest of all batches'.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import h5py
import numpy as np

from calypso.errors import RawDataError
from calypso.tasks.writers import nexus
from calypso.techniques import spectroscopy as xas

#: Arrays of a part file and the NeXus group (or auxiliary signal) they go to.
PART_TO_NEXUS = {
    "mu": "mu",
    "norm": "normalized",
    "flat": "flattened",
    "pre_edge": "pre_edge",
    "post_edge": "post_edge",
    "background": "background",
}
#: The fit's values a spectrum that the key figures are made of (medians).
FIGURES = ("e0", "edge_step", "edge_noise", "e0_spread", "energy_shift")
#: The fit's values a spectrum (or a row of coefficients): their units.
FIT_UNITS = {
    "e0": "eV",
    "edge_step": "",
    "edge_noise": "",
    "e0_spread": "eV",
    "energy_shift": "eV",
    "pre_edge_coefficients": "",
    "post_edge_coefficients": "",
}


class SpectraAssembly:
    """The NXdata groups (mu, normalized, flattened, chi, chir) and the fit values of the
    ``n`` spectra of one scan, in ``process``, filled batch by batch (:meth:`add`, any
    order) and completed by :meth:`finish`, which returns the scan's key figures."""

    def __init__(self, process: h5py.Group, n: int) -> None:
        self.process = process
        self.n = n
        self.stacked = n > 1
        self.parts: list[Any] = []  # the batches added (BatchResult), as they came
        self._waiting: list[Any] = []  # added before the first batch
        self._data: dict[str, h5py.Dataset] = {}
        self._fits: dict[str, h5py.Dataset] = {}
        self._figures: dict[str, list[np.ndarray]] = {}
        self._has_exafs = False  # told by the first batch
        self._k: np.ndarray | None = None  # the longest k axis of the batches copied
        self._skipped: dict[str, int] = {}  # spectra left out (a map's), by reason
        self._points_left_out = 0  # a single spectrum's dropouts
        self._laid_out_by: Any = None  # the first batch with spectra reduced, once known

    @property
    def count(self) -> int:
        """Spectra added so far."""
        return sum(p.stop - p.start for p in self.parts)

    @property
    def first(self) -> Any:
        return min(self.parts, key=lambda p: p.start)

    def add(self, part: Any) -> None:
        """Copy one reduced batch into its rows (chi(k) waits for :meth:`finish`)."""
        self.parts.append(part)
        self._waiting.append(part)
        if not self._data:
            first = self._first_reduced()
            if first is None:  # the layout is the first reduced batch's: kept for then
                return
            self._lay_out(first)
        for waiting in self._waiting:
            self._copy(waiting)
        self._waiting.clear()

    def finish(self) -> dict[str, Any]:
        """chi(k) on the longest k axis, and the key figures; call once every batch is in."""
        if not self._data:
            first = self._first_reduced()
            if first is None:
                raise RawDataError(
                    f"no spectrum of the {self.n} could be reduced ({self._reasons()}): is the "
                    "map's edge in the scanned range, and are these the sample's counters?"
                )
            self._lay_out(first)
        for waiting in self._waiting:
            self._copy(waiting)
        self._waiting.clear()
        parts = sorted(self.parts, key=lambda p: p.start)
        if self._has_exafs:
            self._write_chi(parts)
        return self._key_figures()

    @property
    def first_reduced(self) -> Any:
        """The first batch with spectra reduced (a map's first batches may have none)."""
        return self._first_reduced() or self.first

    def first_reduced_known(self) -> Any:
        """:attr:`first_reduced` once the batches that came tell it, else None."""
        return self._first_reduced()

    def _first_reduced(self) -> Any:
        """The first batch, in the scan's order, with a spectrum reduced, once every batch
        before it has come; None until then."""
        if self._laid_out_by is not None:
            return self._laid_out_by
        expected = 0
        for part in sorted(self.parts, key=lambda p: p.start):
            if part.start != expected:
                return None
            if not _left_out(part.part_file):
                return part
            expected = part.stop
        return None

    def _reasons(self) -> str:
        for part in self.parts:
            with h5py.File(part.part_file, "r") as h5:
                for reason, count in json.loads(h5.attrs.get("skip_reasons", "{}")).items():
                    self._skipped[reason] = self._skipped.get(reason, 0) + count
        return self._reasons_text()

    def _lay_out(self, part: Any) -> None:
        self._laid_out_by = part
        with h5py.File(part.part_file, "r") as first:
            energy = first["energy"][()]
            ranges = json.loads(first.attrs["ranges"])
            nknots = int(first.attrs.get("nknots", 0))
            self._has_exafs = "chi" in first
            r = first["r"][()] if self._has_exafs else None
            n_post = first["post_edge_coefficients"].shape[1]
        lead = (self.n,) if self.stacked else ()
        mu_group = self._nxdata("mu", "mu", "energy", energy, "eV", energy.shape)
        mu_group.attrs["auxiliary_signals"] = ["pre_edge", "post_edge"] + (
            ["background"] if self._has_exafs else []
        )
        for name in ("pre_edge", "post_edge", *(["background"] if self._has_exafs else [])):
            self._data[name] = mu_group.create_dataset(
                name, shape=(*lead, energy.size), dtype=np.float64
            )
        self._nxdata("normalized", "norm", "energy", energy, "eV", energy.shape)
        self._nxdata("flattened", "flat", "energy", energy, "eV", energy.shape)
        if self._has_exafs:
            self._nxdata("chir", "chir_magnitude", "r", r, "angstrom", r.shape)
        fit = self.process.create_group("fit")
        nexus.set_nx_class(fit, "NXcollection")
        for name, units in FIT_UNITS.items():
            shape = {"pre_edge_coefficients": (2,), "post_edge_coefficients": (n_post,)}
            self._fits[name] = fit.create_dataset(
                name, shape=(*lead, *shape.get(name, ())), dtype=np.float64
            )
            if units:
                self._fits[name].attrs["units"] = units
        fit["edge_noise"].attrs["meaning"] = (
            f"edge step / point-to-point noise of mu; below {xas.MIN_EDGE_NOISE_RATIO:g}, E0 "
            "and the edge step are not trusted"
        )
        fit["e0_spread"].attrs["meaning"] = (
            f"E0 found on the even minus on the odd points; over {xas.MAX_E0_SPREAD:g} eV, "
            "noise decides E0"
        )
        fit["pre_edge_coefficients"].attrs["meaning"] = "offset, slope (1/eV) of mu·E^nvict"
        fit["post_edge_coefficients"].attrs["meaning"] = "polynomial in (E - E0) of mu - pre_edge"
        for name, value in ranges.items():
            fit[name] = value
            if name != "nnorm":
                fit[name].attrs["units"] = "eV"
        if self._has_exafs:
            fit["nknots"] = nknots

    def _nxdata(
        self, name: str, signal: str, axis: str, values: np.ndarray, units: str, shape: tuple
    ) -> h5py.Group:
        spectrum_axes = ["spectrum"] if self.stacked else []
        group = nexus.create_nxdata(self.process, name, signal=signal, axes=[*spectrum_axes, axis])
        if self.stacked:
            group["spectrum"] = np.arange(self.n)
        nexus.write_axis(group, axis, values, units)
        if self.stacked and axis == "energy":
            group[axis].attrs["long_name"] = "measured energy (eV); calibrated: + fit/energy_shift"
        lead = (self.n,) if self.stacked else ()
        dataset = group.create_dataset(signal, shape=(*lead, *shape), dtype=np.float64)
        dataset.attrs["interpretation"] = "spectrum"
        self._data[name] = dataset
        return group

    def _rows(self, part: Any) -> Any:
        return slice(part.start, part.stop) if self.stacked else Ellipsis

    def _values(self, dataset: h5py.Dataset) -> np.ndarray:
        return dataset[()] if self.stacked else dataset[0]

    def _copy(self, part: Any) -> None:
        rows = self._rows(part)
        with h5py.File(part.part_file, "r") as h5:
            if "skipped" in h5:
                self._copy_skipped(h5, rows)
            if "norm" not in h5:  # a batch left out whole: its measured mu, NaN results
                self._data["mu"][rows] = self._values(h5["mu"])
                for name, dataset in [*self._data.items(), *self._fits.items()]:
                    if name not in ("mu", "chi", "skipped"):
                        dataset[rows] = np.nan
                for name in FIGURES:
                    self._figures.setdefault(name, []).append(
                        np.full(part.stop - part.start, np.nan)
                    )
                return
            for name, key in PART_TO_NEXUS.items():
                if key in self._data:
                    self._data[key][rows] = self._values(h5[name])
            if "chir" in self._data:
                self._data["chir"][rows] = self._values(h5["chir_magnitude"])
            for name in FIT_UNITS:
                self._fits[name][rows] = self._values(h5[name])
            if "mu_errors" in h5:
                mu_errors = self.process["mu"].create_dataset("mu_errors", data=h5["mu_errors"][0])
                mu_errors.attrs["meaning"] = "weighted standard error of the merged spectra"
                self.process["fit"]["merge_weights"] = h5["merge_weights"][()]
            if "points_left_out" in h5:  # a single spectrum's dropouts
                dropped = self.process["fit"].create_dataset(
                    "points_left_out", data=h5["points_left_out"][()]
                )
                dropped.attrs["units"] = "eV"
                dropped.attrs["meaning"] = "points left out: mu(E) not finite (I0 or It zero)"
                self._points_left_out += dropped.size
            for name in FIGURES:
                self._figures.setdefault(name, []).append(h5[name][()])
            if "k" in h5 and (self._k is None or h5["k"].shape[0] > self._k.size):
                self._k = h5["k"][()]

    def _copy_skipped(self, h5: h5py.File, rows: Any) -> None:
        """A map's spectra left out (their results NaN), in ``fit/skipped``."""
        if "skipped" not in self._fits:
            skipped = self._fits["skipped"] = self.process["fit"].create_dataset(
                "skipped", shape=(self.n,), dtype=bool
            )
            skipped.attrs["meaning"] = (
                "spectra left out, their results NaN: no absorption edge (off the sample), "
                "mu(E) not finite (beam lost) or too short above E0 for the EXAFS"
            )
        self._fits["skipped"][rows] = h5["skipped"][()]
        for reason, count in json.loads(h5.attrs["skip_reasons"]).items():
            self._skipped[reason] = self._skipped.get(reason, 0) + count

    def _write_chi(self, parts: list[Any]) -> None:
        k = self._k
        k_length = k.size
        chi_group = self._nxdata("chi", "chi", "k", k, "1/angstrom", (k_length,))
        chi_group["chi"].attrs["long_name"] = "chi(k) (edge-step units)"
        for part in parts:
            with h5py.File(part.part_file, "r") as h5:
                chi = np.full((part.stop - part.start, k_length), np.nan)
                if "chi" in h5:  # else a batch left out whole
                    chi[:, : h5["chi"].shape[1]] = h5["chi"][()]
                self._data["chi"][self._rows(part)] = chi if self.stacked else chi[0]

    def _key_figures(self) -> dict[str, Any]:
        e0_all, step_all, noise_all, spread_all, shift_all = (
            np.concatenate(self._figures[name]) for name in FIGURES
        )
        n = self.n
        # Medians of the spectra reduced (those left out are NaN).
        figures: dict[str, Any] = {
            "spectra": int(n),
            "e0_eV": round(float(np.nanmedian(e0_all)), 3),
            "edge_step": float(np.nanmedian(step_all)),
            "edge_noise": round(float(np.nanmedian(noise_all)), 1),
            "e0_spread_eV": round(float(np.nanmedian(spread_all)), 2),
        }
        if np.any(shift_all[np.isfinite(shift_all)] != 0):
            # Calibrated on a reference foil: by how much the measured energies moved (a
            # monochromator 9 eV off, SSRL's Ag K scan of 2006), not only in fit/energy_shift.
            figures["energy_shift_eV"] = round(float(np.nanmedian(shift_all)), 3)
        warnings = []
        if self._skipped:
            left_out = sum(self._skipped.values())
            figures["spectra_skipped"] = left_out
            warnings.append(
                f"{left_out} of {n} spectra could not be reduced and are left out, their "
                f"results NaN (fit/skipped): {self._reasons_text()}; pixels off the sample or "
                "where the beam was lost"
            )
        if self._points_left_out:
            figures["points_left_out"] = self._points_left_out
            warnings.append(
                f"mu(E) is not finite at {self._points_left_out} point(s) (I0 or It read zero "
                "or negative there: a dropout): left out, as Larch does (fit/points_left_out)"
            )
        warnings += _undecided_e0(noise_all, spread_all, n)
        if warnings:
            figures["warning"] = "; ".join(warnings)
            for warning in warnings:
                _warn(warning)
        return figures

    def _reasons_text(self) -> str:
        return ", ".join(f"{count} {reason}" for reason, count in self._skipped.items())


def _left_out(part_file: str) -> bool:
    """Whether a part file is that of a batch left out whole (none of its spectra reduced)."""
    with h5py.File(part_file, "r") as h5:
        return "norm" not in h5


def _warn(message: str) -> None:
    """Log ``message`` as a warning of the running flow (or of Python, outside a flow)."""
    try:
        from prefect import get_run_logger

        get_run_logger().warning(message)
    except Exception:  # outside a flow or task run
        logging.getLogger("calypso.tasks.spectroscopy").warning(message)


def _undecided_e0(edge_noise: np.ndarray, spread: np.ndarray, n: int) -> list[str]:
    """What the results should say of the spectra whose E0 the data do not decide
    (:func:`~calypso.techniques.spectroscopy.e0_undecided`): too noisy, or with a clean
    edge whose E0 moves between the even and the odd points (an edge with two maxima of
    dmu/dE of about the same height, a metal foil's shoulder, is told apart from noise
    this way: both halves see the same noise-free edge and pick different maxima)."""
    undecided = xas.e0_undecided(edge_noise, spread)
    noisy = undecided & (np.asarray(edge_noise) < xas.MIN_EDGE_NOISE_RATIO)
    moving = undecided & ~noisy
    said = []
    if np.any(noisy):
        said.append(
            f"{int(np.count_nonzero(noisy))} of {n} spectra are too noisy to decide E0: an "
            f"edge step under {xas.MIN_EDGE_NOISE_RATIO:g} times the noise (fit/edge_noise); "
            "merge repeats, choose other channels or give e0"
        )
    if np.any(moving):
        most = float(np.nanmax(np.asarray(spread)[moving]))
        said.append(
            f"{int(np.count_nonzero(moving))} of {n} spectra do not decide E0: it moves up to "
            f"{most:.1f} eV between the even and the odd points (fit/e0_spread; over "
            f"{xas.MAX_E0_SPREAD:g} eV): noise, or two maxima of dmu/dE of about the same "
            "height (a shoulder on the edge); give e0, or merge repeats"
        )
    return said
