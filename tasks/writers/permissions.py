"""Who may read processed results: the proposal's group and a configured mode, given to
every file and folder before it is renamed into place, so that no result is ever visible
with other permissions (docs/security.md, "Files").

The group is the one owning the raw dataset's proposal folder (``<root>/<proposal>``,
where the facility gives each proposal its group), or ``processed_data.group``. The
modes are ``processed_data.file_mode`` and ``folder_mode`` (0640 and 2750: the owner
writes, the proposal's members read, nobody else; folders setgid, so what is added later
keeps the group), applied whatever the umask; a world-writable mode is refused.
While a run works, its part folder is the owner's alone (0700).
"""

from __future__ import annotations

import errno
import grp
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from calypso.errors import ConfigurationError, OutputError

WORK_DIR_MODE = 0o700  # a run's part folder: its files are not results yet
_SPECIAL = stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX


def parse_mode(text: object, kind: str) -> str:
    """A configured mode, checked: octal text ('0640', '2750'); never world-writable; the
    owner can read (files) or list and add to (folders) what Calypso writes; no set-user-id
    or sticky bit, and set-group-id on folders only. Returns it as 4 octal digits."""
    if not isinstance(text, str):  # a TOML 640 is decimal, 0o640 reads 416: both mislead
        raise ValueError(f'write the mode as text in octal, e.g. "0640", not {text!r}')
    raw = text.strip().lower().removeprefix("0o")
    try:
        mode = int(raw, 8)
    except ValueError:
        raise ValueError(f"{text!r} is not an octal mode such as '0640'") from None
    if not 0 <= mode <= 0o7777:
        raise ValueError(f"{text!r} is not an octal mode such as '0640'")
    if mode & stat.S_IWOTH:
        raise ValueError(
            f"{raw} makes results world-writable (o+w), which Calypso refuses: anyone could "
            "change or replace them; use e.g. '0640' for files, '2750' for folders"
        )
    owner = stat.S_IRUSR | stat.S_IWUSR if kind == "file" else stat.S_IRWXU
    if mode & owner != owner:
        needed = "read and write (0600)" if kind == "file" else "read, write, list (0700)"
        raise ValueError(f"{raw}: the owner must be able to {needed} the results")
    allowed = 0 if kind == "file" else stat.S_ISGID
    if mode & _SPECIAL & ~allowed:
        raise ValueError(
            f"{raw}: no set-user-id, set-group-id or sticky bit on result {kind}s"
            + (" (set-group-id is for folders)" if kind == "file" else "")
        )
    return f"{mode:04o}"


@dataclass(frozen=True)
class Permissions:
    """Modes and group of the results of one run (``gid`` None: the file system's)."""

    file_mode: int = 0o640
    folder_mode: int = 0o2750
    gid: int | None = None
    source: str = ""  # where the group comes from, for messages

    def apply(self, path: Path) -> None:
        """Give ``path`` (a file, or a folder and everything under it) these permissions."""
        if path.is_dir() and not path.is_symlink():
            for folder, _, names in os.walk(path):
                for name in names:
                    self._set(Path(folder) / name, self.file_mode)
                self._set(Path(folder), self.folder_mode)
        else:
            self._set(path, self.file_mode)

    def make_folders(self, folder: Path) -> None:
        """Create ``folder`` and its missing parents, each with this group and folder mode
        (made 0700 first, so none is ever visible with wider permissions)."""
        missing = []
        for parent in (folder, *folder.parents):
            if parent.exists():
                break
            missing.append(parent)
        for path in reversed(missing):
            try:
                path.mkdir(WORK_DIR_MODE)
            except FileExistsError:  # another run made it meanwhile: theirs to set
                continue
            self._set(path, self.folder_mode)

    def make_work_dir(self, work: Path, exist_ok: bool) -> None:
        """A run's part folder: the owner's only (``mkdir`` honours the umask only)."""
        self.make_folders(work.parent)
        work.mkdir(WORK_DIR_MODE, exist_ok=exist_ok)
        os.chmod(work, WORK_DIR_MODE)
        if self.gid is not None:  # fail now, before the work, if the group cannot be given
            self._chown(work)

    def _set(self, path: Path, mode: int) -> None:
        if path.is_symlink():  # a link's own mode means nothing; its target is not ours
            return
        if self.gid is not None:
            self._chown(path)
        # After chown, which clears set-group-id on files and may on folders.
        os.chmod(path, mode)

    def _chown(self, path: Path) -> None:
        try:
            os.chown(path, -1, self.gid, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EACCES):
                raise
            raise OutputError(
                f"cannot give the results in {path.parent} the group {_group_name(self.gid)} "
                f"({self.source}): this account is not a member of it; ask for membership, "
                "or set processed_data.group (CALYPSO_PROCESSED_DATA__GROUP) to a group "
                "of yours"
            ) from None


def _group_name(gid: int | None) -> str:
    try:
        return grp.getgrgid(gid).gr_name if gid is not None else "?"
    except KeyError:
        return str(gid)


def group_id(name: str) -> int:
    """The group ``name`` (or number) names, else a ConfigurationError."""
    if name.isdigit():
        return int(name)
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise ConfigurationError(
            f"processed_data.group: no group {name!r} on this machine "
            "(CALYPSO_PROCESSED_DATA__GROUP): give an existing group name or number"
        ) from None


def proposal_folder(raw: Any, input_path: str | None, data_roots: list[Path]) -> Path | None:
    """The proposal folder of a run's input: ``<root>/<proposal>`` of a raw dataset of the
    data policy, else the first folder under the data root holding the input; None when
    the input is in no proposal (a file on its own, no data roots)."""
    if raw is not None:
        folder = Path(raw.root) / raw.proposal
        return folder if folder.is_dir() else None
    if input_path:
        real = Path(input_path).expanduser().resolve()
        for root in data_roots:
            base = Path(root).expanduser().resolve()
            if real.is_relative_to(base) and real != base:
                return base / real.relative_to(base).parts[0]
    return None


def output_permissions(plan: Any, settings: Any) -> Permissions:
    """The permissions of a run's results under ``settings`` (a CalypsoSettings): the
    configured modes; the configured group, else the proposal folder's."""
    policy = settings.processed_data
    file_mode, folder_mode = int(policy.file_mode, 8), int(policy.folder_mode, 8)
    if policy.group:
        return Permissions(file_mode, folder_mode, group_id(policy.group), "processed_data.group")
    folder = proposal_folder(
        getattr(plan, "raw", None), getattr(plan, "input", None), settings.data_roots
    )
    if folder is None:
        return Permissions(file_mode, folder_mode)
    return Permissions(
        file_mode, folder_mode, folder.stat().st_gid, f"the group of the proposal folder {folder}"
    )


def default_permissions() -> Permissions:
    """The configured modes and group, for results written outside a flow run (a writer
    called on its own), where no proposal is known."""
    from calypso.registry.access.landlock import current_settings

    return output_permissions(None, current_settings())
