"""What a dataset really reads: every file under its folder with symlinks resolved, and in
every HDF5 file each external link and each virtual dataset's source files, followed
into the files they name. A run reads through all of these, so confinement checks them
all, not only the path it was given."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".nxs", ".nx5", ".cxi")


def resolved(path: Path | str) -> Path:
    """The real path: symlinks resolved, for the part that exists."""
    return Path(os.path.realpath(os.path.expanduser(path)))


def _candidates(name: str, beside: Path, prefix_variable: str) -> list[Path]:
    """Where HDF5 may look for a file a link names: the prefixes of ``prefix_variable``
    (``${ORIGIN}`` is the linking file's folder), then beside the linking file, then the
    current folder; an absolute name first as it is, then its base name in those places."""
    given = Path(name)
    names = [given.name] if given.is_absolute() else [name]
    places: list[Path] = []
    for prefix in filter(None, os.environ.get(prefix_variable, "").split(os.pathsep)):
        places.append(Path(prefix.replace("${ORIGIN}", str(beside))))
    places += [beside, Path.cwd()]
    found = [given] if given.is_absolute() else []
    return found + [place / n for place in places for n in names]


def link_targets(path: Path, prefix_variable: str, name: str) -> list[Path]:
    """The files HDF5 could open for a link named ``name`` in ``path``: those of the
    candidates that exist, else the first candidate (checked as it would be created)."""
    name = name.replace("%b", path.stem).replace("%%", "%")
    if "%" in name:  # a printf pattern of an unlimited virtual dataset: its folder
        name = str(Path(name).parent / "*")
    candidates = _candidates(name, path.parent, prefix_variable)
    existing = []
    for candidate in candidates:
        if "*" in candidate.name:
            existing += list(candidate.parent.glob(candidate.name)) or [candidate.parent]
        elif candidate.exists():
            existing.append(candidate)
    return existing or candidates[:1]


def hdf5_links(path: Path) -> Iterator[tuple[str, str, Path]]:
    """``(where, what, target)`` for every external link and virtual dataset source in the
    HDF5 file ``path`` (the file itself, for sources in the same file, is not listed)."""
    import h5py

    found: list[tuple[str, str, Path]] = []
    with h5py.File(path, "r", locking=False) as h5:

        def visit(name: str, link) -> None:
            if isinstance(link, h5py.ExternalLink):
                for target in link_targets(path, "HDF5_EXT_PREFIX", link.filename):
                    found.append((f"{path}::/{name}", "an external link", target))
            elif isinstance(link, h5py.HardLink):
                node = h5.get(name)
                if isinstance(node, h5py.Dataset) and node.is_virtual:
                    for source in node.virtual_sources():
                        if source.file_name == ".":
                            continue
                        for target in link_targets(path, "HDF5_VDS_PREFIX", source.file_name):
                            found.append((f"{path}::/{name}", "a virtual dataset", target))

        h5.visititems_links(visit)
    yield from found


def dataset_files(top: Path) -> Iterator[tuple[Path, Path]]:
    """``(path, real path)`` of every entry under the folder ``top`` (itself included),
    symlinked folders followed once."""
    seen: set[Path] = set()
    pending = [top]
    while pending:
        folder = pending.pop()
        real = resolved(folder)
        if real in seen:
            continue
        seen.add(real)
        for base, folders, files in os.walk(folder, followlinks=False):
            for name in folders + files:
                entry = Path(base) / name
                target = resolved(entry) if entry.is_symlink() else entry
                yield entry, target
                if entry.is_symlink() and target.is_dir():
                    pending.append(entry)


def check_dataset(path: Path, check: Callable[[Path, str], None], limit: int = 1_000_000) -> None:
    """Call ``check(real path, how it is reached)`` for everything a run on ``path`` (a
    folder or a file) may read: every entry under a folder (symlinks resolved), the files
    that HDF5 files link to (external links, virtual dataset sources), recursively."""
    hdf5: list[Path] = []
    if path.is_dir():
        for count, (entry, target) in enumerate(dataset_files(path)):
            if count >= limit:
                break
            if entry != target:
                check(target, f"the symlink {entry}")
            if target.is_file() and target.name.lower().endswith(HDF5_SUFFIXES):
                hdf5.append(target)
    elif path.is_file():
        hdf5.append(path)
    _check_hdf5(hdf5, check)


def _check_hdf5(files: list[Path], check: Callable[[Path, str], None]) -> None:
    import h5py

    seen: set[Path] = set()
    while files:
        path = files.pop()
        if path in seen or not path.is_file():
            continue
        seen.add(path)
        try:
            if not h5py.is_hdf5(path):
                continue
            links = list(hdf5_links(path))
        except OSError:
            continue  # unreadable: the run cannot read through it either
        for where, what, target in links:
            real = resolved(target)
            check(real, f"{what} at {where} (to {target})")
            files.append(real)
