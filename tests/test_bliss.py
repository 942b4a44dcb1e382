import shutil

import h5py
import numpy as np
import pytest

from calypso.errors import RawDataError
from calypso.tasks.raw import bliss
from calypso.tasks.raw.frames import hdf5_frame_source, image_files_source, read_frames, read_image


def test_sample_dataset_reads_like_bliss(diffraction_sample):
    raw_file = diffraction_sample.dataset.raw_file
    [scan] = bliss.list_scans(raw_file)
    assert scan.number == 1 and scan.complete
    assert scan.detectors == {"pilatus1m": (12, 1043, 981)}
    assert {"mon", "epoch", "elapsed_time"} <= set(scan.counters)
    assert bliss.read_sample_name(raw_file) == "CeO2"
    assert bliss.missing_frame_sources(raw_file, "/1.1/instrument/pilatus1m/data") == []
    source = hdf5_frame_source(raw_file, "/1.1/instrument/pilatus1m/data")
    frames = read_frames(source, 3, 8)  # spans two Lima files (5 frames each)
    assert frames.shape == (5, 1043, 981) and frames.dtype == np.int32
    lima = raw_file.parent / "scan0001" / "pilatus1m_0001.h5"
    with h5py.File(lima, "r") as h5:
        np.testing.assert_array_equal(frames[2:], h5["/entry_0000/measurement/data"][0:3])
    assert frames.max() > 100 and (frames == -1).any()  # rings and Pilatus gaps


