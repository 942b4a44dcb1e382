"""The mx flow: its built-in specification run by the engine (see
:mod:`calypso.flows.builtin.mx` for its steps)."""

from calypso.flows.builtin.mx import MX
from calypso.flows.engine import technique_flow

mx = technique_flow(MX, __name__)
