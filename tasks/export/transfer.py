"""Sending a processed dataset to object storage, and checking what is there (see the
package's docstring for the protocol: per-object SHA-256, resumable, manifest last)."""

from __future__ import annotations

import fnmatch
import hashlib
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from calypso.errors import ConfigurationError, ExportError
from calypso.settings import CalypsoSettings, ExportSettings
from calypso.tasks.writers.nexus import PARTIAL_PREFIX

MANIFEST_NAME = "MANIFEST.sha256"
CHECKSUM_KEY = "sha256"  # S3 user metadata: x-amz-meta-sha256
_HASH_BLOCK = 8 * 2**20
S3_PROTOCOLS = ("s3", "s3a")

Progress = Callable[[int, int], None]  # (bytes done, bytes in all)


@dataclass(frozen=True)
class LocalFile:
    path: Path
    relative: str  # POSIX path below the dataset folder: the object key's tail
    size: int


@dataclass
class ExportReport:
    """What one export run did."""

    source: str
    uri: str
    manifest: str
    files: int
    bytes: int
    uploaded: list[str] = field(default_factory=list)  # relative paths sent by this run
    skipped: list[str] = field(default_factory=list)  # already there with the right checksum
    uploaded_bytes: int = 0
    verified: bool = False
    seconds: float = 0.0

    @property
    def megabytes_per_s(self) -> float:
        return self.uploaded_bytes / 2**20 / max(self.seconds, 1e-9)


def files_to_export(source: Path, include: list[str] | None = None) -> list[LocalFile]:
    """The dataset's result files (not scratch or half-written ones), matching ``include``
    (shell patterns on the relative path or the file name; all files when empty)."""
    if not source.is_dir():
        raise ExportError(
            f"{source} is not a folder: give a processed dataset folder or a catalogue id "
            "(`calypso catalogue list`)"
        )
    found = []
    for folder, subfolders, names in os.walk(source):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith(PARTIAL_PREFIX))
        for name in sorted(names):
            if name.startswith(PARTIAL_PREFIX) or name == MANIFEST_NAME:
                continue
            path = Path(folder) / name
            relative = path.relative_to(source).as_posix()
            if include and not any(
                fnmatch.fnmatch(relative, pattern) or fnmatch.fnmatch(name, pattern)
                for pattern in include
            ):
                continue
            found.append(LocalFile(path, relative, path.stat().st_size))
    if not found:
        which = f" matching {', '.join(include)}" if include else ""
        raise ExportError(f"{source} holds no result files{which}: nothing to export")
    return found


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


# -- targets ------------------------------------------------------------------


def check_target_uri(uri: str) -> str:
    """Refuse a target URI carrying credentials; return it without a trailing slash."""
    parts = urlsplit(uri)
    if parts.scheme and "@" in parts.netloc:
        raise ConfigurationError(
            f"the export target must not carry credentials ({parts.scheme}://…@…): give the key "
            "pair in CALYPSO_EXPORT__ACCESS_KEY_ID/SECRET_ACCESS_KEY, a Prefect Secret block "
            "(CALYPSO_EXPORT__CREDENTIALS_BLOCK) or the AWS_* variables"
        )
    if parts.scheme in S3_PROTOCOLS and not parts.netloc:
        raise ConfigurationError(f"{uri}: an S3 target needs a bucket, e.g. s3://bucket/prefix")
    if parts.scheme in ("", "file") and "RAW_DATA" in Path(parts.path).parts:
        raise ConfigurationError(
            f"export target {uri} is inside a RAW_DATA folder, which holds raw data only: "
            "export to a folder of your own or to s3://bucket/prefix"
        )
    return uri.rstrip("/")


def _s3_credentials(settings: ExportSettings) -> dict[str, str]:
    if settings.credentials_block:
        from calypso.registry.access.secrets import read_secret_block

        pair = read_secret_block(settings.credentials_block, "CALYPSO_EXPORT__CREDENTIALS_BLOCK")
        if not isinstance(pair, dict) or not {"access_key_id", "secret_access_key"} <= set(pair):
            raise ConfigurationError(
                f"the Prefect Secret block {settings.credentials_block!r} must hold JSON "
                '{"access_key_id": ..., "secret_access_key": ...}'
            )
        return {"key": pair["access_key_id"], "secret": pair["secret_access_key"]}
    if settings.access_key_id and settings.secret_access_key:
        return {
            "key": settings.access_key_id,
            "secret": settings.secret_access_key.get_secret_value(),
        }
    if settings.access_key_id or settings.secret_access_key:
        raise ConfigurationError(
            "CALYPSO_EXPORT__ACCESS_KEY_ID and CALYPSO_EXPORT__SECRET_ACCESS_KEY go together: "
            "set both, or neither to use the AWS_* variables or profile"
        )
    return {}


