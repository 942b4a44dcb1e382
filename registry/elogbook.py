"""The proposal's e-logbook: every finished run posts its summary there, through ICAT+.

With the ICAT backend and ICAT+ configured (URL and token), a run that completes posts one
message (technique, dataset, key figures, results folder, a link to the flow run) and its
quick-look PNG; a run that fails posts one message with its error line. Posts go through
the catalogue's outbox, like ICAT registrations (:mod:`calypso.registry.icat`): owed in the
catalogue first (one entry per record, outcome and kind, so never twice), leased to one
sender, tried at once and, when ICAT+ cannot be reached, left pending for ``calypso
catalogue flush`` or ``calypso serve``'s periodic flush. A post never fails the run.

pyicat-plus sends each post (``IcatClient.send_message`` / ``send_binary_data``). It treats
a request that timed out as done ("no confirmation that the call succeeded"); the outbox
needs the answer, so such a post is reported unconfirmed and stays pending (it may then
appear twice: ICAT+ has no message id to recognise a copy by).
"""

from __future__ import annotations

import base64
import html
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import calypso
from calypso.registry.access.secrets import redact, remember
from calypso.registry.catalogue import ProcessedDataset, SQLiteCatalogue
from calypso.settings import IcatSettings

DESTINATION = "icat-elogbook"
# A quick look larger than this is named in the message, not posted (ICAT+ keeps each
# attachment in its database; a figure this large is not a quick look).
MAX_IMAGE_BYTES = 8 * 2**20
MAX_FIGURES = 24  # key figures in a message at most: the results table has them all
# The error line of a failed run, in characters at most.
MAX_ERROR_CHARS = 500


class Unconfirmed(Exception):
    """ICAT+ did not answer a post in time: it may or may not have it."""


def enabled(settings: IcatSettings) -> bool:
    """Posts are made: turned on, and ICAT+ configured (URL and token)."""
    return bool(settings.elogbook and settings.icatplus_url and settings.icatplus_token)


def run_posts(
    record: ProcessedDataset,
    summary: dict[str, Any] | None,
    figures: Iterable[tuple[str, Any]],
    run_url: str | None,
) -> list[tuple[str, dict[str, Any]]]:
    """The posts owed for a finished run, as (kind, payload): its message, and its quick
    look when it completed with one; none without a proposal and beamline to post to."""
    if not (record.proposal and record.beamline):
        return []
    raw = Path(record.raw_dataset)
    common = {
        "beamline": record.beamline,
        "proposal": record.proposal,
        # The dataset's name and collection, as Bliss tags its own e-logbook posts.
        "tags": ["calypso", record.technique, raw.parent.name],
    }
    failed = record.status == "failed"
    message = {
        **common,
        "kind": "message",
        "path": record.processed_path,
        "dataset": raw.name,
        "msg_type": "error" if failed else "info",
        "text": _message(record, summary or {}, list(figures), run_url),
    }
    posts = [("message", message)]
    png = (summary or {}).get("png")
    if not failed and png and Path(png).is_file() and Path(png).stat().st_size <= MAX_IMAGE_BYTES:
        data = base64.b64encode(Path(png).read_bytes()).decode("ascii")
        posts.append(("image", {**common, "kind": "image", "path": png, "data": data}))
    return posts


def _message(
    record: ProcessedDataset,
    summary: dict[str, Any],
    figures: list[tuple[str, Any]],
    run_url: str | None,
) -> str:
    """The message, in HTML (ICAT+ shows it formatted, not editable)."""
    e = html.escape
    raw = Path(record.raw_dataset)
    outcome = "failed" if record.status == "failed" else "completed"
    sample = f", sample {e(record.sample_name)}" if record.sample_name else ""
    lines = [f"raw dataset: {e(record.raw_dataset)}"]
    if record.status == "failed":
        error = (record.message or "no message").strip().splitlines() or ["no message"]
        lines.insert(0, f"<b>error:</b> {e(error[0][:MAX_ERROR_CHARS])}")
    else:
        lines.append(f"results: {e(record.processed_path)}")
    if record.frames is not None and record.duration_s is not None:
        unit = summary.get("unit", "frames")
        lines.append(f"{record.frames} {e(str(unit))} in {record.duration_s:g} s")
    lines += [f"{e(name)}: {e(_short(value))}" for name, value in figures[:MAX_FIGURES]]
    if len(figures) > MAX_FIGURES:
        lines.append(f"... {len(figures) - MAX_FIGURES} more in the run's results table")
    lines += [f"warning: {e(str(w))}" for w in summary.get("warnings") or []]
    if summary.get("png"):
        lines.append(f"quick look: {e(summary['png'])}")
    if run_url:
        lines.append(f'flow run: <a href="{e(run_url)}">{e(record.flow_run_id or run_url)}</a>')
    items = "".join(f"<li>{line}</li>" for line in lines)
    return (
        f"<p><b>Calypso {e(record.technique)} {outcome}</b>: {e(raw.name)}"
        f" (collection {e(raw.parent.name)}{sample})</p><ul>{items}</ul>"
    )


