"""Export a processed dataset to object storage (S3 and any other fsspec target).

Each file goes to ``<target>/<path relative to the dataset folder>``, large ones
as multipart uploads (s3fs), several at once. Every object carries the SHA-256
of its content (S3 user metadata ``sha256``), so an interrupted export, run
again, skips the objects already there with the right checksum and sends only
the rest. A manifest in ``sha256sum`` format (``MANIFEST.sha256``) goes last:
its presence means the export is complete, and ``verify`` reads every object
back and checks it against the manifest.

Credentials never appear in a URI, a message, a log or the catalogue: they come
from the settings, a Prefect Secret block or the standard AWS chain.

:mod:`.transfer` sends and checks, :mod:`.records` keeps the books, :mod:`.step` is the
Prefect task a flow runs (imported on its own: ``calypso export`` needs no Prefect).
"""

from calypso.tasks.export.records import (
    dataset_to_export,
    default_export_uri,
    export_summary,
    flow_export_uri,
    record_export,
)
from calypso.tasks.export.transfer import (
    CHECKSUM_KEY,
    MANIFEST_NAME,
    ExportReport,
    LocalFile,
    check_target_uri,
    export_dataset,
    files_to_export,
    open_target,
    sha256_of,
    verify_export,
)

__all__ = [
    "CHECKSUM_KEY",
    "MANIFEST_NAME",
    "ExportReport",
    "LocalFile",
    "check_target_uri",
    "dataset_to_export",
    "default_export_uri",
    "export_dataset",
    "export_summary",
    "files_to_export",
    "flow_export_uri",
    "open_target",
    "record_export",
    "sha256_of",
    "verify_export",
]
