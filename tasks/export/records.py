"""What an export leaves behind: its catalogue record (and ICAT note), the summary a
flow or the CLI reports, and where a flow's results go (``export_to``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from calypso.errors import ExportError
from calypso.settings import CalypsoSettings
from calypso.tasks.export.transfer import ExportReport, check_target_uri

# -- bookkeeping ------------------------------------------------------------------


def record_export(report: ExportReport, record_id: int | None, settings: CalypsoSettings) -> str:
    """Record a finished export in the catalogue (and tell ICAT where the data went, when
    that backend is on); returns a warning, or an empty string."""
    from calypso.registry import open_catalogue
    from calypso.registry.catalogue import ExportRecord

    catalogue = open_catalogue(settings)
    catalogue.record_export(
        ExportRecord(
            record_id=record_id,
            source=report.source,
            uri=report.uri,
            manifest=report.manifest,
            files=report.files,
            bytes=report.bytes,
            uploaded=len(report.uploaded),
            verified=report.verified,
        )
    )
    if record_id is None:
        return ""
    return (
        catalogue.note(
            record_id,
            key=f"export:{record_id}:{report.uri}",
            name=settings.export.icat_field,
            value=f"exported to {report.uri} (SHA-256 manifest {report.manifest})",
        )
        or ""
    )


def dataset_to_export(source: str, settings: CalypsoSettings) -> tuple[Path, Any]:
    """A processed dataset folder, or a catalogue id, as (folder, its catalogue record or
    None). The files are compared with the record as they are sent (``export_dataset``),
    once the caller may read them."""
    from calypso.registry import open_catalogue

    catalogue = open_catalogue(settings)
    if source.isdigit() and not Path(source).exists():
        record = catalogue.get(int(source))
        if record.status != "completed":
            raise ExportError(
                f"catalogue record {source} is a {record.status} run: nothing to export"
            )
        return Path(record.processed_path), record
    folder = Path(source).absolute()
    return folder, catalogue.find_by_processed_path(str(folder))


def flow_export_uri(export_to: str, output_dir: str, raw: Any) -> str:
    """Where a flow run's results go under its ``export_to`` prefix: the data-policy path
    (``proposal/beamline/session/collection/dataset/technique``), or the output folder's
    name for data outside the policy, so runs never overwrite each other."""
    output = Path(output_dir)
    if raw is not None:
        processed_root = raw.session_dir
        parts = [raw.proposal, raw.beamline, raw.session]
        try:
            below = output.relative_to(processed_root).parts[1:]  # drop PROCESSED_DATA
        except ValueError:
            below = (raw.collection, raw.name, output.name)
        return "/".join([check_target_uri(export_to), *parts, *below])
    return f"{check_target_uri(export_to)}/{output.name}"


def default_export_uri(export_root: str, folder: Path, record: Any) -> str:
    """Where ``calypso export`` sends a processed folder without ``--to``: under
    ``export_root``, the data-policy path of its raw dataset (as a flow run's
    ``export_to``), so that two datasets' ``diffraction/`` folders never land in one
    place; a folder outside the policy under the path below its ``PROCESSED_DATA``, else
    under its own name."""
    from calypso.tasks.raw.data_policy import DataPolicyError, RawDataset

    raw = None
    if record is not None and record.raw_dataset:
        try:
            raw = RawDataset.from_path(record.raw_dataset)
        except DataPolicyError:
            raw = None
    if raw is None and "PROCESSED_DATA" in folder.parts[:-1]:
        at = folder.parts.index("PROCESSED_DATA")
        above = folder.parts[max(1, at - 3) : at]  # proposal, beamline, session
        return "/".join([check_target_uri(export_root), *above, *folder.parts[at + 1 :]])
    return flow_export_uri(export_root, str(folder), raw)


def export_summary(report: ExportReport, warning: str = "") -> dict[str, Any]:
    return {
        "uri": report.uri,
        "manifest": report.manifest,
        "files": report.files,
        "bytes": report.bytes,
        "uploaded": len(report.uploaded),
        "already_there": len(report.skipped),
        "verified": report.verified,
        "seconds": round(report.seconds, 3),
        "megabytes_per_s": round(report.megabytes_per_s, 2),
        "warnings": [warning] if warning else [],
    }
