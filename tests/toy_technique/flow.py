"""The toy technique's Prefect flow: its specification run by Calypso's engine."""

from calypso.flows.engine import technique_flow
from toy_technique import FRAME_STATISTICS

frame_statistics = technique_flow(FRAME_STATISTICS, __name__)