@pytest.fixture
def copied_sample(diffraction_sample, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(diffraction_sample.raw_dataset_dir, target)
    return target / diffraction_sample.dataset.raw_file.name


def test_missing_lima_file_is_an_error_not_zeros(copied_sample):
    (copied_sample.parent / "scan0001" / "pilatus1m_0001.h5").unlink()
    problems = bliss.missing_frame_sources(copied_sample, "/1.1/instrument/pilatus1m/data")
    assert len(problems) == 1 and "pilatus1m_0001.h5 is missing" in problems[0]
    with pytest.raises(RawDataError, match="pilatus1m_0001.h5 is missing.*never read as zeros"):
        bliss.require_frames(copied_sample, "/1.1/instrument/pilatus1m/data")


def test_truncated_lima_file_is_detected(copied_sample):
    lima = copied_sample.parent / "scan0001" / "pilatus1m_0002.h5"
    with h5py.File(lima, "a") as h5:
        data = h5["/entry_0000/measurement/data"][:1]
        del h5["/entry_0000/measurement/data"]
        h5["/entry_0000/measurement/data"] = data
    with pytest.raises(RawDataError, match="holds 1 frames but the scan expects 2"):
        bliss.require_frames(copied_sample, "/1.1/instrument/pilatus1m/data")


def test_real_bliss_files_layout(test_data):
    id11 = test_data / "bliss/id11_demoh5/demoh5_dataset/demoh5_dataset.h5"
    scans = bliss.list_scans(id11)
    assert [(s.number, s.title) for s in scans] == [(1, "loopscan 2 0.1"), (2, "loopscan 5 0.1")]
    assert scans[1].detectors == {"marana": (5, 2048, 2048)}
    assert bliss.read_sample_name(id11) == "demoh5"
    id01 = test_data / "bliss/id01_PTO_STO_SL/PTO_STO_SL_0001/PTO_STO_SL_0001.h5"
    [scan] = bliss.list_scans(id01)
    assert scan.number == 20 and scan.detectors == {"mpx1x4": (51, 516, 516)}
    assert scan.counters["mon1"] == 51 and scan.counters["eta"] == 51
    eta = bliss.read_counter(id01, 20, "eta")
    assert eta[0] == pytest.approx(15.24, abs=0.01) and eta[-1] == pytest.approx(19.24, abs=0.01)


def test_real_bliss_file_without_its_lima_files_is_refused(test_data):
    id11 = test_data / "bliss/id11_demoh5/demoh5_dataset/demoh5_dataset.h5"
    with pytest.raises(RawDataError, match="scan0002/marana_0000.h5 is missing"):
        bliss.require_frames(id11, "/2.1/instrument/marana/data")


def test_not_a_bliss_file(test_data, tmp_path):
    with pytest.raises(RawDataError, match="no scan entries"):
        bliss.list_scans(test_data / "xrd/AgBehenate_228.hdf5")
    text = tmp_path / "notes.h5"
    text.write_text("not hdf5")
    with pytest.raises(RawDataError, match="cannot be opened as HDF5"):
        bliss.list_scans(text)


def test_single_images_through_fabio_and_h5py(test_data):
    tif = image_files_source([test_data / "xrd/CeO2_Pilatus1M.tif"])
    assert tif.shape == (1, 1043, 981)
    assert read_frames(tif, 0, 1).max() == 621698
    cbf = image_files_source([test_data / "mx/thau_3_2_0001.cbf.bz2"])
    assert cbf.shape == (1, 2527, 2463)
    h5 = hdf5_frame_source(test_data / "xrd/AgBehenate_228.hdf5", "/entry/data/data")
    assert read_frames(h5, 0, 1).shape == (1, 195, 487)
    assert read_image(
        f"{test_data / 'xrd/AgBehenate_228.hdf5'}::/entry/data/data", "mask"
    ).shape == (
        195,
        487,
    )


HOLD_FOR_WRITE = """
import sys, time, h5py
h5 = h5py.File(sys.argv[1], "a", libver="latest")  # as a writer between two scans: no SWMR
h5.attrs["writer"] = "between two scans"
h5.flush()
print("held", flush=True)
time.sleep(float(sys.argv[2]))
h5.close()
"""


def _held(path, seconds):
    import subprocess
    import sys

    writer = subprocess.Popen(
        [sys.executable, "-c", HOLD_FOR_WRITE, str(path), str(seconds)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert writer.stdout.readline().strip() == "held"
    return writer


def _dataset_file(folder):
    """A dataset file as Bliss and the acquisition simulator write it (HDF5's latest
    format, whose superblock marks a file open for writing)."""
    path = folder / "sample_0001.h5"
    with h5py.File(path, "w", libver="latest") as h5:
        h5["1.1/title"] = "ct 0.1"
        h5["1.1/sample/name"] = "CeO2"
    return path


def test_a_file_its_writer_holds_between_scans_is_read_once_released(tmp_path):
    """HDF5 refuses any reader of a file open for writing outside SWMR mode (CI saw a live
    tomography preview lost to it): the reader waits for the writer, within a bound."""
    path = _dataset_file(tmp_path)
    writer = _held(path, 1.0)
    try:
        with pytest.raises(OSError, match="already open for write"):
            h5py.File(path, "r", locking=False)  # what HDF5 itself does
        assert bliss.read_sample_name(path) == "CeO2"
    finally:
        assert writer.wait(timeout=30) == 0


def test_a_file_held_for_writing_too_long_is_refused_with_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(bliss, "WRITER_HOLD_S", 0.5)
    path = _dataset_file(tmp_path)
    writer = _held(path, 3.0)
    try:
        with pytest.raises(RawDataError, match=r"held open for writing for 0.5 s.*h5clear -s"):
            bliss.read_sample_name(path)
    finally:
        assert writer.wait(timeout=30) == 0


def test_external_raw_files_are_named_from_their_hdf5_file(tmp_path):
    """Frames stored as HDF5 external raw data (a Lima EDF saving the dataset file refers
    to) with relative names: HDF5 looked for them in the reader's working folder, and the
    run blamed a corrupt detector file. Importing calypso names them from the file."""
    import os
    import subprocess
    import sys

    folder = tmp_path / "RAW_DATA"
    folder.mkdir()
    frames = np.arange(24, dtype=np.uint16).reshape(2, 3, 4)
    frames.tofile(folder / "frames.bin")
    with h5py.File(folder / "scan.h5", "w") as h5:
        h5.create_dataset(
            "data", shape=frames.shape, dtype=frames.dtype,
            external=[("frames.bin", 0, frames.nbytes)],
        )  # fmt: skip
    script = (
        f"import calypso, h5py; print(h5py.File({str(folder / 'scan.h5')!r})['data'][()].sum())"
    )
    env = {k: v for k, v in os.environ.items() if k != "HDF5_EXTFILE_PREFIX"}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0 and done.stdout.strip() == str(frames.sum()), done.stderr[-500:]