def _short(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)[:200]


class ElogbookSender:
    """pyicat-plus' ICAT+ client, whose posts raise unless ICAT+ answered them."""

    def __init__(self, settings: IcatSettings) -> None:
        from pyicat_plus.client.main import IcatClient

        token = settings.icatplus_token.get_secret_value() if settings.icatplus_token else None
        remember(token)  # it is in every URL pyicat-plus posts to: out of errors and logs
        self.client = IcatClient(
            elogbook_url=settings.icatplus_url,
            elogbook_token=token,
            elogbook_timeout=settings.timeout_s,
            elogbook_metadata={"software": f"calypso_v{calypso.__version__}"},
        )
        inner = self.client._elogbook_client
        inner._data_acquisition_api = _Answered(inner._data_acquisition_api, settings.timeout_s)

    def send(self, payload: dict[str, Any]) -> None:
        where = {"beamline": payload["beamline"], "proposal": payload["proposal"]}
        if payload["kind"] == "message":
            self.client.send_message(
                payload["text"],
                msg_type=payload["msg_type"],
                dataset=payload["dataset"],
                editable=False,
                mimetype="text/html",
                tags=payload["tags"],
                **where,
            )
        else:
            self.client.send_binary_data(
                base64.b64decode(payload["data"]),
                mimetype="image/png",
                tags=payload["tags"],
                **where,
            )

    def close(self) -> None:
        self.client.disconnect()


class _Answered:
    """Stands in for the ICAT+ API object pyicat-plus posts with: the same calls, but a
    timeout raises :class:`Unconfirmed`, which pyicat-plus does not swallow."""

    def __init__(self, api: Any, timeout_s: float) -> None:
        self._api, self._timeout_s = api, timeout_s

    def __getattr__(self, name: str) -> Any:
        import urllib3

        method = getattr(self._api, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return method(*args, **kwargs)
            except urllib3.exceptions.TimeoutError:
                raise Unconfirmed(f"ICAT+ did not answer within {self._timeout_s:g} s") from None

        return call


def refused(exc: BaseException) -> bool:
    """ICAT+ answered and refused this post (4xx: e.g. a proposal it does not know), which
    a retry of the others would not change; anything else (no answer, 5xx) stops a round."""
    status = getattr(exc, "status", None)
    return isinstance(status, int) and 400 <= status < 500


def describe(exc: BaseException) -> str:
    """One line saying why a post failed, without the token (it is in the URL)."""
    import urllib3

    reason = getattr(exc, "reason", None)
    if isinstance(exc, urllib3.exceptions.MaxRetryError) and reason is not None:
        text = f"ICAT+ cannot be reached: {reason}"  # urllib3 names the URL, token and all
    else:
        text = f"{type(exc).__name__}: {exc}"
    return redact(" ".join(text.split()))[:400]


def deliver(
    local: SQLiteCatalogue, settings: IcatSettings, owner: str, lease_s: float
) -> tuple[list[int], str | None]:
    """Post what is owed to the e-logbook, oldest first: the records posted, and the error
    that stopped the round (ICAT+ unreachable or failing) or held an entry back (refused).

    A refused entry stays leased until the round ends, so the round moves on to the next
    (an entry that cannot be posted must not hold back every later run's); it is then
    pending again, with its error. With posts off (or ICAT+ not configured) nothing is
    sent and owed posts wait."""
    if not enabled(settings):
        return [], None
    posted: list[int] = []
    held: list[tuple[int, str]] = []
    error: str | None = None
    sender: ElogbookSender | None = None
    try:
        while entry := local.claim(DESTINATION, owner, lease_s):
            if any(entry.id == held_id for held_id, _ in held):
                break  # a round longer than a lease: it came back
            try:
                if sender is None:
                    sender = ElogbookSender(settings)
                if not local.renew(entry.id, owner, lease_s):
                    continue  # the lease ran out meanwhile: another sender has it
                sender.send(entry.payload)
            except Exception as exc:
                error = describe(exc)
                if refused(exc):
                    held.append((entry.id, error))
                    continue
                local.settle(entry.id, error=error, owner=owner)
                break
            local.settle(entry.id)
            _forget_image(local, entry.id, entry.payload)
            posted.append(entry.record_id)
    finally:
        for entry_id, why in held:
            local.settle(entry_id, error=why, owner=owner)
        if sender is not None:
            sender.close()
    return posted, error


def _forget_image(local: SQLiteCatalogue, entry_id: int, payload: dict[str, Any]) -> None:
    """A posted image's bytes leave the catalogue (ICAT+ has them; its file stays)."""
    if payload.get("kind") == "image":
        from calypso.registry.outbox import replace_payload

        lighter = {k: v for k, v in payload.items() if k != "data"}
        with local._connect() as db:
            replace_payload(db, entry_id, lighter, state="delivered")
