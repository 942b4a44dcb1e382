"""Realistic sample raw data in the ESRF layout, for the demo, tests and benchmarks
(``calypso sample-data TECHNIQUE DIR``): simulated acquisitions with known answers."""
