"""Catalogues of processed datasets (embedded SQLite by default) and, later, saved flows."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from calypso.registry.catalogue import (
        Catalogue,
        ExportRecord,
        ProcessedDataset,
        SQLiteCatalogue,
        open_catalogue,
    )

__all__ = ["Catalogue", "ExportRecord", "ProcessedDataset", "SQLiteCatalogue", "open_catalogue"]


def __getattr__(name: str) -> Any:
    # The catalogue (and with it Calypso's settings and pydantic, ~0.15 s) on first use: a
    # process needing another module of the registry alone (the local server's keeper, which
    # hides its secret from its logs with registry.access.secrets) does without it.
    if name in __all__:
        from calypso.registry import catalogue

        return getattr(catalogue, name)
    raise AttributeError(f"module 'calypso.registry' has no attribute {name!r}")
