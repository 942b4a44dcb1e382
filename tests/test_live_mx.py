"""Live MX (flows/online/live_mx.py, docs/live.md): the acquisition simulator, a real writer
process, replays the simulated thaumatin grid scan (``calypso sample-data mx``) at a few
images a second while the live run follows its growing files: spots are found while the
grid is scanned, the partial file holds the heat map so far (cells not done NaN) and the
best cell so far, and the result is the offline run's bit for bit, registered once. An
aborted grid scan followed through blissdata gives a result marked partial whose heat map
leaves the cells never imaged NaN."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from calypso.flows.api import run_technique
from calypso.flows.online import live
from calypso.flows.samples.mx import write_mx_sample
from calypso.registry import SQLiteCatalogue
from calypso.techniques.mx import MXParameters
from tests.live_servers import PartialWatcher, replayed
from tests.test_live_flow import datasets, simulate

pytestmark = pytest.mark.slow


ROWS, COLUMNS = GRID = (3, 5)
IMAGES = ROWS * COLUMNS
ABORTED_AFTER = 7  # the first row and two images of the second


@pytest.fixture(scope="module")
def grid_sample(tmp_path_factory):
    """A grid of thaumatin stills as `calypso sample-data mx` writes them, 3x5 (the
    sample's 5x7 takes longer to write and scan), the crystal centred in cell (1, 2)."""
    sample = write_mx_sample(tmp_path_factory.mktemp("visitor"), grid=GRID, crystal_at=(1.2, 2.3))
    assert sample.crystal_cell == (1, 2)
    return sample


def heat_map(h5) -> dict:
    """What a beamline's centring reads of the partial file: its status, images done,
    heat map and best cell."""
    entry = h5["1.1"]
    centring = entry.get("centring")
    return {
        "status": h5.attrs["status"],
        "done": int(entry["spotfinder/images_done"][()]),
        "heat": entry["grid/n_spots"][()],
        "best": (int(centring["row"][()]), int(centring["column"][()]))
        if centring is not None else None,
    }  # fmt: skip


@pytest.mark.parametrize("saving", ["hdf5", "edf", "cbf"])
def test_the_grid_is_centred_while_it_is_scanned(
    grid_sample, tmp_path, catalogue_path, live_settings, saving
):
    """Lima saving HDF5 files (Bliss's default), EDF files (tests/test_live_edf.py) or
    CBF images (tests/test_live_images.py)."""
    root = tmp_path / "beamline"
    writer = simulate(
        grid_sample.raw_dataset_dir, root,
        *("--rate", "4", "--frames-per-file", "5", "--start-delay", "0.5", "--saving", saving),
        *("--timeline", str(tmp_path / "written.json")),
    )  # fmt: skip
    watcher = PartialWatcher(root, heat_map)
    watcher.start()
    raw_dir = replayed(grid_sample, root)
    parameters = MXParameters(mask=str(grid_sample.mask))
    try:
        summary = live.run_live(
            "mx", str(raw_dir), parameters, None, None, live_settings,
            live={"source": "files", "stall_timeout": 30, "poll": 0.05},
        )  # fmt: skip
    finally:
        watcher.done.set()
        assert writer.wait(timeout=60) == 0
    last_written = json.loads((tmp_path / "written.json").read_text())["written"][-1]
    timeline = list(live.LAST_TIMELINE)
    assert summary["count"] == IMAGES and not summary["partial"] and not summary["warnings"]
    assert sorted((c["start"], c["stop"]) for c in timeline)[-1][1] == IMAGES
    assert sum(c["stop"] - c["start"] for c in timeline) == IMAGES
    early = [c for c in timeline if c["done"] < last_written]
    assert early and min(c["start"] for c in early) == 0, f"none before the end: {timeline}"

    # The partial file, as seen while the grid was scanned: the cells not done NaN (scan
    # order: row by row), then the whole map and the cell the result names.
    assert watcher.seen and all(s["status"] == "partial" for s in watcher.seen)
    during = [s for s in watcher.seen if 0 < s["done"] < IMAGES]
    assert during, [s["done"] for s in watcher.seen]
    for snapshot in during:
        not_done = np.isnan(snapshot["heat"]).ravel()
        assert not_done.tolist() == [i >= snapshot["done"] for i in range(IMAGES)]
    complete = [s for s in watcher.seen if s["done"] == IMAGES]
    assert complete and not np.isnan(complete[-1]["heat"]).any()
    best = summary["report"]["scans"][0]["best_position"]
    assert complete[-1]["best"] == (best["row"], best["column"]) == grid_sample.crystal_cell
    assert not list(root.rglob("*.partial.h5")), "the partial file outlived the result"

    offline = run_technique(
        "mx", str(raw_dir), parameters, None, str(tmp_path / "offline"), live_settings
    )
    live_file, offline_file = (s["outputs"][0].split("::")[0] for s in (summary, offline))
    assert datasets(live_file) == datasets(offline_file)
    assert summary["report"] == offline["report"]
    assert Path(summary["png"]).read_bytes() == Path(offline["png"]).read_bytes()
    with h5py.File(live_file) as h5:
        assert "status" not in h5.attrs and "status" not in h5["1.1/spotfinder"]
    records = [r for r in SQLiteCatalogue(catalogue_path).list() if r.outputs == summary["outputs"]]
    assert len(records) == 1 and records[0].status == "completed" and records[0].frames == IMAGES


def test_an_aborted_grid_scan_gives_a_heat_map_marked_partial(
    grid_sample, tmp_path, catalogue_path, blissdata_url, live_settings
):
    root = tmp_path / "beamline"
    writer = simulate(
        grid_sample.raw_dataset_dir, root,
        *("--rate", "10", "--frames-per-file", "5", "--start-delay", "0.5"),
        *("--blissdata", blissdata_url, "--abort-after", str(ABORTED_AFTER)),
    )  # fmt: skip
    try:
        summary = live.run_live(
            "mx", str(replayed(grid_sample, root)), MXParameters(mask=str(grid_sample.mask)),
            None, None, live_settings, live={"source": blissdata_url, "stall_timeout": 30},
        )  # fmt: skip
    finally:
        assert writer.wait(timeout=60) == 0
    assert summary["count"] == ABORTED_AFTER and "USER_ABORT" in summary["partial"]
    assert any("marked partial" in w for w in summary["warnings"])
    path, default = summary["outputs"][0].split("::")
    assert default == "/1.1/grid"
    with h5py.File(path) as h5:
        assert h5.attrs["status"] == "partial"
        entry = h5["1.1"]
        assert entry["spotfinder/status"][()].decode().startswith("partial: ended early (USER")
        assert entry["per_image/n_spots"].shape == (ABORTED_AFTER,)
        heat = entry["grid/n_spots"][()]
        assert heat.shape == GRID
        assert np.isnan(heat).ravel().tolist() == [i >= ABORTED_AFTER for i in range(IMAGES)]
        # The best cell among those imaged, with its motor positions.
        best = summary["report"]["scans"][0]["best_position"]
        assert (entry["centring/row"][()], entry["centring/column"][()]) == (
            best["row"],
            best["column"],
        )
        assert best["frame"] < ABORTED_AFTER and np.isfinite(heat[best["row"], best["column"]])
        assert entry["centring/sy"][()] == pytest.approx(entry["measurement/sy"][best["frame"]])
    records = [r for r in SQLiteCatalogue(catalogue_path).list() if r.outputs == summary["outputs"]]
    assert len(records) == 1 and records[0].frames == ABORTED_AFTER
