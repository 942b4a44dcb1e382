"""Live XAS maps (flows/online/live_spectroscopy.py, docs/live.md): the acquisition
simulator, a real writer process, replays a map of spectra (``calypso sample-data
spectroscopy --spectra N``: 2D counters, no detector frames) at 15 spectra a second
while the live run follows the growing dataset file: spectra are normalised while the map
is scanned, the partial file holds the spectra and the map so far (those not done NaN),
and the result is the offline run's bit for bit, registered once. An aborted map gives a
result of the spectra that came, marked partial. Through blissdata (a real valkey
server), the spectra are read from the streams while the dataset file lags them. A map
scanned an energy at a time (every spectrum growing together) is reduced at its end,
each batch once; aborted, over the energies scanned, marked partial."""

from __future__ import annotations

import json
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from calypso.errors import RawDataError
from calypso.flows.online import live
from calypso.flows.samples.spectroscopy import write_spectroscopy_map_sample
from calypso.registry import SQLiteCatalogue
from calypso.tasks.raw.absorption import absorption
from calypso.tasks.raw.live_rows import read_energy_points, read_live_counters
from calypso.techniques.spectroscopy import SpectroscopyParameters
from tests.live_servers import LookWatcher, PartialWatcher, replayed
from tests.test_live_flow import assert_as_offline, simulate

pytestmark = pytest.mark.slow

SPECTRA = 120  # over 64: reduced on the cluster, as a real map is
BATCH = 20  # the live chunks are the result's batches
ABORTED_AFTER = 50


@pytest.fixture(scope="module")
def map_sample(tmp_path_factory):
    """A map of 120 spectra (Fe metal and Fe2O3 mixtures) as `calypso sample-data
    spectroscopy --spectra 120` writes it."""
    return write_spectroscopy_map_sample(tmp_path_factory.mktemp("visitor"), SPECTRA, seed=4)


def follow_map(raw_dir, parameters, live_settings, writer, *watchers, source="files", stall=30):
    """The live run of the map ``writer`` replays into ``raw_dir``: its summary, once the
    writer has ended (and ``watchers`` are told the run is over)."""
    try:
        return live.run_live(
            "spectroscopy", str(raw_dir), parameters, None, None, live_settings,
            live={"source": source, "stall_timeout": stall, "poll": 0.05},
        )  # fmt: skip
    finally:
        for watcher in watchers:
            watcher.done.set()
        assert writer.wait(timeout=60) == 0


def scanned_so_far(h5) -> dict | None:
    """What a user reads of the partial file of a map scanned an energy at a time before
    its end (None once it holds spectra): the mean absorption over the energies so far."""
    xas = h5["1.1/xas"]
    if "scanned" not in xas:
        return None
    return {
        "at": time.time(),
        "status": h5.attrs["status"],
        "points": int(xas["energy_points_done"][()]),
        "spectra": int(xas["spectra_in_mean"][()]),
        "energy": xas["scanned/energy"][()],
        "mu_mean": xas["scanned/mu_mean"][()],
    }


def energy_file(raw_dir: Path) -> Path:
    from calypso.tasks.raw.data_policy import RawDataset

    return RawDataset.from_path(raw_dir).raw_file


def xas_map(h5) -> dict:
    """What a user reads of the partial file: its status, spectra done, fits and map."""
    xas = h5["1.1/xas"]
    return {
        "status": h5.attrs["status"],
        "done": int(xas["spectra_done"][()]),
        "e0": xas["fit/e0"][()],
        "norm": xas["normalized/norm"][()],
        "map": xas["map/edge_step"][()],
    }  # fmt: skip


