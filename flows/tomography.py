"""The tomography flow: its built-in specification run by the engine (see
:mod:`calypso.flows.builtin.tomography` for its steps)."""

from calypso.flows.builtin.tomography import TOMOGRAPHY
from calypso.flows.engine import technique_flow

tomography = technique_flow(TOMOGRAPHY, __name__)
