"""Sample XAS raw data in the ESRF layout, built from a real measured spectrum.

The absorption of the sample and of the reference foil come from a real Fe
K-edge transmission spectrum (``xas/fe_metal_rt.xdi`` of the shared test data,
found through ``CALYPSO_TEST_DATA``), interpolated onto a typical step-scan
grid. Counters get a drifting, noisy I0, counting (Poisson) noise, and a
monochromator that is miscalibrated by ``MONO_OFFSET_EV``: the reference foil
channel lets the flow find and remove that offset. Without the shared data a
model edge (arctangent step plus one EXAFS shell) stands in, and says so.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from calypso.flows.samples.diffraction import sample_dataset, write_counter_scan
from calypso.tasks.raw.data_policy import RawDataset
from calypso.techniques.spectroscopy import ETOK

#: The simulated monochromator reads this much above the true energy (eV).
MONO_OFFSET_EV = 2.5
FE_K_EDGE_EV = 7112.0


@dataclass(frozen=True)
class ReferenceSpectrum:
    energy: np.ndarray  # eV
    mu: np.ndarray
    other: np.ndarray | None  # a second compound (Fe2O3) for maps of mixtures
    source: str


def shared_data_dir() -> Path:
    """CALYPSO_TEST_DATA, else ``shared/data`` beside the repository (the package root)."""
    import calypso

    repository = Path(calypso.__file__).resolve().parent
    return Path(os.environ.get("CALYPSO_TEST_DATA", repository.parent / "shared" / "data"))


def _xdi_mu(path: Path) -> tuple[np.ndarray, np.ndarray]:
    from calypso.tasks.raw.spectra import read_text_spectrum

    table = read_text_spectrum(path)
    return table.columns["energy"], table.columns["mutrans"]


def reference_spectrum() -> ReferenceSpectrum:
    """The real Fe metal spectrum (and Fe2O3) when the shared data is there, else a model."""
    folder = shared_data_dir() / "xas"
    metal, oxide = folder / "fe_metal_rt.xdi", folder / "fe2o3_rt.xdi"
    if metal.is_file():
        energy, mu = _xdi_mu(metal)
        other = None
        if oxide.is_file():
            oxide_energy, oxide_mu = _xdi_mu(oxide)
            other = np.interp(energy, oxide_energy, oxide_mu)
        return ReferenceSpectrum(energy, mu, other, str(metal))
    energy = np.linspace(6960.0, 7970.0, 2000)
    relative = energy - FE_K_EDGE_EV
    k = np.sqrt(ETOK * np.clip(relative, 0.0, None))
    exafs = 0.08 * np.sin(2 * 2.48 * k + 0.5) * np.exp(-2 * 0.005 * k**2) / np.maximum(k, 1.0)
    mu = 0.2 - 1e-4 * relative + 2.5 * (0.5 + np.arctan(relative / 1.5) / np.pi) * (1 + exafs)
    return ReferenceSpectrum(
        energy,
        mu,
        None,
        f"a model edge: no {metal} (the real Fe spectrum; CALYPSO_TEST_DATA names its folder)",
    )


def scan_grid(e0: float = FE_K_EDGE_EV) -> np.ndarray:
    """A typical XAFS step scan: 5 eV below the edge, 0.3 eV across it, 0.05/Å in k above."""
    pre = np.arange(e0 - 140.0, e0 - 20.0, 5.0)
    edge = np.arange(e0 - 20.0, e0 + 30.0, 0.3)
    k = np.arange(np.sqrt(ETOK * 30.0), 14.0, 0.05)
    return np.concatenate([pre, edge, e0 + k**2 / ETOK])


def _counters(
    truth: np.ndarray,
    reference: ReferenceSpectrum,
    sample_mu: np.ndarray,
    rng: np.random.Generator,
    flux: float,
) -> dict[str, np.ndarray]:
    """I0, It, Iref counts for absorption ``sample_mu`` at true energies ``truth``."""
    shape = sample_mu.shape
    drift = 1.0 + 0.03 * np.sin(np.linspace(0, 3, shape[-1]) + rng.uniform(0, 6))
    i0_expected = flux * drift * (1.0 + 0.01 * rng.standard_normal(shape))
    i0 = rng.poisson(i0_expected).astype(np.float64)
    it = rng.poisson(i0 * 0.9 * np.exp(-sample_mu)).astype(np.float64)
    return {"i0": i0, "it": it, "iref": _reference_counts(it, truth, reference, rng)}


def _reference_counts(
    it: np.ndarray, truth: np.ndarray, reference: ReferenceSpectrum, rng: np.random.Generator
) -> np.ndarray:
    """Iref counts behind the reference foil, for the beam ``it`` leaving the sample."""
    foil = np.interp(truth, reference.energy, reference.mu)
    return rng.poisson(it * 0.9 * np.exp(-0.6 * foil)).astype(np.float64)


def write_spectroscopy_sample(root: Path, repeats: int = 3, *, seed: int = 0) -> RawDataset:
    """A Fe foil measured ``repeats`` times in transmission, with a reference foil channel."""
    dataset = sample_dataset(root, "Fe_foil", 1)
    reference = reference_spectrum()
    truth = scan_grid()
    rng = np.random.default_rng(seed)
    sample_mu = np.interp(truth, reference.energy, reference.mu)
    for scan in range(1, repeats + 1):
        counters = _counters(truth, reference, sample_mu, rng, flux=2e6)
        counters["energy"] = (truth + MONO_OFFSET_EV) / 1000.0  # Bliss writes keV
        counters["epoch"] = 1.7e9 + np.arange(truth.size) * 0.5
        write_counter_scan(
            dataset,
            scan,
            title=f"contscan energy {truth[0] / 1000:.3f} {truth[-1] / 1000:.3f} {truth.size} 0.5",
            counters=counters,
            positioners={"sx": 0.0, "sy": 0.0},
            duration_s=0.5 * truth.size,
            instrument_metadata={"element": "Fe", "edge": "K"},
        )
    return dataset


def write_spectroscopy_map_sample(
    root: Path,
    spectra: int = 10_000,
    *,
    seed: int = 0,
    block: int = 1000,
    energy_rows: bool = False,
    off_sample: int = 0,
) -> RawDataset:
    """One mapping scan of ``spectra`` spectra (2D counters: spectrum × energy point).

    Each position holds a different mixture of Fe metal and Fe2O3 (when the
    oxide spectrum is available) and a different thickness. Written block by
    block, so memory stays flat however many spectra are asked for.
    ``energy_rows``: the map scanned an energy at a time, as a full-field or line
    detector records it (2D counters: energy point × spectrum, the same numbers).
    ``off_sample``: the first positions are off the sample (air: no edge), as a raster
    that starts beside it; the others are the same numbers.
    """
    import h5py

    dataset = sample_dataset(root, "Fe_map", 1)
    reference = reference_spectrum()
    truth = scan_grid()
    metal = np.interp(truth, reference.energy, reference.mu)
    oxide = (
        metal if reference.other is None else np.interp(truth, reference.energy, reference.other)
    )
    write_counter_scan(
        dataset,
        1,
        title=f"xasmap {spectra} spectra",
        counters={"energy": (truth + MONO_OFFSET_EV) / 1000.0},
        positioners={"sx": 0.0, "sy": 0.0},
        duration_s=0.05 * spectra,
        instrument_metadata={"element": "Fe", "edge": "K"},
    )
    with h5py.File(dataset.raw_file, "a") as h5:
        end_time = h5["1.1/end_time"][()]
        del h5["1.1/end_time"]  # rewritten last, after the counters
        instrument, measurement = h5["1.1/instrument"], h5["1.1/measurement"]
        targets = {}
        for name in ("i0", "it", "iref"):
            group = instrument.create_group(name)
            group.attrs["NX_class"] = "NXdetector"
            shape = (spectra, truth.size)
            chunks = (min(64, spectra), truth.size)
            targets[name] = group.create_dataset(
                "data",
                shape=shape[::-1] if energy_rows else shape,
                dtype="float32",
                chunks=(1, min(spectra, 4096)) if energy_rows else chunks,
            )
            measurement[name] = h5py.SoftLink(f"/1.1/instrument/{name}/data")
        for first in range(0, spectra, block):
            count = min(block, spectra - first)
            rng = np.random.default_rng((seed, first))
            fraction = rng.uniform(0, 1, (count, 1))
            thickness = rng.uniform(0.7, 1.3, (count, 1))
            mu = thickness * (fraction * metal + (1 - fraction) * oxide)
            counters = _counters(truth, reference, mu, rng, flux=5e5)
            off = min(max(off_sample - first, 0), count)
            if off:  # air, drawn apart: the other positions' numbers stay the same
                air = np.random.default_rng((seed, first, 1))
                it = air.poisson(counters["i0"][:off] * 0.9).astype(np.float64)
                counters["it"][:off] = it
                counters["iref"][:off] = _reference_counts(it, truth, reference, air)
            for name, values in counters.items():
                if energy_rows:
                    targets[name][:, first : first + count] = values.T
                else:
                    targets[name][first : first + count] = values
        h5["1.1/end_time"] = end_time
    return dataset
