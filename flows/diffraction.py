"""The diffraction flow: its built-in specification run by the engine (see
:mod:`calypso.flows.builtin.diffraction` for its steps)."""

from calypso.flows.builtin.diffraction import DIFFRACTION
from calypso.flows.engine import technique_flow

diffraction = technique_flow(DIFFRACTION, __name__)
