"""What a run that died leaves behind, taken back (docs/operations/catalogue.md).

A run killed while it publishes leaves files renamed into place and its record
``publishing``; one killed before leaves its part folder (finished chunks, staged
results) and its record ``running``. Once its lease has run out (or another run took its
claim over), :func:`release` marks its record failed after removing what is provably its
own: each published file that still has the SHA-256 its record gives, and its part
folder. :mod:`calypso.registry.claims` calls it when a run reserves the folder, and
``release_dead`` for every dead record.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
from pathlib import Path


def taken_back(folder: str, checksums: str | None) -> bool:
    """Whether nothing is left in ``folder`` of what a run that died while publishing had
    renamed into place (``checksums``: name -> SHA-256, its record's): each file that
    still has its checksum is that run's own, and is removed; another file of the same
    name (changed, or someone's) stays. Unknown checksums: the folder stays held."""
    from calypso.registry.access.landlock import in_proposal

    names = json.loads(checksums or "{}")
    return bool(names) and in_proposal(folder, _remove_published, folder, names)


def _remove_published(folder: str, names: dict[str, str]) -> bool:
    left = False
    for name, digest in names.items():
        path = os.path.join(folder, name)
        if not os.path.lexists(path):
            continue
        if os.path.islink(path) or not os.path.isfile(path) or file_sha256(path) != digest:
            left = True
            continue
        os.unlink(path)
    return not left


def file_sha256(path: str | Path) -> str:
    """A file's SHA-256, as records keep it for each file they publish."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def remove_part_folder(folder: str, run_id: str | None) -> None:
    """The part folder a dead run left in ``folder`` (its finished chunks, its staged
    results): a later run of its own would take them, and none will come."""
    from calypso.registry.access.landlock import in_proposal
    from calypso.tasks.writers.publication import PARTIAL_PREFIX

    if run_id:
        part = os.path.join(folder, f"{PARTIAL_PREFIX}{run_id}")
        in_proposal(folder, shutil.rmtree, part, True)


def release(db: sqlite3.Connection, holder: sqlite3.Row, folder: str, by: str) -> str:
    """Mark the record of a dead run failed, once none of the files it published is left
    (:func:`taken_back`), and remove its part folder: the record's message; "" (the
    folder stays held) when a file it published has changed since."""
    publishing = holder["status"] == "publishing"
    if publishing and not taken_back(folder, holder["checksums"]):
        return ""
    what = (
        "while publishing its results (the files it had published were removed)"
        if publishing
        else "before publishing its results"
    )
    message = f"flow run {holder['flow_run_id']} stopped {what} (killed, crashed or vanished); {by}"
    db.execute(
        "UPDATE processed_datasets SET status = 'failed', lease_expires = NULL, message = ? "
        "WHERE id = ?",
        (message, holder["id"]),
    )
    remove_part_folder(folder, holder["flow_run_id"])
    return message
