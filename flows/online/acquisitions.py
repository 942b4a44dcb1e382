"""Finished acquisitions in RAW_DATA trees, and which technique flow reduces each.

Everything here reads the file server only (read-only, HDF5 locking off), by
polling: inotify does not see writes made by other clients of GPFS or NFS.

A scan is finished when Bliss wrote its ``end_time`` and every detector frame
it refers to is on disk (Lima files complete), or when its dataset has been
quiet (no file changed) for ``quiet_s``. A rule of the beamline's configuration
says which technique reduces it, with which default parameters.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from calypso.errors import DataPolicyError
from calypso.settings import WatchRule, WatchSettings
from calypso.tasks.raw.bliss import list_scans, missing_frame_sources
from calypso.tasks.raw.data_policy import RawDataset
from calypso.tasks.raw.lima_saving import lima_detectors

EVENT = "calypso.acquisition.completed"
# A scan has started and a live flow follows it (flows/online/scan_starts.py): the same
# processing key as its completed event, so that one run processes the scan.
LIVE_EVENT = "calypso.acquisition.started"
# Event ids are derived from the processing key: the same acquisition, technique,
# flow version and parameters always give the same event, which Prefect accepts once.
_EVENT_NAMESPACE = uuid.UUID("5b0b8a8e-6d1c-4a43-9a55-3a7c2f1c0c11")


@dataclass(frozen=True)
class Acquisition:
    """Work for a technique flow: a raw dataset (some scans or all) and its parameters."""

    raw_dataset_dir: str
    technique: str
    scans: tuple[int, ...] | None  # None: the whole dataset
    parameters: dict[str, Any]
    beamline: str
    proposal: str

    @property
    def saved_flow(self) -> str | None:
        """The saved user flow's name, for a rule ``technique = "flow:NAME"``."""
        return self.technique.removeprefix("flow:") if self.technique.startswith("flow:") else None

    def key(self, flow_version: str) -> str:
        """What makes a processing unique: the same key is processed once."""
        return processing_key(
            self.raw_dataset_dir, self.scans, self.technique, flow_version, self.parameters
        )

    def event(self, flow_version: str) -> dict[str, Any]:
        """The Prefect event announcing it (JSON, as ``POST /api/events`` takes it)."""
        key = self.key(flow_version)
        scans = ",".join(map(str, self.scans)) if self.scans else "all"
        return {
            "id": str(uuid.uuid5(_EVENT_NAMESPACE, key)),
            "occurred": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "event": EVENT,
            "resource": {
                "prefect.resource.id": f"calypso.dataset.{self.raw_dataset_dir}#{scans}",
                "prefect.resource.name": f"{Path(self.raw_dataset_dir).name} scan {scans}",
                # a saved user flow is run by its own deployment (flow `saved-flow`)
                "calypso.technique": "saved-flow" if self.saved_flow else self.technique,
                "calypso.beamline": self.beamline,
                "calypso.proposal": self.proposal,
            }
            | ({"calypso.flow": self.saved_flow} if self.saved_flow else {}),
            "payload": {
                "raw": self.raw_dataset_dir,
                "scans": list(self.scans) if self.scans else None,
                "parameters": self.parameters,
                "key": key,
                "flow_version": flow_version,
                "flow": self.saved_flow,
            },
            "related": [],
        }

    def live_event(self, flow_version: str, source: str, scan_key: str) -> dict[str, Any]:
        """The event that starts the live run following the scan in progress: its payload
        says where the scan is followed (``source``: the blissdata server, no password;
        ``scan_key``: the scan there). Its id differs from the completed event's (both
        derive from the key), or Prefect would drop the completed event a crashed live run
        needs."""
        event = self.event(flow_version)
        key = event["payload"]["key"]
        return event | {
            "id": str(uuid.uuid5(_EVENT_NAMESPACE, f"live:{key}")),
            "event": LIVE_EVENT,
            "payload": event["payload"] | {"source": source, "scan_key": scan_key},
        }


def live_deployment(technique: str) -> str:
    """The name of the flow and deployment of ``technique``'s live runs under serve."""
    return f"{technique}-live"


def is_live(event: dict[str, Any] | None) -> bool:
    """Whether an announcement's event starts a live run (rather than a finished scan's)."""
    return bool(event) and event.get("event") == LIVE_EVENT


