"""Live diffraction (flows/online/live.py, docs/live.md): the acquisition simulator, a real
writer process, replays a recorded scan at a given frame rate while the live run follows
it, from its growing files or through blissdata on a real valkey server; the result is
the offline run's bit for bit, registered once; an aborted scan gives a result marked
partial; a Lima file that never appears is named after the time-out."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from calypso.errors import RawDataError
from calypso.flows.api import run_technique
from calypso.flows.online import live
from calypso.registry import SQLiteCatalogue
from calypso.techniques.diffraction import DiffractionParameters
from tests.live_servers import LookWatcher, PartialWatcher, replayed

pytestmark = pytest.mark.slow


def parameters(sample) -> DiffractionParameters:
    return DiffractionParameters(
        poni=str(sample.calibration["poni"]),
        mask=str(sample.calibration["mask"]),
        monitor="mon",
        monitor_reference=1e5,
        npt=300,
    )


class Simulator(threading.Thread):
    """The simulator in its own process, as a beamline's writer is: started at once (its
    imports done meanwhile) and told to begin its scan once the live run follows (its
    flow has begun): the scan then runs while the run watches. A process started only
    then could take longer to begin writing, on a loaded machine, than a run with a
    short stall time-out waits for its scan."""

    def __init__(self, source: Path, root: Path, *options: str) -> None:
        super().__init__(daemon=True)
        self.go = Path(tempfile.mkdtemp(prefix="calypso-simulator-")) / "go"
        command = [sys.executable, "-m", "calypso.flows.samples.acquisition_simulator"]
        command += [str(source), str(root), *options, "--start-after", str(self.go)]
        self.process = subprocess.Popen(command)
        self.told = False

    def run(self) -> None:
        deadline = time.monotonic() + 120
        while not live._RUNS and time.monotonic() < deadline:
            time.sleep(0.05)
        if live._RUNS:
            self.go.touch()
            self.told = True

    def wait(self, timeout: float) -> int:
        self.join(timeout)
        if not self.told:
            self.process.kill()
        try:
            assert self.told, "the live run never began"
            return self.process.wait(timeout=timeout)
        finally:
            shutil.rmtree(self.go.parent, ignore_errors=True)  # nothing left in /tmp


def simulate(source: Path, root: Path, *options: str) -> Simulator:
    simulator = Simulator(source, root, *options)
    simulator.start()
    return simulator


def frames_done(h5) -> tuple[str, int]:
    """What a user opening the partial file sees: its status and the frames done."""
    return h5.attrs["status"], int(h5["1.1/pilatus1m_integrate/frames_done"][()])


def datasets(path: str) -> dict[str, bytes]:
    """Every dataset of a NeXus result, as bytes, but for when and by whom it was written
    (``date``, provenance: the flow run's id, the host)."""
    found: dict[str, bytes] = {}

    def visit(name: str, item) -> None:
        if isinstance(item, h5py.Dataset) and "provenance" not in name and name[-4:] != "date":
            found[name] = np.asarray(item[()]).tobytes()

    with h5py.File(path, "r") as h5:
        h5.visititems(visit)
        found["/attrs"] = repr(sorted((k, str(v)) for k, v in h5.attrs.items() if k != "file_time"))
    return found


def assert_as_offline(summary: dict, technique: str, raw_dir, parameters, folder, settings) -> dict:
    """Run the same scan offline into ``folder`` and check that the live result equals it,
    dataset by dataset; the offline run's summary."""
    offline = run_technique(technique, str(raw_dir), parameters, None, str(folder), settings)
    live_sets, offline_sets = (datasets(s["outputs"][0].split("::")[0]) for s in (summary, offline))
    assert live_sets.keys() == offline_sets.keys()
    for name in live_sets:
        assert live_sets[name] == offline_sets[name], name
    return offline


def saved_scan_as_offline(
    sample, tmp_path, settings, blissdata_url, source: str, saving: tuple[str, ...]
) -> list[str]:
    """A 12-frame diffraction scan written by the simulator with Lima's ``saving``
    options, reduced live from its ``source`` (``files`` or ``blissdata``): read during the
    scan, complete, the offline result bit for bit. The names of the scan's Lima files."""
    root = tmp_path / "beamline"
    options = ("--rate", "4", "--start-delay", "1", *saving)
    options += ("--timeline", str(tmp_path / "written.json"))
    if source == "blissdata":
        options += ("--blissdata", blissdata_url)
    writer = simulate(sample.raw_dataset_dir, root, *options)
    raw_dir = replayed(sample, root)
    try:
        summary = live.run_live(
            "diffraction", str(raw_dir), parameters(sample), None, None, settings,
            live={"source": blissdata_url if source == "blissdata" else "files",
                  "stall_timeout": 30, "poll": 0.05},
        )  # fmt: skip
    finally:
        assert writer.wait(timeout=60) == 0
    assert summary["frames"] == 12 and not summary["partial"] and not summary["warnings"]
    timeline = list(live.LAST_TIMELINE)
    assert sum(c["stop"] - c["start"] for c in timeline) == 12
    # Frames handed out while the scan ran (their results may come after it on a loaded
    # machine: test_growing_files_give_the_offline_result_while_the_scan_runs times those).
    last_written = json.loads((tmp_path / "written.json").read_text())["written"][-1]
    assert [c for c in timeline if c["ready"] < last_written], f"none during the scan: {timeline}"
    assert_as_offline(
        summary, "diffraction", raw_dir, parameters(sample), tmp_path / "offline", settings
    )
    return sorted(p.name for p in (raw_dir / "scan0001").iterdir())


def test_growing_files_give_the_offline_result_while_the_scan_runs(
    diffraction_sample, tmp_path, catalogue_path, live_settings
):
    root = tmp_path / "beamline"
    writer = simulate(
        diffraction_sample.raw_dataset_dir, root,
        *("--rate", "2", "--frames-per-file", "4", "--start-delay", "3"),
        *("--timeline", str(tmp_path / "written.json")),
    )  # fmt: skip
    watcher = PartialWatcher(root, frames_done, interval=0.1)
    watcher.start()
    looks = LookWatcher()
    looks.start()
    raw_dir = replayed(diffraction_sample, root)
    try:
        summary = live.run_live(
            "diffraction", str(raw_dir), parameters(diffraction_sample), None, None, live_settings,
            live={"source": "files", "stall_timeout": 30, "poll": 0.05},
        )  # fmt: skip
    finally:
        watcher.done.set()
        assert writer.wait(timeout=60) == 0
    time.sleep(1)  # the look's last word: posted once the drawing under way is done
    looks.done.set()
    looks.join()
    import json

    last_written = json.loads((tmp_path / "written.json").read_text())["written"][-1]
    timeline = list(live.LAST_TIMELINE)
    assert summary["frames"] == 12 and not summary["partial"] and not summary["warnings"]
    assert sum(c["stop"] - c["start"] for c in timeline) == 12
    during = [c for c in timeline if c["done"] < last_written]
    assert during, f"nothing was integrated before the scan ended: {timeline}"
    assert watcher.seen and all(status == "partial" for status, _ in watcher.seen)
    assert not list(root.rglob("*.partial.h5")), "the partial file outlived the result"
    # The Prefect UI showed the partial result as an image while the scan ran; once the
    # scan was reduced, the image gave way to a note (the result's quick look follows).
    drawn = [s for s in looks.looks() if "data:image/png;base64," in s[2]]
    assert drawn and drawn[0][0] < last_written, f"no live quick look during the scan: {looks.seen}"
    png = base64.b64decode(drawn[0][2].split("base64,")[1].split(")")[0])
    assert png.startswith(b"\x89PNG") and "running: " in drawn[0][2]
    assert "The scan has ended" in looks.looks()[-1][2]

    offline = run_technique(
        "diffraction", str(raw_dir), parameters(diffraction_sample), None,
        str(tmp_path / "offline"), live_settings,
    )  # fmt: skip
    live_file, offline_file = (
        summary["outputs"][0].split("::")[0],
        offline["outputs"][0].split("::")[0],
    )
    assert datasets(live_file) == datasets(offline_file)
    for xy in Path(live_file).parent.glob("*.xy"):
        assert xy.read_bytes() == (Path(offline_file).parent / xy.name).read_bytes()
    with h5py.File(live_file) as h5:
        assert "status" not in h5.attrs and "status" not in h5["1.1/pilatus1m_integrate"]
    records = [r for r in SQLiteCatalogue(catalogue_path).list() if r.outputs == summary["outputs"]]
    assert len(records) == 1 and records[0].status == "completed"


def test_an_aborted_scan_on_blissdata_gives_a_result_marked_partial(
    diffraction_sample, tmp_path, catalogue_path, blissdata_url, live_settings
):
    root = tmp_path / "beamline"
    writer = simulate(
        diffraction_sample.raw_dataset_dir, root,
        *("--rate", "8", "--frames-per-file", "3", "--start-delay", "0.5"),
        *("--blissdata", blissdata_url, "--abort-after", "7"),
    )  # fmt: skip
    try:
        summary = live.run_live(
            "diffraction", str(replayed(diffraction_sample, root)), parameters(diffraction_sample),
            None, None, live_settings, live={"source": blissdata_url, "stall_timeout": 30},
        )  # fmt: skip
    finally:
        assert writer.wait(timeout=60) == 0
    assert summary["frames"] == 7 and "USER_ABORT" in summary["partial"]
    assert any("marked partial" in w for w in summary["warnings"])
    record = SQLiteCatalogue(catalogue_path).get(summary["catalogue_id"])
    assert record.message.startswith("partial: ended early (USER_ABORT")  # the record says so
    path = summary["outputs"][0].split("::")[0]
    with h5py.File(path) as h5:
        assert h5.attrs["status"] == "partial"
        process = h5["1.1/pilatus1m_integrate"]
        assert process["status"][()].decode().startswith("partial: ended early (USER_ABORT")
        assert process["integrated/intensity"].shape == (7, 300)
        assert np.isfinite(process["integrated/intensity"][()]).any(axis=1).all()


def test_a_lima_file_that_never_appears_is_named(
    diffraction_sample, tmp_path, catalogue_path, live_settings
):
    """The scan starts (its entry is written), its detector never writes a file."""
    raw = diffraction_sample.dataset.model_copy(update={"root": tmp_path.absolute()})
    raw.raw_dataset_dir.mkdir(parents=True)
    with h5py.File(raw.raw_file, "w") as h5:
        h5["1.1/title"] = "loopscan 12 0.1"
        h5["1.1/start_time"] = "2026-01-01T00:00:00"
    chosen = parameters(diffraction_sample).model_copy(update={"detector": "pilatus1m"})
    began = time.monotonic()
    with pytest.raises(
        RawDataError, match=r"Lima file .*scan0001/pilatus1m_0000.h5 did not appear"
    ):
        live.run_live(
            "diffraction", str(raw.raw_dataset_dir), chosen, None, None, live_settings,
            live={"source": "files", "stall_timeout": 2},
        )  # fmt: skip
    assert time.monotonic() - began < 60
