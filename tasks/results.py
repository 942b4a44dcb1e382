"""Processed results read back as Python objects: what ``calypso.load`` and ``calypso.run``
return in a notebook.

A :class:`Result` is a processed dataset (its catalogue record when there is one) and its
NeXus outputs; each output is a :class:`Data`, one NXdata group whose arrays are read from
the file only when asked for, so a result of thousands of frames costs nothing to load.

>>> result = calypso.load(12)                      # a catalogue id, a folder or a .h5 file
>>> result.data.axes["q"], result.data.signal     # the default plot, as numpy arrays
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from calypso.errors import CatalogueError, OutputError


@dataclass(frozen=True)
class Data:
    """One NXdata group of a result file: its signal, axes and uncertainties, read lazily.

    ``url`` is ``file.h5::/entry/.../group``, as the catalogue and ``calypso run`` list them.
    """

    url: str

    @property
    def file(self) -> Path:
        return Path(self.url.partition("::")[0])

    @property
    def path(self) -> str:
        return self.url.partition("::")[2] or "/"

    def _group(self, h5: h5py.File) -> h5py.Group:
        try:
            group = h5[self.path]
        except KeyError:
            raise OutputError(f"{self.file} has no group {self.path}") from None
        if isinstance(group, h5py.Dataset):  # a URL naming the signal itself: its NXdata
            group = group.parent
        if not isinstance(group, h5py.Group) or "signal" not in group.attrs:
            raise OutputError(f"{self.url} is not an NXdata group with a signal")
        return group

    def read(self, name: str | None) -> np.ndarray | None:
        """Any dataset of the group by name (None if it has none of that name)."""
        with h5py.File(self.file, "r") as h5:
            group = self._group(h5)
            return None if name is None or name not in group else group[name][()]

    @property
    def signal_name(self) -> str:
        with h5py.File(self.file, "r") as h5:
            return _text(self._group(h5).attrs["signal"])

    @property
    def axis_names(self) -> list[str]:
        with h5py.File(self.file, "r") as h5:
            axes = self._group(h5).attrs.get("axes", [])
        return [_text(a) for a in np.atleast_1d(axes) if _text(a) != "."]

    @property
    def signal(self) -> np.ndarray:
        """The plotted array (intensities, mu(E), a slice ...)."""
        return self.read(self.signal_name)

    @property
    def axes(self) -> dict[str, np.ndarray]:
        """Each axis the plot uses, by name, in the order of the signal's dimensions."""
        return {name: self.read(name) for name in self.axis_names}

    @property
    def errors(self) -> np.ndarray | None:
        """The signal's standard deviations, when the result has them."""
        return self.read(f"{self.signal_name}_errors") if self.signal_name else None

    @property
    def units(self) -> dict[str, str]:
        """The units of the signal and of each axis, where the file states them."""
        with h5py.File(self.file, "r") as h5:
            group = self._group(h5)
            names = [_text(group.attrs["signal"]), *self.axis_names]
            return {
                n: _text(group[n].attrs["units"])
                for n in names
                if n in group and "units" in group[n].attrs
            }

    def sibling(self, name: str) -> Data:
        """Another NXdata of the same process (``result.data.sibling("chi")``)."""
        return Data(f"{self.file}::{self.path.rsplit('/', 1)[0]}/{name}")

    def __repr__(self) -> str:
        return f"Data({self.url!r})"


@dataclass
class Result:
    """A processed dataset: where it is, how it was made and its outputs.

    ``summary`` holds the figures of the run that made it (``calypso run --json``'s) when it
    comes from :func:`calypso.run`; ``record`` the catalogue's record when there is one.
    """

    technique: str
    folder: Path
    outputs: list[Data]
    record: Any = None
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def data(self) -> Data:
        """The first output, the one ``silx view`` plots by default."""
        if not self.outputs:
            raise OutputError(f"{self.folder} holds no NeXus output")
        return self.outputs[0]

    @property
    def parameters(self) -> dict[str, Any]:
        return dict(self.record.parameters) if self.record is not None else {}

    def __repr__(self) -> str:
        ident = f" #{self.record.id}" if self.record is not None else ""
        return f"<{self.technique} result{ident} in {self.folder}: {len(self.outputs)} outputs>"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def default_data(file: Path) -> list[Data]:
    """The NXdata each entry of ``file`` plots by default (its ``default`` attributes)."""
    found = []
    try:
        with h5py.File(file, "r") as h5:
            entries = [name for name, item in h5.items() if isinstance(item, h5py.Group)]
            for entry in entries:
                path = f"/{entry}"
                while True:
                    group = h5[path]
                    if "signal" in group.attrs:
                        found.append(Data(f"{file}::{path}"))
                        break
                    default = group.attrs.get("default")
                    if default is None or _text(default) not in group:
                        break
                    path = f"{path}/{_text(default)}"
    except OSError as exc:
        raise OutputError(f"cannot read {file} as HDF5: {exc}") from None
    return found


def load_result(source: str | int | Path, catalogue: Any) -> Result:
    """A :class:`Result` from a catalogue id, a processed folder or a NeXus file."""
    text = str(source)
    if isinstance(source, int) or text.isdigit():
        record = catalogue.get(int(text))
        return from_record(record)
    path = Path(text).expanduser().absolute()
    if path.is_file():
        outputs = default_data(path)
        if not outputs:
            raise OutputError(f"{path} has no NXdata to show (no NeXus 'default' chain)")
        record = catalogue.find_by_processed_path(str(path.parent))
        technique = record.technique if record else _technique_of(path)
        return Result(technique, path.parent, outputs, record)
    if path.is_dir():
        record = catalogue.find_by_processed_path(str(path))
        if record is not None:
            return from_record(record)
        outputs = [d for f in sorted(path.glob("*.h5")) for d in default_data(f)]
        if not outputs:
            raise OutputError(f"{path} holds no NeXus result and no catalogue record names it")
        return Result(_technique_of(outputs[0].file), path, outputs)
    raise CatalogueError(
        f"{source} is neither a catalogue id nor an existing file or folder "
        "(`calypso catalogue list` shows the ids)"
    )


def from_record(record: Any, summary: dict[str, Any] | None = None) -> Result:
    outputs = [Data(url) for url in record.outputs if url.partition("::")[2]]
    return Result(record.technique, Path(record.processed_path), outputs, record, summary or {})


def _technique_of(file: Path) -> str:
    """The technique that wrote ``file``, from its NXprocess provenance ("unknown" when the
    file does not say, e.g. a file Calypso did not write)."""
    with h5py.File(file, "r") as h5:
        for entry in h5.values():
            for process in entry.values() if isinstance(entry, h5py.Group) else ():
                note = process.get("provenance/data") if isinstance(process, h5py.Group) else None
                if note is None:
                    continue
                try:
                    technique = json.loads(note[()]).get("technique")
                except (ValueError, AttributeError):
                    continue
                if technique:
                    return str(technique)
    return "unknown"
