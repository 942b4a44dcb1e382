from pathlib import Path

import pytest

from calypso.errors import DataPolicyError
from calypso.settings import ProcessedDataPolicy
from calypso.tasks.raw.data_policy import RawDataset

RAW = "/data/visitor/ma1234/id11/20261125/RAW_DATA/sampleA/sampleA_0002"


@pytest.mark.parametrize("path", [RAW, RAW + "/sampleA_0002.h5", RAW + "/"])
def test_dataset_is_known_from_its_path(path):
    raw = RawDataset.from_path(path)
    assert (raw.proposal, raw.beamline, raw.session) == ("ma1234", "id11", "20261125")
    assert (raw.collection, raw.dataset, raw.name) == ("sampleA", "0002", "sampleA_0002")
    assert raw.root == Path("/data/visitor")
    assert raw.raw_dataset_dir == Path(RAW)
    assert raw.raw_file == Path(RAW) / "sampleA_0002.h5"


def test_processed_data_mirrors_raw_data():
    raw = RawDataset.from_path(RAW)
    mirrored = Path("/data/visitor/ma1234/id11/20261125/PROCESSED_DATA/sampleA/sampleA_0002")
    assert raw.processed_dataset_dir() == mirrored
    assert raw.processed_dataset_dir("diffraction") == mirrored / "diffraction"
    nobackup = ProcessedDataPolicy(processed_dirname="NOBACKUP", technique_subdir=False)
    assert raw.processed_dataset_dir("diffraction", nobackup) == Path(
        "/data/visitor/ma1234/id11/20261125/NOBACKUP/sampleA/sampleA_0002"
    )


def test_policy_holds_wherever_the_tree_is_mounted():
    raw = RawDataset.from_path("/mnt/gpfs/visitor/ma1234/id11/20261125/RAW_DATA/s/s_1")
    assert raw.root == Path("/mnt/gpfs/visitor")
    assert raw.dataset == "1"


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/tmp/somewhere/file.h5", "not inside a RAW_DATA folder"),
        ("/RAW_DATA/s/s_1", "must sit under <proposal>/<beamline>/<session>"),
        ("/data/visitor/ma1234/id11/20261125/RAW_DATA/sampleA", "does not name one dataset"),
        ("/data/visitor/ma1234/id11/20261125/RAW_DATA/sampleA/other_0001", "should be named"),
        (RAW + "/wrong.h5", "should be sampleA_0002.h5"),
    ],
)
def test_paths_outside_the_policy_are_explained(path, message):
    with pytest.raises(DataPolicyError, match=message) as error:
        RawDataset.from_path(path)
    assert "<collection>" in str(error.value) or "should be" in str(error.value)
