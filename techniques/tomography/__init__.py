"""Tomographic reconstruction: from projections to slices, on numpy arrays.

Arrays follow the sinogram-chunk layout the tasks read from the raw files:
``projections[angle, row, column]``; reconstructed slices are
``volume[row, y, x]`` on a square grid as wide as the detector, centred on
the rotation axis. Angles are in degrees in the parameters and in radians in
the functions that take arrays.

The steps are the ones of every synchrotron pipeline (ESRF nabu, Diamond
httomo/Savu, APS tomopy), one module each:

- :mod:`.flat_field`: dark/flat correction with flats interpolated between the
  series taken before and after the scan, minus log with a floor;
- :mod:`.rings`: sorting based ring removal (Vo et al. 2018);
- :mod:`.phase`: single-material Paganin phase retrieval (Paganin et al. 2002);
- :mod:`.sinograms`: those steps in order, and binning for previews;
- :mod:`.rotation_axis`: centre of rotation by Vo's double-wedge metric (Vo et al. 2014);
- :mod:`.reconstruction`: filtered back-projection (algotom, numba, CPU or CUDA),
  DFI and, when it is installed, tomopy's gridrec;
- :mod:`.output`: the value range and data type written;
- :mod:`.parameters`: the flow's parameter model.

Examples
--------
>>> import numpy as np
>>> from calypso.techniques import tomography as tomo
>>> angles = np.radians(np.arange(180.0))
>>> sinograms = np.zeros((180, 1, 64), np.float32)
>>> sinograms[:, 0, 28:36] = 1.0  # a centred rod
>>> tomo.reconstruct(sinograms, angles, center=31.5).shape
(1, 64, 64)
"""

from calypso.techniques.tomography.flat_field import (
    DEFAULT_LOG_FLOOR,
    flat_field_correction,
    flat_weights,
    minus_log,
)
from calypso.techniques.tomography.output import auto_range, rescale
from calypso.techniques.tomography.parameters import (
    TomographyExecution,
    TomographyParameters,
    TomographyScience,
    TomographySource,
)
from calypso.techniques.tomography.phase import (
    PLANCK_EV_M,
    paganin_filter,
    paganin_length_px,
    paganin_margin,
)
from calypso.techniques.tomography.reconstruction import (
    ALGORITHMS,
    MAX_EDGE_ARC_PX,
    back_projection_kernel,
    check_angular_sampling,
    filtered_back_projection,
    gpu_available,
    max_angular_step_deg,
    reconstruct,
    serial_back_projection,
    tomopy_available,
)
from calypso.techniques.tomography.rings import remove_rings, ring_filter_size
from calypso.techniques.tomography.rotation_axis import (
    COARSE_SEARCH_WIDTH,
    CenterOfRotation,
    find_center_of_rotation,
    half_turn,
)
from calypso.techniques.tomography.sinograms import bin_sinograms, prepare_sinograms

__all__ = [
    "ALGORITHMS",
    "COARSE_SEARCH_WIDTH",
    "DEFAULT_LOG_FLOOR",
    "MAX_EDGE_ARC_PX",
    "PLANCK_EV_M",
    "CenterOfRotation",
    "TomographyExecution",
    "TomographyParameters",
    "TomographyScience",
    "TomographySource",
    "auto_range",
    "back_projection_kernel",
    "bin_sinograms",
    "check_angular_sampling",
    "filtered_back_projection",
    "find_center_of_rotation",
    "flat_field_correction",
    "flat_weights",
    "gpu_available",
    "half_turn",
    "max_angular_step_deg",
    "minus_log",
    "paganin_filter",
    "paganin_length_px",
    "paganin_margin",
    "prepare_sinograms",
    "reconstruct",
    "remove_rings",
    "rescale",
    "ring_filter_size",
    "serial_back_projection",
    "tomopy_available",
]