def open_target(uri: str, settings: ExportSettings) -> tuple[Any, str]:
    """The fsspec file system of ``uri`` and the root path in it."""
    import fsspec

    uri = check_target_uri(uri)
    protocol = fsspec.utils.get_protocol(uri)
    if protocol in S3_PROTOCOLS:
        import s3fs

        config: dict[str, Any] = {
            "connect_timeout": settings.connect_timeout_s,
            "retries": {"max_attempts": settings.retries, "mode": "standard"},
        }
        client: dict[str, Any] = {}
        if settings.region:
            client["region_name"] = settings.region
        fs = s3fs.S3FileSystem(
            endpoint_url=settings.endpoint_url,
            profile=settings.profile,
            client_kwargs=client,
            config_kwargs=config,
            max_concurrency=settings.parts_at_once,
            skip_instance_cache=True,
            **_s3_credentials(settings),
        )
        fs.retries = settings.retries  # s3fs's own retry loop (a class attribute)
        return fs, fs._strip_protocol(uri)
    try:
        fs, root = fsspec.core.url_to_fs(uri)
    except (ValueError, ImportError, OSError) as exc:  # an unknown or unreachable protocol
        raise ConfigurationError(
            f"export target {uri} cannot be opened ({' '.join(str(exc).split())[:200]}): "
            "Calypso exports to a local folder or to s3://bucket/prefix"
        ) from None
    return fs, root


def is_s3(fs: Any) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in S3_PROTOCOLS


def require_writable_target(fs: Any, root: str, uri: str, settings: ExportSettings) -> None:
    """Fail before sending anything when the store refuses us or cannot be reached."""
    if not is_s3(fs):
        try:
            fs.makedirs(root, exist_ok=True)
        except OSError as exc:
            raise ExportError(f"cannot create the export folder {uri}: {exc}") from None
        return
    bucket = root.split("/", 1)[0]
    where = settings.endpoint_url or "AWS S3"
    try:
        fs.call_s3("head_bucket", Bucket=bucket)
    except Exception as exc:
        raise ExportError(_explain_s3_error(exc, bucket, where)) from None


def _explain_s3_error(exc: BaseException, bucket: str, where: str) -> str:
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, PermissionError) or any(
        word in text for word in ("403", "Forbidden", "AccessDenied", "InvalidAccessKeyId")
    ):
        return (
            f"{where} refused access to bucket {bucket!r} (403): check the key pair "
            "(CALYPSO_EXPORT__ACCESS_KEY_ID/SECRET_ACCESS_KEY, the Prefect Secret block or the "
            "AWS_* variables/profile) and that it may write to this bucket"
        )
    if isinstance(exc, FileNotFoundError) or "404" in text or "NoSuchBucket" in text:
        return (
            f"bucket {bucket!r} does not exist at {where}: create it (ask the storage admins) "
            "or correct the target"
        )
    if any(
        word in text for word in ("Connect", "connect", "Timeout", "timed out", "Name or service")
    ):
        return (
            f"cannot reach the object store at {where} ({type(exc).__name__}): check "
            "CALYPSO_EXPORT__ENDPOINT_URL and the network"
        )
    return f"the object store at {where} failed for bucket {bucket!r}: {type(exc).__name__}"


# -- checksums of what is already there ----------------------------------------


def _remote_checksum(fs: Any, path: str) -> str | None:
    if is_s3(fs):
        bucket, key, _ = fs.split_path(path)
        head = fs.call_s3("head_object", Bucket=bucket, Key=key)
        return head.get("Metadata", {}).get(CHECKSUM_KEY)
    digest = hashlib.sha256()
    with fs.open(path, "rb") as stream:
        while block := stream.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _existing_sizes(fs: Any, root: str) -> dict[str, int]:
    try:
        found = fs.find(root, detail=True)
    except FileNotFoundError:
        return {}
    return {path: int(info.get("size") or 0) for path, info in found.items()}


