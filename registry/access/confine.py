"""The one confinement check: every entry point (``calypso run``, ``calypso flows run``,
runs that ``calypso serve`` starts from events or the Prefect UI, saved flows,
``calypso export``, the portal) describes what it is about to touch as an
:class:`Intent`, and :func:`confine` refuses it, before anything is read or written,
unless all of it lies inside one proposal that the identity may see.

With data roots configured (``CALYPSO_DATA_ROOTS``), a proposal is the first folder under
a root (``<root>/<proposal>/...``, as the ESRF data policy lays it out) and:

1. no path has a ``..`` component;
2. the input's real path (symlinks resolved) is inside a data root, in a proposal the
   identity is a member of (staff and the service: any); a saved flow's data is in its
   own proposal;
3. everything the input reads (entries under its folder, symlinks resolved; every external
   link and virtual dataset source of its HDF5 files, followed) is inside that proposal;
4. every path parameter (the fields a parameter model marks as paths) is inside it, or in
   ``access.shared_paths`` (read-only); a file pattern stays under the dataset;
5. the output folder (given, or the dataset's PROCESSED_DATA folder) is inside it; an
   export's source folder is inside a proposal of the identity, and a folder target inside
   the same proposal or under the configured export target.

Without data roots (one machine), a Unix account's own permissions are the boundary:
built-in runs and exports are not confined further, a saved flow stays inside its dataset's
proposal (the data-policy path says which), and a signed-in (LDAP, OIDC) or service
identity is refused: services and the portal need data roots.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from calypso.registry.access.errors import AccessError
from calypso.registry.access.identity import Identity
from calypso.registry.access.links import check_dataset, resolved

if TYPE_CHECKING:
    from calypso.settings import CalypsoSettings


@dataclass(frozen=True)
class Intent:
    """What an action is about to touch.

    ``parameters``: ``(where, kind, value)``, kind ``"file"`` (a file it reads) or
    ``"glob"`` (a file-name pattern under the input's folder).
    """

    action: str  # for messages: "run", "saved flow run", "export" ...
    raw: str | None = None  # the input: a dataset folder, a file, or file::/path
    output: str | None = None
    parameters: Sequence[tuple[str, str, str]] = ()
    saved_flow: str | None = None  # NAME@VERSION: confined even without data roots
    flow_proposal: str | None = None
    export_source: str | None = None
    export_to: str | None = None


@dataclass
class Confined:
    """The proposal an allowed action stays in (None: not confined, one machine)."""

    proposal: str | None
    proposal_dir: Path | None = None
    roots: list[Path] = field(default_factory=list)
    looked: list[Path] = field(default_factory=list)  # what the input's check looked at


def _refuse(message: str) -> AccessError:
    return AccessError(f"refused: {message}")


def _no_dotdot(text: str, what: str) -> None:
    if ".." in Path(text).parts:
        raise _refuse(f"{what} {text}: '..' is not allowed in paths (give the real path)")


def _no_hard_link(real: Path, how: str, status: os.stat_result | None = None) -> None:
    """A file with more than one name may have one in another proposal (or be Calypso's
    own secret): its path says nothing of whose it is."""
    if status is None:
        try:
            status = os.stat(real)
        except OSError:
            return
    if stat.S_ISREG(status.st_mode) and status.st_nlink > 1:
        raise _refuse(
            f"{how} has {status.st_nlink} hard links: Calypso cannot tell whose file it is; "
            "copy the file instead of linking it"
        )


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or path.is_relative_to(folder)


# Where a refused parameter file (a calibration, a mask) belongs when every proposal uses it.
SHARED_HINT = (
    ": a file every proposal's runs read (a calibration, a mask) belongs in a folder named "
    "in the settings' access.shared_paths (CALYPSO_ACCESS__SHARED_PATHS), read-only to runs"
)


class _Check:
    def __init__(self, identity: Identity, intent: Intent, settings: CalypsoSettings) -> None:
        self.identity, self.intent, self.settings = identity, intent, settings
        self.roots = [resolved(root) for root in settings.data_roots]
        self.shared = [resolved(path) for path in settings.access.shared_paths]

    # -- where a path belongs ------------------------------------------------------------

    def _root_of(self, real: Path) -> Path | None:
        return next((root for root in self.roots if _inside(real, root)), None)

    def proposal_of(self, text: str, what: str) -> tuple[str, Path]:
        """The proposal (and its real folder) of an input or export source."""
        given = Path(text).expanduser().absolute()
        real = resolved(given)
        if not self.roots:  # one machine: the data-policy path names the proposal
            from calypso.tasks.raw.data_policy import RawDataset

            dataset = RawDataset.from_path(given)
            proposal_dir = resolved(dataset.root / dataset.proposal)
            if not _inside(real, proposal_dir):
                raise _refuse(f"{what} {text} leads outside proposal {dataset.proposal} ({real})")
            return dataset.proposal, proposal_dir
        root = self._root_of(real)
        if root is None:
            roots = ", ".join(str(r) for r in self.settings.data_roots)
            raise _refuse(
                f"{what} {text} is outside the configured data roots ({roots}): Calypso "
                "processes only data under CALYPSO_DATA_ROOTS"
                + (f" (it leads to {real})" if real != given else "")
            )
        below = real.relative_to(root).parts
        if not below:
            raise _refuse(f"{what} {text} is a data root itself, not a proposal's data")
        proposal = below[0]
        lexical = self._lexical_proposal(given)
        if lexical is not None and lexical != proposal:
            raise _refuse(f"{what} {text} leads outside proposal {lexical} (to {real})")
        return proposal, root / proposal

    def _lexical_proposal(self, given: Path) -> str | None:
        named = named_proposal(self.settings.data_roots, given)
        return named[0] if named else None

    def member(self, proposal: str, text: str, what: str) -> None:
        if not self.identity.member_of(proposal):
            raise _refuse(
                f"{what} {text} belongs to proposal {proposal}, and {self.identity.name} is not "
                f"a member of it (their proposals: {self.identity.describe_proposals()})"
            )

    def inside(
        self, real: Path, proposal: str, proposal_dir: Path, what: str, hint: str = ""
    ) -> None:
        if not _inside(real, proposal_dir):
            shown = "" if f"{real})" in what or what.endswith(str(real)) else f" ({real})"
            root = self._root_of(real)
            if root is not None and real != root:
                other = real.relative_to(root).parts[0]
                if not self.identity.member_of(other):
                    shown = ""  # a proposal not theirs: not even its files' names are told
            raise _refuse(f"{what} leads outside proposal {proposal}{shown}{hint}")

    def reached(self, real: Path, how: str, proposal: str, proposal_dir: Path) -> None:
        """What a run reads (a file, what a symlink or an HDF5 link reaches) must be inside
        the proposal, and be no hard link. A name that leads nowhere is refused too when
        it names a place under a data root (another proposal's file, there or not: whether
        it exists is not told); elsewhere HDF5 cannot open it, and looks for the file
        under its other names."""
        try:
            status = os.stat(real)  # one look: whether it is there, and its link count
        except OSError:
            status = None
        if status is not None or self._root_of(real) is not None:
            self.inside(real, proposal, proposal_dir, how)
            if status is not None:
                _no_hard_link(real, how, status)

    # -- the check ------------------------------------------------------------------------

    def run(self) -> Confined:
        intent = self.intent
        if not self.roots:
            if self.identity.source != "unix":
                raise _refuse(
                    f"{self.identity.label}: no data roots are configured (CALYPSO_DATA_ROOTS), "
                    "so there is no proposal to confine this to; services and sign-ins "
                    "need them (docs/security.md)"
                )
            if intent.saved_flow is None:
                return Confined(None)  # one machine: the account's permissions decide
        texts = [
            (intent.raw, "input"),
            (intent.output, "output folder"),
            (intent.export_source, "export source"),
            *[(value, where) for where, _, value in intent.parameters],
        ]
        for text, what in texts:
            if text:
                _no_dotdot(text.split("::", 1)[0], what)
        if intent.export_source:
            return self._export()
        raw = (intent.raw or "").split("::", 1)[0]
        if not raw:
            raise _refuse(f"{intent.action}: no input named")
        proposal, proposal_dir = self.proposal_of(raw, "input")
        self.member(proposal, raw, "input")
        if intent.flow_proposal and intent.flow_proposal.lower() != proposal.lower():
            raise _refuse(
                f"input {raw} belongs to proposal {proposal}, the flow {intent.saved_flow} to "
                f"proposal {intent.flow_proposal}: it runs on its proposal's data only"
            )
        looked = check_dataset(
            Path(raw).expanduser().absolute(),  # as a run opens it: HDF5 looks beside it
            lambda real, how: self.reached(real, f"{how} in {raw}", proposal, proposal_dir),
        )
        self._output(raw, proposal, proposal_dir)
        self._parameters(raw, proposal, proposal_dir)
        self._target(proposal, proposal_dir)
        return Confined(proposal, proposal_dir, self.roots, looked)

    def _output(self, raw: str, proposal: str, proposal_dir: Path) -> None:
        output = self.intent.output
        if output is None:
            from calypso.tasks.raw.data_policy import RawDataset

            try:
                dataset = RawDataset.from_path(Path(raw).absolute())
            except Exception:
                return  # no default output: the plan asks for --output
            default = dataset.processed_dataset_dir(None, self.settings.processed_data)
            self.inside(resolved(default), proposal, proposal_dir, f"the output folder {default}")
            return
        self.inside(resolved(output), proposal, proposal_dir, f"output folder {output}")
        if any(_inside(resolved(output), shared) for shared in self.shared):
            raise _refuse(f"output folder {output} is a shared read-only folder")

    def _parameters(self, raw: str, proposal: str, proposal_dir: Path) -> None:
        from calypso.tasks.raw.pyfai_config import files_named_in

        pending = [(where, kind, value) for where, kind, value in self.intent.parameters]
        while pending:
            where, kind, value = pending.pop(0)
            path = Path(value.split("::", 1)[0]).expanduser()  # FILE::/dataset names FILE
            if kind == "glob":
                if not path.is_absolute():
                    continue  # matched under the dataset's folder, checked with it
                path = path.parent
            real = resolved(path)  # a relative file is opened from the current folder
            if any(_inside(real, shared) for shared in self.shared):
                continue
            self.inside(real, proposal, proposal_dir, f"{where} {value}", SHARED_HINT)
            if real.is_file() or kind == "glob":
                check_dataset(
                    path.absolute(),
                    lambda target, how, w=where: self.reached(
                        target, f"{how} in {w}", proposal, proposal_dir
                    ),
                )
            if real.is_file():  # a calibration that names more files (a spline ...)
                for key, named in files_named_in(real):
                    pending.append((f"{where} ({key} in {path.name})", "file", str(named)))

    def _target(self, proposal: str, proposal_dir: Path) -> None:
        """An export target: inside the proposal, or the proposal's own place in the
        configured export store (``<export.default_target>/<proposal>/...``, where the
        portal puts each proposal's exports): another proposal's place there, or any
        other bucket, would be written with the service's credentials."""
        target = self.intent.export_to
        if not target:
            return
        configured = self.settings.export_target.rstrip("/")
        if "://" in target and not target.startswith("file://"):
            parts = target.split("://", 1)[1].split("/")
            if ".." in parts or "." in parts:
                raise _refuse(f"export target {target}: '..' is not allowed in paths")
            own = f"{configured}/{proposal}"
            if "://" in configured and (target.rstrip("/") + "/").startswith(own + "/"):
                return
            if "://" in configured and target.rstrip("/") == configured and self._adds(proposal):
                return  # a run's prefix: its results go to <prefix>/<proposal>/...
            raise _refuse(
                f"export target {target} is not this proposal's place in the export store "
                f"({own}/...): exports to object stores go there"
                if "://" in configured
                else f"export target {target}: no object store is configured for exports "
                "(export.default_target); export to a folder of the proposal"
            )
        folder = resolved(target.removeprefix("file://"))
        store = resolved(configured.removeprefix("file://"))
        if _inside(folder, store):
            if _inside(folder, store / proposal):
                return
            raise _refuse(
                f"export target {target} is not this proposal's place in the export folder "
                f"({store / proposal}/...)"
            )
        self.inside(folder, proposal, proposal_dir, f"export target {target}")

    def _adds(self, proposal: str) -> bool:
        """Whether a run's results go under ``<export_to>/<proposal>/`` (its input follows
        the data policy: ``flow_export_uri``)."""
        if self.intent.export_source or not self.intent.raw:
            return False
        from calypso.tasks.raw.data_policy import RawDataset

        try:
            raw = RawDataset.from_path(Path(self.intent.raw.split("::", 1)[0]).absolute())
        except Exception:
            return False
        return raw.proposal == proposal

    def _export(self) -> Confined:
        """An export copies files, not what their HDF5 links name: its files (symlinks
        resolved) must be inside the proposal."""
        from calypso.registry.access.links import dataset_files

        source = self.intent.export_source or ""
        proposal, proposal_dir = self.proposal_of(source, "export source")
        self.member(proposal, source, "export source")
        for entry, target, link in dataset_files(Path(source)):
            if link:
                self.inside(target, proposal, proposal_dir, f"the symlink {entry} in {source}")
            _no_hard_link(target, f"the file {entry} in {source}")
        self._target(proposal, proposal_dir)
        return Confined(proposal, proposal_dir, self.roots)


def confine(identity: Identity, intent: Intent, settings: CalypsoSettings) -> Confined:
    """Refuse ``intent`` (:class:`AccessError`, one line, nothing done) unless all it
    touches lies inside one proposal that ``identity`` may see (module docstring)."""
    return _Check(identity, intent, settings).run()


def still_in_proposal(settings: CalypsoSettings, raw: str | None, paths: list[Path]) -> None:
    """Refuse to write at ``paths`` unless each still leads into the proposal of the input
    ``raw``: checked as the run began, a folder may have been swapped since for a symlink
    into another proposal (by a member of this one). Nothing to check without data roots.
    """
    # The proposal the input's path names as given (the input may have been swapped too).
    named = named_proposal(settings.data_roots, raw) if raw else None
    if named is None:
        return  # checked when it began: no data roots, or not under one (one machine)
    proposal, proposal_dir = named
    for path in paths:
        if not _inside(resolved(path), proposal_dir):
            raise _refuse(
                f"{path} now leads outside proposal {proposal} (changed since the run was "
                "checked): nothing is written there"
            )


def named_proposal(data_roots: Sequence[Path | str], path: str | Path) -> tuple[str, Path] | None:
    """The proposal ``path`` (``FILE::/dataset`` too) names under a data root before its
    symlinks are resolved, and that proposal's real folder; None under no root (or for a
    root itself). A root is matched as configured, then as the folder it leads to."""
    given = Path(str(path).split("::", 1)[0]).expanduser().absolute()
    roots = [(Path(root).expanduser().absolute(), resolved(root)) for root in data_roots]
    for named, real in [*roots, *[(real, real) for _, real in roots]]:
        if given.is_relative_to(named) and given != named:
            proposal = given.relative_to(named).parts[0]
            return proposal, real / proposal
    return None