def test_a_map_is_reduced_while_it_is_scanned(map_sample, tmp_path, catalogue_path, live_settings):
    root = tmp_path / "beamline"
    writer = simulate(
        map_sample.raw_dataset_dir, root,
        *("--rate", "15", "--start-delay", "0.5", "--timeline", str(tmp_path / "written.json")),
    )  # fmt: skip
    watcher = PartialWatcher(root, xas_map)
    watcher.start()
    raw_dir = replayed(map_sample, root)
    parameters = SpectroscopyParameters(batch_size=BATCH)
    summary = follow_map(raw_dir, parameters, live_settings, writer, watcher)
    last_written = json.loads((tmp_path / "written.json").read_text())["written"][-1]
    timeline = list(live.LAST_TIMELINE)
    assert summary["count"] == SPECTRA and not summary["partial"], summary
    assert sum(c["stop"] - c["start"] for c in timeline) == SPECTRA
    early = [c for c in timeline if c["done"] < last_written]
    assert early and min(c["start"] for c in early) == 0, f"none before the end: {timeline}"
    assert summary["live_chunks_kept"] == SPECTRA // BATCH  # no spectrum reduced twice

    # The partial file while the map was scanned: spectra not done NaN, in every array. Its
    # arrays hold the spectra handed to the reduction so far (the file says no total), so
    # a look taken when every one of them is reduced has none NaN; some looks do.
    assert watcher.seen and all(s["status"] == "partial" for s in watcher.seen)
    during = [s for s in watcher.seen if 0 < s["done"] < SPECTRA]
    assert during, [s["done"] for s in watcher.seen]
    for snapshot in during:
        done = np.isfinite(snapshot["e0"])
        assert done.sum() == snapshot["done"]
        assert np.array_equal(np.isfinite(snapshot["map"]), done)
        assert np.isnan(snapshot["norm"][~done]).all() and np.isfinite(snapshot["norm"][done]).all()
    assert any(not np.isfinite(s["e0"]).all() for s in during), [s["done"] for s in during]
    assert not list(root.rglob("*.partial.h5")), "the partial file outlived the result"

    offline = assert_as_offline(
        summary, "spectroscopy", raw_dir, parameters, tmp_path / "offline", live_settings
    )
    live_file = summary["outputs"][0].split("::")[0]
    assert Path(summary["png"]).read_bytes() == Path(offline["png"]).read_bytes()
    with h5py.File(live_file) as h5:
        assert "status" not in h5.attrs and "status" not in h5["1.1/xas"]
    records = [r for r in SQLiteCatalogue(catalogue_path).list() if r.outputs == summary["outputs"]]
    assert len(records) == 1 and records[0].status == "completed" and records[0].frames == SPECTRA


@pytest.mark.parametrize(
    ("sample", "rate", "aborted_after", "spectra", "energies"),
    [
        ("map_sample", 60, ABORTED_AFTER, ABORTED_AFTER, None),
        # scanned an energy at a time: every spectrum stops at 300 of its 415 energies
        ("energy_map_sample", 200, 300, SPECTRA, 300),
    ],
    ids=["a_spectrum_a_point", "an_energy_a_point"],
)
def test_an_aborted_map_gives_a_result_marked_partial(
    sample, rate, aborted_after, spectra, energies, request, tmp_path, catalogue_path,
    live_settings,
):  # fmt: skip
    """A map aborted mid-scan: the spectra that came (or, scanned an energy at a time,
    every spectrum over the energies scanned), marked partial."""
    recorded = request.getfixturevalue(sample)
    root = tmp_path / "beamline"
    writer = simulate(
        recorded.raw_dataset_dir, root,
        *("--rate", str(rate), "--start-delay", "0.5", "--abort-after", str(aborted_after)),
    )  # fmt: skip
    raw_dir = replayed(recorded, root)
    summary = follow_map(raw_dir, SpectroscopyParameters(), live_settings, writer)
    assert summary["count"] == spectra and "USER_ABORT" in summary["partial"]
    assert any("marked partial" in w for w in summary["warnings"])
    path = summary["outputs"][0].split("::")[0]
    with h5py.File(path) as h5:
        assert h5.attrs["status"] == "partial"
        xas = h5["1.1/xas"]
        assert xas["status"][()].decode().startswith("partial: ended early (USER_ABORT)")
        norm = xas["normalized/norm"]
        assert norm.shape[0] == spectra and energies in (None, norm.shape[1])
        assert np.isfinite(xas["fit/e0"][()]).all()
    records = [r for r in SQLiteCatalogue(catalogue_path).list() if r.outputs == summary["outputs"]]
    assert len(records) == 1 and records[0].frames == spectra


FILE_LAG = 40  # points the dataset file's counters trail the streams by


