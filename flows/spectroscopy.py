"""The spectroscopy flow: its built-in specification run by the engine (see
:mod:`calypso.flows.builtin.spectroscopy` for its steps)."""

from calypso.flows.builtin.spectroscopy import SPECTROSCOPY
from calypso.flows.engine import technique_flow

spectroscopy = technique_flow(SPECTROSCOPY, __name__)
