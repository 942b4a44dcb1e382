"""Facility paths as a worker sees them (``CALYPSO_PATH_MAP``).

A flow is planned where it is submitted, with the facility's paths
(``/data/visitor/...``); a worker on a cluster node may mount the same file
system elsewhere (``/mnt/gpfs/visitor/...``). Chunk tasks translate the paths in
their arguments with the mapping of the process they run in, and translate the
paths they return back, so the flow process reads the part files where it sees them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

Function = TypeVar("Function", bound=Callable[..., Any])


def translate(value: Any, mapping: dict[str, str]) -> Any:
    """``value`` with every path (str or Path, also inside lists, dicts, dataclasses and
    pydantic models) under a mapped prefix moved to its target."""
    if not mapping:
        return value
    from prefect.utilities.collections import visit_collection

    prefixes = sorted(mapping.items(), key=lambda item: -len(item[0]))

    def move(item: Any) -> Any:
        if isinstance(item, str | Path):
            text = str(item)
            for source, target in prefixes:
                if text == source or text.startswith(source.rstrip("/") + "/"):
                    moved = target.rstrip("/") + text[len(source.rstrip("/")) :]
                    return Path(moved) if isinstance(item, Path) else moved
        return item

    return visit_collection(value, visit_fn=move, return_data=True)


def _path_map() -> dict[str, str]:
    """This worker's path map, from its settings as kept (read again only when they
    change, and never in a thread confined to a proposal: its configuration file lies
    outside; :func:`~calypso.registry.access.landlock.current_settings`)."""
    from calypso.registry.access.landlock import current_settings

    return current_settings().path_map


def worker_paths(function: Function) -> Function:
    """Run ``function`` with its arguments' paths as this process sees them, and give its
    result's paths back as the submitter sees them."""

    @functools.wraps(function)
    def on_this_worker(*args: Any, **kwargs: Any) -> Any:
        mapping = _path_map()
        if not mapping:
            return function(*args, **kwargs)
        args, kwargs = translate((args, kwargs), mapping)
        result = function(*args, **kwargs)
        return translate(result, {target: source for source, target in mapping.items()})

    return on_this_worker  # type: ignore[return-value]
