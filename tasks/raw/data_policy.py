"""The ESRF data policy: where raw datasets live and where their results go.

``<root>/<proposal>/<beamline>/<session>/RAW_DATA/<collection>/<collection>_<dataset>/
<collection>_<dataset>.h5``; processed results mirror the same relative path
under ``PROCESSED_DATA/``. The root (``/data/visitor``, an in-house tree, a
test folder) can be anywhere: only the part from the proposal down is fixed.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict

from calypso.errors import DataPolicyError, ParameterError
from calypso.settings import ProcessedDataPolicy


class RawDataset(BaseModel):
    """One raw dataset of the data policy, known from its path alone."""

    model_config = ConfigDict(frozen=True)

    root: Path
    proposal: str
    beamline: str
    session: str
    collection: str
    dataset: str
    raw_dirname: str = "RAW_DATA"
    sample_name: str | None = None

    @property
    def name(self) -> str:
        """``<collection>_<dataset>``, the dataset folder and file stem."""
        return f"{self.collection}_{self.dataset}"

    @property
    def session_dir(self) -> Path:
        return self.root / self.proposal / self.beamline / self.session

    @property
    def raw_dataset_dir(self) -> Path:
        return self.session_dir / self.raw_dirname / self.collection / self.name

    @property
    def raw_file(self) -> Path:
        return self.raw_dataset_dir / f"{self.name}.h5"

    def processed_dataset_dir(
        self, technique: str | None = None, policy: ProcessedDataPolicy | None = None
    ) -> Path:
        """Folder for this dataset's results: the raw path mirrored under PROCESSED_DATA."""
        policy = policy or ProcessedDataPolicy()
        folder = self.session_dir / policy.processed_dirname / self.collection / self.name
        if technique and policy.technique_subdir:
            folder = folder / technique
        return folder

    @classmethod
    def from_path(cls, path: str | Path, raw_dirname: str = "RAW_DATA") -> RawDataset:
        """Parse a raw dataset folder (or its ``.h5`` file) laid out by the data policy.

        Raises
        ------
        DataPolicyError
            When the path does not follow the policy; the message shows the
            expected layout.
        """
        original = Path(path)
        resolved = original.expanduser().absolute()
        parts = list(resolved.parts)
        expected = (
            f"expected <root>/<proposal>/<beamline>/<session>/{raw_dirname}/<collection>/"
            "<collection>_<dataset>[/<collection>_<dataset>.h5]"
        )
        if raw_dirname not in parts:
            raise DataPolicyError(f"{original} is not inside a {raw_dirname} folder: {expected}")
        index = len(parts) - 1 - parts[::-1].index(raw_dirname)
        before, after = parts[:index], parts[index + 1 :]
        if len(before) < 4:
            raise DataPolicyError(
                f"{original}: {raw_dirname} must sit under <proposal>/<beamline>/<session>; "
                f"{expected}"
            )
        names_file = bool(after) and after[-1].endswith((".h5", ".hdf5", ".nxs"))
        file_part = after.pop() if names_file else None
        if len(after) != 2:
            raise DataPolicyError(
                f"{original} does not name one dataset folder under {raw_dirname}: {expected}"
            )
        collection, dataset_dir = after
        prefix = f"{collection}_"
        if not dataset_dir.startswith(prefix) or len(dataset_dir) == len(prefix):
            raise DataPolicyError(
                f"{original}: dataset folder {dataset_dir!r} should be named "
                f"'{collection}_<dataset>' after its collection {collection!r}"
            )
        if file_part is not None and Path(file_part).stem != dataset_dir:
            raise DataPolicyError(
                f"{original}: the dataset file should be {dataset_dir}.h5, not {file_part}"
            )
        return cls(
            root=Path(*before[:-3]),
            proposal=before[-3],
            beamline=before[-2],
            session=before[-1],
            collection=collection,
            dataset=dataset_dir[len(prefix) :],
            raw_dirname=raw_dirname,
        )


def output_folder(
    input_path: str,
    raw: RawDataset | None,
    technique: str,
    output_dir: str | None,
    policy: ProcessedDataPolicy,
) -> Path:
    """Where a run writes: ``output_dir`` if given, else the dataset's PROCESSED_DATA folder.

    Raises
    ------
    ParameterError
        When the input is outside the data policy and no output folder is given.
    """
    if output_dir is not None:
        folder = Path(output_dir).expanduser().absolute()
        if "RAW_DATA" in folder.parts:
            raise ParameterError(
                f"--output {output_dir} is inside a RAW_DATA folder, which holds raw data "
                "only (read-only): leave --output out for the dataset's PROCESSED_DATA "
                "folder, or give one outside RAW_DATA"
            )
        return folder
    if raw is not None:
        return raw.processed_dataset_dir(technique, policy)
    raise ParameterError(
        f"{input_path} is not a raw dataset of the data policy (…/RAW_DATA/<collection>/"
        "<collection>_<dataset>), so there is no PROCESSED_DATA folder to write to: "
        "give --output DIR"
    )
