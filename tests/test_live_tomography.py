"""Live tomography (flows/online/live_tomography.py, docs/live.md): the acquisition
simulator replays a phantom dataset (darks, flats, projections, flats) scan after scan
while the live run follows it from its growing files. The preview (centre of rotation,
slices) is in the partial file before the dataset has ended; the result is the offline
run's, bit for bit; projections that stop short of a half turn are refused by name."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from calypso.errors import RawDataError
from calypso.flows.api import run_technique
from calypso.flows.online import live
from calypso.flows.samples.tomography import write_tomography_sample
from calypso.techniques.tomography import TomographyParameters
from tests.live_servers import PartialWatcher, replayed
from tests.test_live_flow import datasets, simulate

pytestmark = pytest.mark.slow

SEQUENCE = ("--scan", "1", "--scan", "2", "--scan", "3", "--scan", "4")


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    root = tmp_path_factory.mktemp("visitor")
    return write_tomography_sample(root, rows=8, columns=96, projections=180)


@pytest.mark.parametrize("saving", ["hdf5", "edf", "tiff"])
def test_the_preview_comes_before_the_dataset_ends_and_the_result_is_offline(
    phantom, tmp_path, catalogue_path, live_settings, saving
):
    """Lima saving HDF5 files (Bliss's default), EDF files (tests/test_live_edf.py) or
    TIFF images (tests/test_live_images.py)."""
    root = tmp_path / "beamline"
    raw_dir = replayed(phantom, root)
    raw_file = raw_dir / f"{raw_dir.name}.h5"

    def look(h5) -> tuple[str, int, float, bool]:
        """What a user opening the partial file sees, and whether the dataset had ended."""
        entry = h5[h5.attrs["default"]]
        with h5py.File(raw_file, "r", locking=False) as raw:
            flats_after_ended = "4.1" in raw and "end_time" in raw["4.1"]
        return (
            h5.attrs["status"],
            int(entry["projections"][()]),
            float(entry["center_of_rotation"][()]),
            flats_after_ended,
        )

    writer = simulate(
        phantom.raw_dataset_dir, root,
        *SEQUENCE, "--rate", "60", "--frames-per-file", "50", "--gap", "3",
        "--start-delay", "1", "--saving", saving,
    )  # fmt: skip
    watcher = PartialWatcher(root, look, interval=0.1)
    watcher.start()
    try:
        summary = live.run_live(
            "tomography", str(raw_dir), TomographyParameters(), None, None, live_settings,
            live={"source": "files", "stall_timeout": 30, "poll": 0.05, "end_timeout": 3},
        )  # fmt: skip
    finally:
        watcher.done.set()
        assert writer.wait(timeout=60) == 0
    assert not summary["partial"] and not summary["warnings"]
    early = [seen for seen in watcher.seen if not seen[3]]
    assert early, f"no preview before the flats after the projections ended: {watcher.seen}"
    status, projections, center, _ = early[0]
    assert status == "partial" and projections in (179, 180)  # a half turn, as offline counts
    assert abs(center - phantom.geometry.center_of_rotation) < 0.5
    assert not list(root.rglob("*.partial.h5")), "the partial file outlived the result"

    offline = run_technique(
        "tomography", str(raw_dir), TomographyParameters(), None, str(tmp_path / "offline"),
        live_settings,
    )  # fmt: skip
    live_file, offline_file = (
        summary["outputs"][0].split("::")[0],
        offline["outputs"][0].split("::")[0],
    )
    ours, theirs = datasets(live_file), datasets(offline_file)
    assert ours == theirs
    with h5py.File(live_file) as h5:
        assert "status" not in h5.attrs
        volume = h5[summary["outputs"][0].split("::")[1]][()]
    assert volume.shape == (8, 96, 96) and np.isfinite(volume).all()


def test_projections_aborted_short_of_a_half_turn_on_blissdata_are_refused_by_name(
    phantom, tmp_path, catalogue_path, blissdata_url, live_settings
):
    root = tmp_path / "beamline"
    writer = simulate(
        phantom.raw_dataset_dir, root,
        "--scan", "1", "--scan", "2", "--scan", "3", "--rate", "100", "--frames-per-file", "50",
        "--abort-after", "120", "--blissdata", blissdata_url,
    )  # fmt: skip
    try:
        with pytest.raises(RawDataError, match=r"ended early \(USER_ABORT\).*120 projections"):
            live.run_live(
                "tomography", str(replayed(phantom, root)), TomographyParameters(), None, None,
                live_settings, live={"source": blissdata_url, "stall_timeout": 30, "poll": 0.05},
            )  # fmt: skip
    finally:
        assert writer.wait(timeout=60) == 0


def test_a_full_turn_gets_its_preview_half_way_and_an_abort_past_it_a_partial_volume(
    tmp_path_factory, tmp_path, catalogue_path, live_settings
):
    full_turn = write_tomography_sample(
        tmp_path_factory.mktemp("visitor"), rows=8, columns=96, projections=360, turn_deg=360
    )
    root = tmp_path / "beamline"
    writer = simulate(
        full_turn.raw_dataset_dir, root,
        "--scan", "1", "--scan", "2", "--scan", "3", "--rate", "100", "--frames-per-file", "50",
        "--abort-after", "250", "--timeline", str(tmp_path / "written.json"),
    )  # fmt: skip
    watcher = PartialWatcher(root, lambda h5: int(h5[h5.attrs["default"]]["projections"][()]))
    watcher.start()
    try:
        summary = live.run_live(
            "tomography", str(replayed(full_turn, root)), TomographyParameters(), None, None,
            live_settings, live={"source": "files", "stall_timeout": 30, "poll": 0.05},
        )  # fmt: skip
    finally:
        watcher.done.set()
        assert writer.wait(timeout=60) == 0
    assert watcher.seen and 179 <= watcher.seen[0] < 250, watcher.seen  # half-way
    assert "USER_ABORT" in summary["partial"]
    assert any("marked partial" in w for w in summary["warnings"])
    path, volume_path = summary["outputs"][0].split("::")
    with h5py.File(path) as h5:
        assert h5.attrs["status"] == "partial"
        assert h5[h5.attrs["default"]]["status"][()].decode().startswith("partial: ended early")
        volume = h5[volume_path][()]
    assert volume.shape == (8, 96, 96) and np.isfinite(volume).all()


def test_a_run_started_after_the_projections_on_blissdata_reads_their_files(
    phantom, tmp_path, catalogue_path, blissdata_url, live_settings
):
    """A live run the service starts may come late: once another scan has followed the
    projection scan, the stream server no longer hands it out; its files are whole."""
    import subprocess
    import sys

    root = tmp_path / "beamline"
    command = [sys.executable, "-m", "calypso.flows.samples.acquisition_simulator"]
    subprocess.run(
        [*command, str(phantom.raw_dataset_dir), str(root), *SEQUENCE, "--rate", "500",
         "--frames-per-file", "50", "--blissdata", blissdata_url],
        check=True, timeout=60,
    )  # fmt: skip
    summary = live.run_live(
        "tomography", str(replayed(phantom, root)), TomographyParameters(), None, None,
        live_settings, live={"source": blissdata_url, "stall_timeout": 30, "poll": 0.05},
    )  # fmt: skip
    assert summary["count"] == 8 and not summary["partial"] and not summary["warnings"]
