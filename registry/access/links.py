"""What a dataset really reads: every file under its folder with symlinks resolved, and in
every HDF5 file each external link and each virtual dataset's source files, followed
into the files they name. A run reads through all of these, so confinement checks them
all, not only the path it was given."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".nxs", ".nx5", ".cxi")
_REFERENCE = re.compile(r"^(?P<file>.+)::(?P<index>\d+)$")


def first_reference(dataset) -> str | None:
    """The file named first, as written, by an HDF5 dataset that names frames instead of
    holding them; None for any other dataset. Bliss's writer records a Lima saving it
    cannot link (CBF, TIFF: neither a virtual dataset nor external storage can describe
    them) as one string a frame, ``<file>::<index>``, the file named relative to the
    dataset file's folder. One string read: a scan's listing asks of every detector."""
    import h5py

    if not isinstance(dataset, h5py.Dataset) or dataset.ndim != 1 or dataset.shape[0] == 0:
        return None
    if h5py.check_string_dtype(dataset.dtype) is None and dataset.dtype.kind not in "SO":
        return None
    match = _REFERENCE.match(as_text(dataset[0]))
    return match["file"] if match else None


def names_frames(dataset) -> bool:
    """Whether an HDF5 dataset names frames instead of holding them (:func:`first_reference`)."""
    return first_reference(dataset) is not None


def file_references(dataset, strict: bool = True) -> list[tuple[str, int]] | None:
    """The frames a dataset names (:func:`first_reference`), as ``(file as written, index
    in it)``, or None for any other dataset. A dataset whose first string is such a name
    and a later one is not is damaged: a RawDataError, or with ``strict`` false the names
    that are (what confinement checks)."""
    if not names_frames(dataset):
        return None
    references = []
    for value in map(as_text, dataset[()]):
        match = _REFERENCE.match(value)
        if match is None and not strict:
            continue
        if match is None:
            from calypso.errors import RawDataError

            raise RawDataError(
                f"{dataset.file.filename}::{dataset.name} names frames as FILE::INDEX, not "
                f"{value!r}: the dataset file is damaged; write it again from the scan"
            )
        references.append((match["file"], int(match["index"])))
    return references


def as_text(value: object) -> str:
    """An HDF5 string as read (bytes or str) as text."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def referenced_file(dataset_file: Path | str, name: str) -> Path:
    """The file a frame reference names (:func:`file_references`): relative to the folder
    of the dataset file, as Bliss's writer writes it."""
    return Path(dataset_file).parent / name


def resolved(path: Path | str) -> Path:
    """The real path: symlinks resolved, for the part that exists."""
    return Path(os.path.realpath(os.path.expanduser(path)))


def _places(opened: tuple[Path, ...], prefix_variable: str) -> list[Path]:
    """Where HDF5 looks for a file a link names by a relative name: the prefixes of
    ``prefix_variable`` (``${ORIGIN}``: the linking file's folder), the folder of the name
    the linking file was opened by (a symlink's own folder, not its target's: HDF5 does not
    resolve it), then the current folder. ``opened`` holds every name the file may be
    opened by (as given, and its real path): each one's folder is a place."""
    folders = list(dict.fromkeys(path.parent for path in opened))
    places: list[Path] = []
    for prefix in filter(None, os.environ.get(prefix_variable, "").split(os.pathsep)):
        if "${ORIGIN}" in prefix:
            places += [Path(prefix.replace("${ORIGIN}", str(folder))) for folder in folders]
        else:
            places.append(Path(prefix))
    return places + folders + [Path.cwd()]


def link_targets(
    opened: tuple[Path, ...],
    prefix_variable: str,
    name: str,
    pattern: bool = False,
    looked: list[Path] | None = None,
) -> list[Path]:
    """The files HDF5 could open for a link named ``name`` in the file ``opened``: an
    absolute name as it is, whether it exists or not (the caller decides what a missing
    one means), and every candidate that exists; else the first candidate (checked as it
    would be created). Only a virtual dataset's source name is a ``pattern`` (``%b``, the
    file's name without suffix, and printf numbers of an unlimited one: its folder);
    HDF5 takes an external link's or external file's name literally. Every candidate
    (there or not: one that appears would be opened) is added to ``looked``."""
    if pattern:
        names = {name.replace("%b", path.stem).replace("%%", "%") for path in opened}
    else:
        names = {name}
    places = _places(opened, prefix_variable)
    targets: list[Path] = []
    for written in sorted(names):
        if pattern and "%" in written:  # a printf pattern: any file of its folder
            written = str(Path(written).parent / "*")
        given = Path(written)
        if given.is_absolute():
            targets.append(given)
            candidates = [place / given.name for place in places]
        else:
            candidates = [place / written for place in places]
        if looked is not None:
            looked += [given, *candidates] if given.is_absolute() else candidates
        existing = []
        for candidate in candidates:
            if pattern and candidate.name == "*":
                existing += list(candidate.parent.glob("*")) or [candidate.parent]
                if looked is not None:  # a file added there changes its folder's ctime
                    looked.append(candidate.parent)
            elif os.path.lexists(candidate):
                existing.append(candidate)
        targets += existing or ([] if given.is_absolute() else candidates[:1])
    return list(dict.fromkeys(targets))


