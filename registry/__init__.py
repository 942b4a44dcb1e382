"""Catalogues of processed datasets (embedded SQLite by default) and, later, saved flows."""

from calypso.registry.catalogue import (
    Catalogue,
    ExportRecord,
    ProcessedDataset,
    SQLiteCatalogue,
    open_catalogue,
)

__all__ = ["Catalogue", "ExportRecord", "ProcessedDataset", "SQLiteCatalogue", "open_catalogue"]
