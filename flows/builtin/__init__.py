"""The built-in techniques: one module each, holding the descriptor (what the technique
is), its steps and its sample data, beside its flow as a specification
(``<technique>.yaml``) in the format users save their own flows in.

These modules import nothing heavy at the top: the CLI reads them to build itself.
"""

from calypso.flows.builtin.diffraction import DIFFRACTION
from calypso.flows.builtin.mx import MX
from calypso.flows.builtin.spectroscopy import SPECTROSCOPY
from calypso.flows.builtin.tomography import TOMOGRAPHY

BUILT_IN = (DIFFRACTION, SPECTROSCOPY, TOMOGRAPHY, MX)

__all__ = ["BUILT_IN", "DIFFRACTION", "MX", "SPECTROSCOPY", "TOMOGRAPHY"]
