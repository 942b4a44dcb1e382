"""Results published together with their catalogue record.

While a flow run works, its steps keep their part files in folders of their own in the
run's part folder (``<output>/.calypso-partial-<run>/step-<name>/``) and what its writers
finish is *staged* there (``.../results/``, laid out as it will be published) instead
of being renamed into place. The run then reserves its record as ``publishing``, renames
everything into place (:meth:`Publication.apply`) and completes the record with the
files' checksums (:meth:`calypso.flows.flow_run.FlowRun.completed`): no result appears
without its record, and when the catalogue cannot be written the results stay staged.

Outside a flow run (a writer called on its own) results are renamed into place at once.

Each file and folder is given the results' group and mode (:mod:`.permissions`) just
before it is renamed into place, and the folders made for them are made with both.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path

from calypso.errors import OutputError
from calypso.registry.leftovers import file_sha256
from calypso.tasks.writers.permissions import Permissions, default_permissions

PARTIAL_PREFIX = ".calypso-partial-"
STAGING = "results"  # the staging folder's name inside a run's part folder


@dataclass
class Publication:
    """The results of one run (or sweep variant): staged paths and where they go."""

    work_dir: Path
    permissions: Permissions | None = None  # None: the configured ones (no proposal known)
    moves: list[tuple[Path, Path]] = field(default_factory=list)  # (staged, final)
    _done: list[tuple[Path, Path, Path | None]] = field(default_factory=list)  # + aside

    @property
    def staging(self) -> Path:
        return self.work_dir / STAGING

    def stage(self, final: Path) -> Path:
        """Where ``final`` is written meanwhile: its place under the staging folder when it
        belongs to the output folder, else a unique name there."""
        try:
            relative = final.relative_to(self.work_dir.parent)
        except ValueError:
            relative = Path(f"{uuid.uuid4().hex[:8]}-{final.name}")
        staged = self.staging / relative
        staged.parent.mkdir(parents=True, exist_ok=True)
        return staged

    def defer(self, staged: Path, final: Path) -> None:
        self.moves.append((Path(staged), Path(final)))

    def staged_for(self, final: Path) -> Path | None:
        """The staged file or folder that becomes ``final``, if any."""
        for staged, destination in self.moves:
            if destination == Path(final):
                return staged
        return None

    def files(self) -> Iterator[tuple[Path, Path]]:
        """(staged file, final file) of every file published, folders' contents included."""
        for staged, final in self.moves:
            if staged.is_dir():
                for path in sorted(staged.rglob("*")):
                    if path.is_file():
                        yield path, final / path.relative_to(staged)
            elif staged.exists():
                yield staged, final

    def checksums(self, root: str | Path) -> dict[str, str]:
        """SHA-256 of every file published, by its path relative to ``root``."""
        sums = {}
        for staged, final in self.files():
            name = os.path.relpath(final, root) if final.is_relative_to(root) else str(final)
            sums[name] = file_sha256(staged)
        return sums

    def apply(self) -> None:
        """Rename everything staged into place, contents before the folders holding them.
        A file or folder already there is moved aside (removed by :meth:`commit`, put
        back by :meth:`undo`). Each is given the results' group and mode first, so none is
        ever visible with others. Raises OSError, with what was done still undoable."""
        if not self.moves:
            return
        for _, final in self.moves:  # before anything moves: all or nothing
            _refuse_foreign(final)
        permissions = self.permissions = self.permissions or default_permissions()
        for staged, final in sorted(self.moves, key=lambda m: len(m[0].parts), reverse=True):
            permissions.make_folders(final.parent)
            permissions.apply(staged)
            aside = None
            if final.exists() or final.is_symlink():
                aside = final.parent / f"{PARTIAL_PREFIX}old-{uuid.uuid4().hex[:8]}-{final.name}"
                os.replace(final, aside)
            try:
                os.replace(staged, final)
            except OSError:
                if aside is not None:
                    os.replace(aside, final)
                raise
            self._done.append((staged, final, aside))

    def commit(self) -> None:
        """Forget what was replaced: the results are recorded."""
        for _, _, aside in self._done:
            if aside is not None:
                _remove(aside)
        self._done.clear()

    def undo(self) -> None:
        """Put back what :meth:`apply` moved: results to the staging folder, older ones
        where they were (best effort: an error leaves the rest as it is)."""
        for staged, final, aside in reversed(self._done):
            try:
                staged.parent.mkdir(parents=True, exist_ok=True)
                os.replace(final, staged)
                if aside is not None:
                    os.replace(aside, final)
            except OSError:
                continue
        self._done.clear()


def _refuse_foreign(final: Path) -> None:
    """Refuse to replace an HDF5 file that Calypso did not write: an output folder given
    as the input's own folder would put the result over the raw file of the same name."""
    if not final.is_file() or final.is_symlink():
        return
    with open(final, "rb") as stream:
        if stream.read(8) != b"\x89HDF\r\n\x1a\n":
            return
    import h5py

    try:
        with h5py.File(final, "r", locking=False) as h5:
            creator = str(h5.attrs.get("creator", ""))
    except OSError:
        creator = ""
    if not creator.startswith("calypso"):
        raise OutputError(
            f"the result would replace {final}, which Calypso did not write (the raw data?): "
            "raw files are never overwritten; give another --output folder"
        )


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


_active: ContextVar[Publication | None] = ContextVar("calypso_publication", default=None)


def active() -> Publication | None:
    """The publication being prepared in this context (a flow run's, or a sweep
    variant's: each runs in its own copy of the context), if any."""
    return _active.get()


@contextmanager
def preparing(
    work_dir: str | Path, permissions: Permissions | None = None
) -> Iterator[Publication]:
    """Stage what writers finish in this context in ``work_dir`` until published, then give
    them ``permissions`` (default: the configured modes and group)."""
    publication = Publication(Path(work_dir), permissions)
    _remove(publication.staging)  # left by an earlier attempt of the same run
    token = _active.set(publication)
    try:
        yield publication
    finally:
        _active.reset(token)


def move_into_place(source: str | Path, final: str | Path) -> None:
    """Rename a finished file or folder onto ``final``: when the run publishes, if one is
    being prepared; else now, replacing an older one."""
    source, final = Path(source), Path(final)
    publication = active()
    if publication is not None:
        publication.defer(source, final)
        return
    now = Publication(source.parent)
    now.defer(source, final)
    now.apply()
    now.commit()


def published_path(path: str | Path) -> Path:
    """Where ``path`` can be read now: its staged copy while it waits for publication."""
    publication = active()
    staged = publication.staged_for(Path(path)) if publication is not None else None
    return staged if staged is not None else Path(path)


def will_exist(path: str | Path) -> bool:
    """Whether ``path`` exists, or will once the run publishes its results."""
    return published_path(path).exists()


@contextmanager
def interrupts_held() -> Iterator[None]:
    """Ctrl-C (SIGINT) held while the block runs, then acted on: the results move into
    place with their record, or not at all. A Ctrl-C as a run published its results left
    its record "running" (the files renamed, or not, and no record saying which). Only in
    the main thread, where Python delivers the signal."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda number, _frame: received.append(number))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            if callable(previous):
                previous(signal.SIGINT, None)  # Python's own: KeyboardInterrupt, here
            elif previous == signal.SIG_DFL:
                os.kill(os.getpid(), signal.SIGINT)