def test_a_map_on_blissdata_is_reduced_from_the_streams_the_file_lags(
    map_sample, tmp_path, catalogue_path, blissdata_url, live_settings
):
    root = tmp_path / "beamline"
    timeline = tmp_path / "written.json"
    writer = simulate(
        map_sample.raw_dataset_dir, root,
        *("--rate", "20", "--start-delay", "0.5", "--timeline", str(timeline)),
        *("--blissdata", blissdata_url, "--file-lag", str(FILE_LAG)),
    )  # fmt: skip
    raw_dir = replayed(map_sample, root)
    parameters = SpectroscopyParameters(batch_size=BATCH)
    summary = follow_map(raw_dir, parameters, live_settings, writer, source=blissdata_url)
    in_file = json.loads(timeline.read_text())["written"]  # when the file got each spectrum
    chunks = list(live.LAST_TIMELINE)
    assert summary["count"] == SPECTRA and not summary["partial"], summary
    assert summary["live_chunks_kept"] == SPECTRA // BATCH  # every spectrum reduced once, live
    # Reduced from the streams: a chunk done before the file held its last spectrum.
    ahead = [c for c in chunks if c["done"] < in_file[c["stop"] - 1]]
    assert ahead, f"no chunk ahead of the file: {chunks}"

    assert_as_offline(
        summary, "spectroscopy", raw_dir, parameters, tmp_path / "offline", live_settings
    )
    records = [r for r in SQLiteCatalogue(catalogue_path).list() if r.outputs == summary["outputs"]]
    assert len(records) == 1 and records[0].frames == SPECTRA


@pytest.fixture(scope="module")
def energy_map_sample(tmp_path_factory):
    """The same map scanned an energy at a time (2D counters: energy point x spectrum),
    as `calypso sample-data spectroscopy --spectra 120 --energy-rows` writes it."""
    folder = tmp_path_factory.mktemp("visitor")
    return write_spectroscopy_map_sample(folder, SPECTRA, seed=4, energy_rows=True)


@pytest.mark.parametrize("source", ["files", "blissdata"])
def test_a_map_scanned_an_energy_at_a_time_is_reduced_at_its_end(
    energy_map_sample, source, request, tmp_path, catalogue_path, live_settings, caplog
):
    """Every spectrum grows an energy point at a time: none is whole before the scan ends.
    The live run follows the energy points (no stall while they come): meanwhile the
    partial file holds the mean absorption of the map's spectra over the energies scanned
    so far, drawn in the Prefect UI. It reduces the map once it has ended, in the offline
    run's batches (each reduced once), and gives the offline result; through blissdata
    too, where the file is followed."""
    root = tmp_path / "beamline"
    timeline = tmp_path / "written.json"
    url = request.getfixturevalue("blissdata_url") if source == "blissdata" else None
    writer = simulate(
        energy_map_sample.raw_dataset_dir, root,
        *("--rate", "100", "--start-delay", "0.5", "--timeline", str(timeline)),
        *(("--blissdata", url) if url else ()),
    )  # fmt: skip
    watcher = PartialWatcher(root, scanned_so_far)
    watcher.start()
    looks = LookWatcher()
    looks.start()
    raw_dir = replayed(energy_map_sample, root)
    parameters = SpectroscopyParameters()
    summary = follow_map(
        raw_dir, parameters, live_settings, writer, watcher, looks, source=url or "files", stall=3
    )
    written = json.loads(timeline.read_text())["written"]
    assert len(written) == 415  # the energy points, 4 s at 100 a second: over the stall time-out
    chunks = list(live.LAST_TIMELINE)
    assert summary["count"] == SPECTRA and not summary["partial"], summary
    assert chunks and min(c["ready"] for c in chunks) >= written[-1]  # whole at the end only
    assert summary["live_chunks_kept"] == len(chunks) == summary["tasks"]  # each reduced once
    said = "scan 1 is scanned an energy at a time: every spectrum is whole only at its end"
    assert any(said in record.getMessage() for record in caplog.records)  # the run's log says

    # While the energies were scanned: the map's mean absorption over those scanned so far,
    # as the offline reader's counters give it, marked partial; drawn in the Prefect UI.
    during = [s for s in watcher.seen if s and s["at"] < written[-1]]
    assert len(during) >= 2 and all(s["status"] == "partial" for s in during), watcher.seen
    assert len({s["points"] for s in during}) >= 2 and max(s["points"] for s in during) < 415
    counters = read_live_counters(energy_file(raw_dir), 1, 0, SPECTRA, True)
    whole = absorption(counters, parameters)
    for snapshot in during:
        points = snapshot["points"]
        assert snapshot["spectra"] == SPECTRA
        assert np.array_equal(snapshot["energy"], whole.energy[:points])
        assert np.allclose(snapshot["mu_mean"], whole.mu[:, :points].mean(axis=0), rtol=1e-12)
    assert not list(root.rglob("*.partial.h5")), "the partial file outlived the result"
    drawn = [s for s in looks.looks() if "data:image/png;base64," in s[2] and s[0] < written[-1]]
    assert drawn and "energy points scanned" in drawn[0][2], looks.seen

    assert_as_offline(
        summary, "spectroscopy", raw_dir, parameters, tmp_path / "offline", live_settings
    )
    records = [r for r in SQLiteCatalogue(catalogue_path).list() if r.outputs == summary["outputs"]]
    assert len(records) == 1 and records[0].frames == SPECTRA


