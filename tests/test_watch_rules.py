"""Which beamline rule takes which scan (`calypso watch`), read from real dataset files."""

from __future__ import annotations

from datetime import datetime, timedelta

import h5py

from calypso.flows.online.acquisitions import finished_acquisitions
from calypso.flows.samples.diffraction import write_diffraction_sample
from calypso.settings import WatchSettings


def test_a_rule_since_a_time_leaves_the_scans_started_before_it(tmp_path):
    # A rule's parameters changed (or Calypso upgraded) make a new key: without `since`
    # every finished dataset of the beamline was processed again.
    sample = write_diffraction_sample(tmp_path, frames=1)
    with h5py.File(sample.dataset.raw_file, "r") as h5:
        started = datetime.fromisoformat(h5["1.1/start_time"][()].decode())

    def techniques(*rules: dict) -> list[str]:
        settings = WatchSettings.model_validate({"beamlines": {"*": list(rules)}})
        ready, _, _ = finished_acquisitions(sample.dataset.raw_file, settings)
        return [acquisition.technique for acquisition in ready]

    later = {"technique": "diffraction", "since": started + timedelta(minutes=5)}
    earlier = {"technique": "diffraction", "since": started - timedelta(minutes=5)}
    assert techniques(later) == []
    assert techniques(earlier) == ["diffraction"]
    # Left to the rules after it: here a saved flow for the scans before.
    assert techniques(later, {"technique": "flow:old-look"}) == ["flow:old-look"]
    # As a TOML date-time without an offset: local time.
    naive = (started + timedelta(minutes=5)).astimezone().replace(tzinfo=None)
    assert techniques({"technique": "diffraction", "since": naive.isoformat()}) == []