def processing_key(
    raw: str,
    scans: tuple[int, ...] | list[int] | None,
    technique: str,
    flow_version: str,
    parameters: dict[str, Any],
) -> str:
    """The same for the same work, however its raw path is spelled (``..``, a symlinked
    root): the path is canonical (real), as in the catalogue's records."""
    identity = {
        "raw": os.path.realpath(raw),
        "scans": sorted(scans) if scans else None,
        "technique": technique,
        "flow_version": flow_version,
        "parameters": parameters,
    }
    text = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def bliss_files(root: Path) -> Iterator[Path]:
    """Dataset files of the data policy under ``root`` (any level down to a session):
    ``.../RAW_DATA/<collection>/<collection>_<dataset>/<collection>_<dataset>.h5``."""
    for folder, subfolders, _ in os.walk(root):
        here = Path(folder)
        if here.name == "RAW_DATA":
            subfolders[:] = []  # scan folders of Lima files are never walked
            for collection in _subfolders(here):
                for dataset in _subfolders(collection):
                    candidate = dataset / f"{dataset.name}.h5"
                    if candidate.is_file():
                        yield candidate
        else:
            subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))


def _subfolders(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []


def last_change(dataset_dir: Path) -> float:
    """Latest modification time of the dataset folder's files (Lima scan folders too)."""
    latest = dataset_dir.stat().st_mtime
    for folder, _, names in os.walk(dataset_dir):
        for name in names:
            try:
                latest = max(latest, os.stat(os.path.join(folder, name)).st_mtime)
            except OSError:  # removed while we looked
                continue
    return latest


@dataclass(frozen=True)
class ScanState:
    number: int
    title: str
    detectors: tuple[str, ...]
    finished: bool
    started: datetime | None = None  # its start_time; None: not said (a rule's since not asked)


def start_time(text: str | None) -> datetime | None:
    """A scan's ``start_time`` (ISO 8601, as Bliss writes it; local time without an offset),
    or None if it says none or none that reads."""
    try:
        when = datetime.fromisoformat(text) if text else None
    except ValueError:
        return None
    return when.astimezone() if when is not None else None  # naive: local time


def scan_states(bliss_file: Path, quiet: Callable[[], bool]) -> list[ScanState]:
    """Each scan of the file and whether it is finished. ``quiet()`` (the dataset has not
    changed for long enough to count unfinished scans as finished) walks the dataset's
    files, so it is asked only about scans without ``end_time``."""
    states = []
    for info in list_scans(bliss_file):
        detectors = tuple(info.detectors)
        if info.complete:
            finished = all(
                not missing_frame_sources(bliss_file, f"{info.entry}/instrument/{name}/data")
                for name in info.detectors
            )
        else:
            finished = quiet()
            # While a scan is written, its detectors' datasets may not be in the dataset
            # file yet: their first Lima files in the scan's folder name them.
            detectors = detectors or lima_detectors(bliss_file.parent, info.number)
        started = start_time(info.start_time)
        states.append(ScanState(info.number, info.title, detectors, finished, started))
    return states


def matching_rule(scan: ScanState, rules: list[WatchRule]) -> WatchRule | None:
    """The first rule whose patterns all match the scan (case-insensitive), among those
    whose ``since`` (if any) the scan did not start before."""
    for rule in rules:
        if rule.since and scan.started and scan.started < rule.since:
            continue
        if rule.title and not fnmatch.fnmatch(scan.title.lower(), rule.title.lower()):
            continue
        if rule.detector and not any(
            fnmatch.fnmatch(name.lower(), rule.detector.lower()) for name in scan.detectors
        ):
            continue
        return rule
    return None


def rules_for(beamline: str, settings: WatchSettings) -> list[WatchRule]:
    by_name = {name.lower(): rules for name, rules in settings.beamlines.items()}
    return by_name.get(beamline.lower(), by_name.get("*", []))


def finished_acquisitions(
    bliss_file: Path, settings: WatchSettings, now: float | None = None
) -> tuple[list[Acquisition], list[str], list[Acquisition]]:
    """The acquisitions of a dataset file that are ready for a flow, why others must wait
    (unfinished scans, a dataset not yet quiet): the file is looked at again while
    something waits, and, with ``settings.live_from_files``, the live work of the scans
    being written (as :func:`started_acquisition` for blissdata's scan starts). Scans no
    rule matches are left alone and wait for nothing."""
    from calypso.flows.online.live_base import LIVE_DATASETS, LIVE_TECHNIQUES

    bliss_file = Path(os.path.realpath(bliss_file))  # one spelling for every watcher
    raw = RawDataset.from_path(bliss_file)
    dataset_dir = bliss_file.parent
    quiet_now: list[bool] = []

    def quiet() -> bool:  # one walk of the dataset's files a look, and only if needed
        if not quiet_now:
            age = (now or time.time()) - last_change(dataset_dir)
            quiet_now.append(age >= settings.quiet_s)
        return quiet_now[0]

    scans = scan_states(bliss_file, quiet)
    rules = rules_for(raw.beamline, settings)
    ready: list[Acquisition] = []
    waiting: list[str] = []
    started: list[Acquisition] = []
    whole: dict[str, WatchRule] = {}  # technique -> rule, for rules that take the dataset
    for scan in scans:
        rule = matching_rule(scan, rules)
        if rule is None:
            continue
        if rule.unit == "dataset":
            whole.setdefault(rule.technique, rule)
            continue
        if not scan.finished:
            waiting.append(f"{bliss_file} scan {scan.number}: not finished yet")
            if settings.live_from_files and rule.technique in LIVE_TECHNIQUES:
                started.append(_acquisition(raw, dataset_dir, rule, (scan.number,)))
            continue
        ready.append(_acquisition(raw, dataset_dir, rule, (scan.number,)))
    for rule in whole.values():
        if all(s.finished for s in scans) and quiet():
            ready.append(_acquisition(raw, dataset_dir, rule, None))
            continue
        waiting.append(f"{dataset_dir}: {rule.technique} waits for the dataset to finish")
        running = any(not s.finished for s in scans)
        if running and settings.live_from_files and rule.technique in LIVE_DATASETS:
            started.append(_acquisition(raw, dataset_dir, rule, None))  # the dataset's live run
    return ready, waiting, started


def started_acquisition(
    filename: str | None,
    number: int,
    title: str,
    detectors: tuple[str, ...],
    roots: list[Path],
    settings: WatchSettings,
) -> Acquisition | None:
    """The live work of a scan that has just started (what Bliss's data-stream server says
    of it: its dataset file, number, title and 2D detectors), by the rules finished scans
    follow: that scan, or its whole dataset for a rule with ``unit = "dataset"`` (its
    scans share one key: the first to start starts the dataset's live run); None when no
    rule gives it to a technique fed live (reduced at the end, as before). A
    DataPolicyError for a dataset file outside ``roots`` or the data policy's layout."""
    from calypso.flows.online.live_base import LIVE_DATASETS, LIVE_TECHNIQUES

    if not filename:
        return None  # a scan that saves no dataset file
    bliss_file = Path(os.path.realpath(filename))  # the spelling finished scans get
    require_inside_roots(bliss_file, roots)
    raw = RawDataset.from_path(bliss_file)
    scan = ScanState(number, title, detectors, finished=False, started=datetime.now().astimezone())
    rule = matching_rule(scan, rules_for(raw.beamline, settings))
    if rule is None or rule.technique not in LIVE_TECHNIQUES:
        return None
    if rule.unit == "dataset" and rule.technique not in LIVE_DATASETS:
        return None  # its live run would follow one scan, not the dataset: at the end
    return _acquisition(raw, bliss_file.parent, rule, (number,) if rule.unit == "scan" else None)


def _acquisition(
    raw: RawDataset, dataset_dir: Path, rule: WatchRule, scans: tuple[int, ...] | None
) -> Acquisition:
    return Acquisition(
        raw_dataset_dir=str(dataset_dir),
        technique=rule.technique,
        scans=scans,
        parameters=dict(rule.parameters),
        beamline=raw.beamline,
        proposal=raw.proposal,
    )


def require_inside_roots(path: str | Path, roots: list[Path]) -> None:
    """Refuse a raw path that is not (after resolving symlinks) inside a configured root."""
    if not roots:
        return
    resolved = Path(path).resolve()
    for root in roots:
        if resolved.is_relative_to(Path(root).resolve()):
            return
    raise DataPolicyError(
        f"{path} is outside the configured data roots ({', '.join(map(str, roots))}): "
        "Calypso processes only data under CALYPSO_DATA_ROOTS"
    )