def test_a_look_at_a_large_map_averages_an_even_sample_of_its_spectra(energy_map_sample):
    """What the look at a map scanned an energy at a time reads, whatever the map's size:
    the energy points so far of at most the asked number of spectra, one in every few."""
    path = energy_file(energy_map_sample.raw_dataset_dir)
    whole = read_live_counters(path, 1, 0, SPECTRA, True)
    sample = read_energy_points(path, 1, 100, 30)  # 120 spectra: one in 4
    assert np.array_equal(sample.columns["energy"], whole.columns["energy"][:100])
    for name in ("i0", "it"):
        assert np.array_equal(sample.columns[name], whole.columns[name][::4, :100])
    assert read_energy_points(path, 1, 415, 2000).columns["it"].shape == (SPECTRA, 415)
    with pytest.raises(RawDataError, match="first 416 energy points cannot be read"):
        read_energy_points(path, 1, 416, 2000)


def test_a_map_whose_first_pixels_are_off_the_sample_is_followed(tmp_path_factory, tmp_path,
                                                                  live_settings):  # fmt: skip
    """The map's first spectra have no edge (off the sample): the live run waits for one
    it can plan on instead of failing, leaves those out as offline, and gives the offline
    result."""
    visitor = tmp_path_factory.mktemp("visitor")
    sample = write_spectroscopy_map_sample(visitor, 60, seed=4, off_sample=6)  # air: no edge
    root = tmp_path / "beamline"
    writer = simulate(sample.raw_dataset_dir, root, "--rate", "20", "--start-delay", "0.5")
    raw_dir = replayed(sample, root)
    parameters = SpectroscopyParameters(batch_size=BATCH)
    summary = follow_map(raw_dir, parameters, live_settings, writer)
    assert summary["count"] == 60 and not summary["partial"], summary
    assert summary["key_figures"]["1.1"]["spectra_skipped"] == 6
    assert_as_offline(
        summary, "spectroscopy", raw_dir, parameters, tmp_path / "offline", live_settings
    )


@pytest.mark.parametrize("layout", ["a spectrum a row", "an energy point a row"])
def test_a_map_with_an_mca_a_point_is_followed(tmp_path, layout):
    """A map that records an MCA a point too (a 2D counter of its channels' width) was
    never followed from its file: the MCA's width stood for the spectrum's, and no
    spectrum ever seemed whole (a helper's trial). Only the spectra's counters count."""
    from calypso.tasks.raw.live_rows import CounterRows

    spectra, points, channels = 6, 40, 256
    raw_file = tmp_path / "Fe_map_0001.h5"
    rows = spectra if layout == "a spectrum a row" else points
    width = points if layout == "a spectrum a row" else spectra
    with h5py.File(raw_file, "w") as h5:
        measurement = h5.create_group("1.1/measurement")
        measurement["energy_enc"] = np.linspace(7000.0, 7200.0, points)
        for name in ("i0", "it"):
            measurement[name] = np.ones((rows, width))
        measurement["mca"] = np.ones((rows, channels))
        h5["1.1/end_time"] = "2026-12-07T08:00:00"
    scan = CounterRows(raw_file, 1, stall_timeout=5)
    assert scan.ready() == [(0, spectra)] and scan.finished
    assert scan.info.counters == ("i0", "it")