def _abort_unfinished_uploads(fs: Any, root: str) -> int:
    """Multipart uploads of an interrupted export under ``root`` cost storage; drop them."""
    bucket, prefix, _ = fs.split_path(root)
    listing = fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix)
    uploads = listing.get("Uploads", [])
    for upload in uploads:
        fs.call_s3(
            "abort_multipart_upload", Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"]
        )
    return len(uploads)


# -- the export -----------------------------------------------------------------


class _ByteCounter:
    """Bytes sent by all uploads together. Uploads count from s3fs's event-loop thread;
    only the exporting thread reports (Prefect's API calls must not run on that loop)."""

    def __init__(self, total: int, progress: Progress | None) -> None:
        self.total, self.done = total, 0
        self._progress = progress
        self._lock = threading.Lock()
        self._reported = 0.0

    def add(self, count: int) -> None:
        with self._lock:
            self.done += count

    def report(self, final: bool = False) -> None:
        now = time.monotonic()
        if self._progress and (final or now - self._reported >= 0.5):
            self._reported = now
            self._progress(self.done, self.total)

    def callback(self) -> Any:
        from fsspec.callbacks import Callback

        counter = self

        class _Each(Callback):
            def call(self, *args: Any, **kwargs: Any) -> None:
                pass

            def relative_update(self, inc: int = 1) -> None:
                counter.add(inc)

        return _Each()


