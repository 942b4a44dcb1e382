"""The versions of a dataset's results: every run's record, grouped by the result it makes
(technique, folder, file), each checked against the files it lists, and old ones pruned.

A rerun writes beside the older results (``<folder>_v2``, ``_v3`` ...: see
:mod:`calypso.registry.claims`), so each record keeps describing its own files; the
SHA-256 of every file published is in the record, which :func:`verify` compares.
"""

from __future__ import annotations

import json
import os
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from calypso.registry.claims import canonical, transaction, version_base
from calypso.registry.leftovers import file_sha256

if TYPE_CHECKING:
    from calypso.registry.catalogue import ProcessedDataset, SQLiteCatalogue


@dataclass
class Family:
    """The versions of one result: same technique, planned folder and result file."""

    technique: str
    folder: str
    file: str | None
    records: list[ProcessedDataset] = field(default_factory=list)

    @property
    def completed(self) -> list[ProcessedDataset]:
        return [r for r in self.records if r.status == "completed"]


def records_of(catalogue: SQLiteCatalogue, dataset: str | Path) -> list[ProcessedDataset]:
    """Every record of a raw dataset (its folder, or its Bliss file), or of results inside a
    processed folder, oldest first."""
    path = canonical(dataset)
    if os.path.isfile(path) and path.endswith((".h5", ".hdf5", ".nxs")):
        path = os.path.dirname(path)  # a Bliss dataset file: its dataset folder
    with catalogue._connect() as db:
        rows = db.execute(
            "SELECT * FROM processed_datasets WHERE raw_dataset = ? OR processed_path = ? "
            "OR processed_path LIKE ? ESCAPE '\\' ORDER BY id",
            (path, path, _like_prefix(path)),
        ).fetchall()
    return [catalogue._record(row) for row in rows]


def _like_prefix(path: str) -> str:
    escaped = path.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.rstrip("/") + "/%"


def families(records: list[ProcessedDataset]) -> list[Family]:
    """Records grouped by the result they make, in the order each was first made."""
    found: dict[tuple, Family] = {}
    for record in records:
        name = Path(record.output_file).name if record.output_file else None
        key = (record.technique, version_base(record), name)
        found.setdefault(key, Family(*key)).records.append(record)
    return list(found.values())


def verify(record: ProcessedDataset) -> list[str]:
    """What no longer matches a record: files missing or changed since it was published
    (empty: all there, as recorded). A record made before checksums says so."""
    if not record.checksums:
        return ["no checksums recorded (made before versions)"]
    problems = []
    for name, expected in sorted(record.checksums.items()):
        path = Path(record.processed_path) / name
        try:
            found = file_sha256(path)
        except OSError:
            problems.append(f"missing {name}")
            continue
        if found != expected:
            problems.append(f"changed {name}")
    return problems


def prunable(family: Family, keep: int) -> list[ProcessedDataset]:
    """The records whose files go when only the latest ``keep`` completed versions stay:
    older completed ones, and publications that stopped half-way."""
    completed = family.completed
    # a record made before checksums lists no files: nothing could be removed safely
    old = [r for r in completed[: max(0, len(completed) - keep)] if r.checksums]
    stopped = [r for r in family.records if r.status == "publishing" and r.checksums]
    newest = max((r.id or 0 for r in completed), default=0)
    return old + [r for r in stopped if (r.id or 0) < newest]


def prune(catalogue: SQLiteCatalogue, record: ProcessedDataset) -> list[str]:
    """Remove the files a record lists (nothing else: another result may share its folder),
    then the folders they leave empty; the record says it was pruned. Returns the paths
    removed."""
    folder = Path(record.processed_path)
    removed = []
    for name in sorted(record.checksums):
        path = folder / name
        if path.is_file() or path.is_symlink():
            path.unlink()
            removed.append(str(path))
    for name in sorted(record.checksums, key=lambda n: -len(Path(n).parts)):
        for parent in Path(name).parents:
            _remove_if_empty(folder / parent)
    with transaction(catalogue) as db:
        db.execute(
            "UPDATE processed_datasets SET status = 'pruned', message = ? WHERE id = ?",
            (
                json.dumps({"pruned_files": len(removed), "was": record.status}),
                record.id,
            ),
        )
    return removed


def _remove_if_empty(folder: Path) -> None:
    with suppress(OSError):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def removed_with(catalogue: SQLiteCatalogue, folder: str | Path, why: str) -> int:
    """Records of results under ``folder``, which was removed whole (its files gone), say
    so: status ``pruned`` (they hold no version folder any more), ``why`` in their message.
    Returns how many."""
    path = canonical(folder)
    with transaction(catalogue) as db:
        changed = db.execute(
            "UPDATE processed_datasets SET status = 'pruned', message = ? WHERE status IN "
            "('completed', 'failed', 'publishing') AND (processed_path = ? OR processed_path "
            "LIKE ? ESCAPE '\\')",
            (json.dumps({"removed_with": path, "why": why}), path, _like_prefix(path)),
        )
        return changed.rowcount