def hdf5_links(
    opened: tuple[Path, ...], looked: list[Path] | None = None
) -> Iterator[tuple[str, str, str, Path]]:
    """``(where, what, name as written, target)`` for every external link, virtual dataset
    source and external raw data file of the HDF5 file ``opened[0]`` (``opened``: the
    names it may be opened by); sources in the same file are not listed."""
    import h5py

    path = opened[0]
    found: list[tuple[str, str, str, Path]] = []
    with h5py.File(path, "r", locking=False) as h5:

        def visit(name: str, link) -> None:
            where = f"{path}::/{name}"
            if isinstance(link, h5py.ExternalLink):
                for target in link_targets(opened, "HDF5_EXT_PREFIX", link.filename, False, looked):
                    found.append((where, "an external link", link.filename, target))
                return
            if not isinstance(link, h5py.HardLink):
                return
            node = h5.get(name)
            if not isinstance(node, h5py.Dataset):
                return
            if node.is_virtual:
                for source in node.virtual_sources():
                    if source.file_name == ".":
                        continue
                    for target in link_targets(
                        opened, "HDF5_VDS_PREFIX", source.file_name, True, looked
                    ):
                        found.append((where, "a virtual dataset", source.file_name, target))
            named = file_references(node, strict=False) or ()
            for written in dict.fromkeys(n for n, _ in named):
                target = referenced_file(path, written)
                found.append((where, "a frame reference", written, target))
            for external, _, _ in node.external or ():
                # Raw bytes kept in another file, of any kind (HDF5 reads them as they are).
                for target in link_targets(opened, "HDF5_EXTFILE_PREFIX", external, False, looked):
                    found.append((where, "an external data file", external, target))

        h5.visititems_links(visit)
    yield from found


def dataset_files(top: Path) -> Iterator[tuple[Path, Path, bool]]:
    """``(path, real path, whether it is a symlink)`` of every entry under the folder
    ``top``, symlinked folders followed once. An entry that is no symlink has the real
    path of its folder (``top`` may be named through symlinks: ``/data/visitor`` leading
    to a GPFS mount)."""
    seen: set[Path] = set()
    pending = [top]
    while pending:
        folder = pending.pop()
        real = resolved(folder)
        if real in seen:
            continue
        seen.add(real)
        for base, folders, files in os.walk(folder, followlinks=False):
            real_base = real / Path(base).relative_to(folder)
            for name in folders + files:
                entry = Path(base) / name
                link = entry.is_symlink()
                target = resolved(entry) if link else real_base / name
                yield entry, target, link
                if link and target.is_dir():
                    pending.append(entry)


def check_dataset(
    path: Path, check: Callable[[Path, str], None], limit: int = 1_000_000
) -> list[Path]:
    """Call ``check(real path, how it is reached)`` for everything a run on ``path`` (a
    folder or a file, as it will be opened) may read: every entry under a folder (symlinks
    resolved), the files that HDF5 files link to (external links, virtual dataset sources,
    external data files), recursively. Returns every path looked at, so that a caller
    keeping the verdict can tell when one of them changes (:func:`signature`)."""
    hdf5: list[tuple[Path, ...]] = []
    looked: list[Path] = [path]
    if path.is_dir():
        for count, (entry, target, link) in enumerate(dataset_files(path)):
            if count >= limit:
                break
            check(target, f"the symlink {entry}" if link else f"the file {entry}")
            if target.is_file() and target.name.lower().endswith(HDF5_SUFFIXES):
                hdf5.append((entry, target))
    elif path.is_file():
        check(resolved(path), f"the file {path}")
        hdf5.append((path, resolved(path)))
    _check_hdf5(hdf5, check, looked)
    return looked


def _check_hdf5(
    files: list[tuple[Path, ...]], check: Callable[[Path, str], None], looked: list[Path]
) -> None:
    import h5py

    seen: set[tuple[Path, ...]] = set()
    while files:
        opened = tuple(dict.fromkeys(files.pop()))
        if opened in seen or not opened[-1].is_file():
            continue
        seen.add(opened)
        looked += opened
        try:
            if not h5py.is_hdf5(opened[-1]):
                continue
            links = list(hdf5_links(opened, looked))
        except OSError:
            continue  # unreadable: the run cannot read through it either
        for where, what, name, target in links:
            real = resolved(target)
            check(real, f"{what} at {where} (to {name!r})")
            files.append((target, real))


def signature(paths: list[Path]) -> tuple:
    """What each path is now: where it leads, and that file's identity and change time
    (``st_ctime`` cannot be set back by a file's owner, unlike ``st_mtime``); equal
    signatures mean a check of these paths still holds."""
    now = []
    for path in paths:
        try:
            status = os.stat(path)
            now.append((resolved(path), status.st_dev, status.st_ino, status.st_ctime_ns))
        except OSError:
            now.append((resolved(path), None))
    return tuple(now)