def export_dataset(
    source: Path,
    uri: str,
    settings: CalypsoSettings,
    include: list[str] | None = None,
    verify: bool = False,
    progress: Progress | None = None,
    record: Any = None,
) -> ExportReport:
    """Send ``source``'s files to ``uri`` (resuming), then the manifest; optionally verify.
    With its catalogue ``record`` (completed), each file's SHA-256, computed for the
    manifest before anything is sent, must be the recorded one: a damaged result is not
    exported."""
    began = time.perf_counter()
    uri = check_target_uri(uri)
    parts = urlsplit(uri)
    if parts.scheme in ("", "file"):
        target = Path(parts.path).expanduser().absolute()
        if target == source.absolute() or source.absolute() in target.parents:
            raise ConfigurationError(
                f"export target {uri} is the result's own folder {source} or inside it: "
                "export to another folder"
            )
    recorded = record.checksums if record is not None and record.status == "completed" else {}
    missing = sorted(name for name in recorded if not (source / name).is_file())
    if missing:
        raise _not_as_recorded(source, record, "missing", missing)
    options = settings.export
    files = files_to_export(source, include)
    # Each file's SHA-256 for the manifest, first: a file changed since its record stops
    # the export before anything is sent or made at the target.
    try:
        with ThreadPoolExecutor(options.files_at_once, thread_name_prefix="hash") as pool:
            digests = pool.map(lambda item: sha256_of(item.path), files)
            checksums = {f.relative: d for f, d in zip(files, digests, strict=True)}
    except OSError as exc:
        raise ExportError(
            f"export of {source} stopped: cannot read {exc.filename}: {exc}"
        ) from None
    changed = [name for name, digest in checksums.items() if recorded.get(name, digest) != digest]
    if changed:
        raise _not_as_recorded(source, record, "changed", changed)
    fs, root = open_target(uri, options)
    require_writable_target(fs, root, uri, options)
    total = sum(f.size for f in files)
    counter = _ByteCounter(total, progress)
    report = ExportReport(
        source=str(source),
        uri=uri,
        manifest=f"{uri}/{MANIFEST_NAME}",
        files=len(files),
        bytes=total,
    )
    try:
        if is_s3(fs):
            _abort_unfinished_uploads(fs, root)
        existing = _existing_sizes(fs, root)
        # Over a finished export, its manifest goes before any object changes: an export
        # stopped midway left the new result's objects under the old manifest, which
        # says the export is complete (a sweep killed one).
        if f"{root}/{MANIFEST_NAME}" in existing:
            fs.rm_file(f"{root}/{MANIFEST_NAME}")

        def send(item: LocalFile) -> tuple[LocalFile, bool]:
            digest = checksums[item.relative]
            target = f"{root}/{item.relative}"
            if existing.get(target) == item.size and _remote_checksum(fs, target) == digest:
                counter.add(item.size)
                return item, False
            if is_s3(fs):
                fs.put_file(
                    str(item.path),
                    target,
                    callback=counter.callback(),
                    # S3 allows 10,000 parts an object
                    chunksize=max(options.part_size_mb * 2**20, -(-item.size // 10_000)),
                    Metadata={CHECKSUM_KEY: digest},
                )
            else:
                fs.makedirs(fs._parent(target), exist_ok=True)
                fs.put_file(str(item.path), target, callback=counter.callback())
            return item, True

        # Largest first: the long multipart uploads start early, small files fill in.
        ordered = sorted(files, key=lambda f: -f.size)
        with ThreadPoolExecutor(options.files_at_once, thread_name_prefix="export") as pool:
            pending = {pool.submit(send, item) for item in ordered}
            while pending:
                finished, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                for future in finished:
                    item, sent = future.result()
                    if sent:
                        report.uploaded.append(item.relative)
                        report.uploaded_bytes += item.size
                    else:
                        report.skipped.append(item.relative)
                counter.report(final=not pending)
        manifest = "".join(f"{checksums[f.relative]}  {f.relative}\n" for f in files)
        fs.pipe_file(f"{root}/{MANIFEST_NAME}", manifest.encode())
        if verify:
            verify_export(uri, settings, expected={f.relative for f in files}, fs=(fs, root))
            report.verified = True
    except ExportError:
        raise
    except Exception as exc:
        where = options.endpoint_url or uri
        if is_s3(fs):
            raise ExportError(
                f"export of {source} to {uri} stopped: "
                f"{_explain_s3_error(exc, root.split('/', 1)[0], where)}; run it again to "
                "resume (objects already sent are kept)"
            ) from None
        raise ExportError(
            f"export of {source} to {uri} stopped: {type(exc).__name__}: {exc}; run it again "
            "to resume"
        ) from None
    report.seconds = time.perf_counter() - began
    return report


def _not_as_recorded(source: Path, record: Any, what: str, names: list[str]) -> ExportError:
    shown = ", ".join(f"{what} {name}" for name in names[:3])
    more = f" (and {len(names) - 3} more)" if len(names) > 3 else ""
    return ExportError(
        f"{source}: {shown}{more} since catalogue record {record.id} was made: the result is "
        "damaged or was modified; run the reduction again rather than export it"
    )


def verify_export(
    uri: str,
    settings: CalypsoSettings,
    expected: set[str] | None = None,
    fs: tuple[Any, str] | None = None,
) -> int:
    """Read every object listed in the manifest back and check its SHA-256 (and, with
    ``expected``, that the manifest lists exactly those files). Returns the file count."""
    uri = check_target_uri(uri)
    target, root = fs or open_target(uri, settings.export)
    try:
        text = target.cat_file(f"{root}/{MANIFEST_NAME}").decode()
    except FileNotFoundError:
        raise ExportError(
            f"{uri} has no {MANIFEST_NAME}: the export never finished; run it again"
        ) from None
    listed = {}
    for number, line in enumerate(text.splitlines(), 1):
        digest, sep, relative = line.partition("  ")
        if not sep or len(digest) != 64:
            raise ExportError(f"{uri}/{MANIFEST_NAME} line {number} is not `SHA256  PATH`")
        listed[relative] = digest
    problems = []
    if expected is not None and set(listed) != expected:
        missing = sorted(expected - set(listed))
        extra = sorted(set(listed) - expected)
        problems.append(f"manifest differs from the dataset (missing {missing}, extra {extra})")
    for relative, digest in listed.items():
        actual = hashlib.sha256()
        try:
            with target.open(f"{root}/{relative}", "rb", block_size=_HASH_BLOCK) as stream:
                while block := stream.read(_HASH_BLOCK):
                    actual.update(block)
        except FileNotFoundError:
            problems.append(f"{relative}: missing")
            continue
        if actual.hexdigest() != digest:
            problems.append(f"{relative}: SHA-256 {actual.hexdigest()[:12]}… != {digest[:12]}…")
    if problems:
        raise ExportError(f"verification of {uri} failed: " + "; ".join(problems[:10]))
    return len(listed)
