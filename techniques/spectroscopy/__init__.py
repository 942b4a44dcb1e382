"""X-ray absorption spectroscopy: mu(E), normalisation, EXAFS background and Fourier transform.

Arrays in, arrays out, and every step works on a batch of spectra at once:
``mu`` has shape ``(n_spectra, n_points)`` and ``energy`` either the same
shape or ``(n_points,)`` when the spectra share one grid. Parameter names are
the ones Athena and Larch users know (``e0``, ``pre1``, ``pre2``, ``norm1``,
``norm2``, ``nnorm``, ``nvict``, ``rbkg``, ``kweight``, ``dk``, ``window``);
energies are in eV, relative ranges in eV from E0, k in 1/Å and R in Å.

One module per stage of the reduction:

- :mod:`.absorption`: mu(E) from the counters, checks of a spectrum;
- :mod:`.normalization`: E0, pre-edge line, edge step and post-edge;
- :mod:`.exafs`: AUTOBK background, chi(k), chi(R);
- :mod:`.calibration`: tabulated edges, the reference foil's energy shift;
- :mod:`.merging`: weighted merge of repeated scans, noise estimates;
- :mod:`.reduction`: all of it for a batch (a map's unusable spectra left out);
- :mod:`.parameters`: the flow's parameter model.

Examples
--------
>>> import numpy as np
>>> from calypso.techniques import spectroscopy as xas
>>> energy = np.linspace(6900.0, 7900.0, 501)
>>> mu = 0.2 + 1.5 / (1 + np.exp(-(energy - 7112.0) / 2))
>>> xas.normalize(energy, mu, pre1=-150.0, pre2=-50.0).edge_step.round(2)
array([1.5])
"""

from calypso.techniques.spectroscopy.absorption import (
    BLOCK_ROWS,
    batch_rows,
    check_spectrum,
    fluorescence_mu,
    mono_energy,
    row_blocks,
    transmission_mu,
)
from calypso.techniques.spectroscopy.calibration import (
    calibration_shift,
    guess_edge,
    tabulated_edge,
)
from calypso.techniques.spectroscopy.edge import (
    E0_WINDOW,
    MAX_E0_SPREAD,
    MAX_STEP_TO_RANGE,
    MIN_EDGE_CONTRAST,
    MIN_EDGE_NOISE_RATIO,
    MIN_POST_EDGE_EV,
    MIN_RISE_CONTRAST,
    e0_spread,
    e0_undecided,
    edge_contrast,
    edge_noise_ratio,
    edge_rise,
    find_e0,
    has_edge,
    rise_contrast,
    slopes_cannot_judge,
    step_to_range,
)
from calypso.techniques.spectroscopy.exafs import (
    ETOK,
    KSTEP,
    MIN_EXAFS_K,
    NFFT,
    Exafs,
    Window,
    autobk,
    ft_window,
    k_grid,
    r_grid,
    spectrum_on_k,
    xftf,
)
from calypso.techniques.spectroscopy.merging import (
    MergedSpectrum,
    merge_spectra,
    noise_level,
    spectrum_noise,
)
from calypso.techniques.spectroscopy.normalization import (
    MAX_NNORM,
    EdgeRanges,
    Normalization,
    edge_ranges,
    normalize,
)
from calypso.techniques.spectroscopy.parameters import (
    SpectroscopyExecution,
    SpectroscopyParameters,
    SpectroscopyScience,
    SpectroscopySource,
)
from calypso.techniques.spectroscopy.reduction import (
    BatchReduction,
    NoSpectrumReducible,
    Reduction,
    reduce_spectra,
    unusable_spectra,
)

__all__ = [
    "BLOCK_ROWS",
    "E0_WINDOW",
    "ETOK",
    "KSTEP",
    "MAX_E0_SPREAD",
    "MAX_NNORM",
    "MAX_STEP_TO_RANGE",
    "MIN_EDGE_CONTRAST",
    "MIN_EDGE_NOISE_RATIO",
    "MIN_EXAFS_K",
    "MIN_POST_EDGE_EV",
    "MIN_RISE_CONTRAST",
    "NFFT",
    "BatchReduction",
    "EdgeRanges",
    "Exafs",
    "MergedSpectrum",
    "NoSpectrumReducible",
    "Normalization",
    "Reduction",
    "SpectroscopyExecution",
    "SpectroscopyParameters",
    "SpectroscopyScience",
    "SpectroscopySource",
    "Window",
    "autobk",
    "batch_rows",
    "calibration_shift",
    "check_spectrum",
    "e0_spread",
    "e0_undecided",
    "edge_contrast",
    "edge_noise_ratio",
    "edge_ranges",
    "edge_rise",
    "find_e0",
    "fluorescence_mu",
    "ft_window",
    "guess_edge",
    "has_edge",
    "k_grid",
    "merge_spectra",
    "mono_energy",
    "noise_level",
    "normalize",
    "r_grid",
    "reduce_spectra",
    "rise_contrast",
    "row_blocks",
    "slopes_cannot_judge",
    "spectrum_noise",
    "spectrum_on_k",
    "step_to_range",
    "tabulated_edge",
    "transmission_mu",
    "unusable_spectra",
    "xftf",
]
