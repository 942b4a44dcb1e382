"""A scan in progress followed through Bliss's data streams (``blissdata``), docs/live.md.

:class:`BlissdataScan` is a :class:`~calypso.tasks.raw.live.LiveScan`: it follows one scan
on the blissdata server (Redis with RedisJSON and RediSearch; valkey in the tests) from
its creation to its end. A Lima detector's stream carries no pixels, only Lima's status
(``last_index``, ``last_index_saved``) and where its files are; a frame is handed out
once Lima has closed the file holding it (it went on to the next file, or the stream is
sealed), the rule blissdata itself follows, so it is never read half-written. Frames are
then read from those files (h5py, no file locking). blissdata is imported only here and
in its subclass for XAS maps (:class:`calypso.tasks.raw.live_rows.StreamRows`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from calypso.errors import ParameterError, RawDataError
from calypso.tasks.raw.live import FileRun, LimaFiles, LiveScanInfo, _stalled, read_runs


class StreamServerGone(RawDataError):
    """The blissdata server stopped answering mid-scan: :meth:`BlissdataScan.as_files`
    reads the rest from the Lima files."""


def closed_frames(lima_info: dict[str, Any], last_saved: int, sealed: bool) -> int:
    """How many leading frames lie in Lima files Lima has closed.

    While the stream is open, the file holding frame ``last_saved`` may still be written:
    only the files before it count (an acquisition of ``frame_per_acquisition`` frames
    starts a new file).
    """
    if sealed:
        return last_saved + 1
    per_file = lima_info["frame_per_file"]
    per_acquisition = lima_info.get("frame_per_acquisition") or 0
    acquisition, in_acquisition = (
        divmod(last_saved, per_acquisition) if per_acquisition else (0, last_saved)
    )
    return max(0, acquisition * per_acquisition + (in_acquisition // per_file) * per_file)


def wait_for_scan(url: str, since: str | None = None, timeout: float = 10.0) -> tuple[str, str]:
    """The next scan created on the server after ``since`` (a timetag; None: from now):
    ``(timetag, key)``, or a RawDataError after ``timeout`` seconds."""
    from blissdata.exceptions import NoScanAvailable

    store = _connect(url)
    try:
        return store.get_next_scan(since=since, timeout=max(timeout, 0.001))
    except NoScanAvailable:
        raise RawDataError(
            f"no scan started on the blissdata server {url} within {timeout} s"
        ) from None


def load_scan(store: Any, key: str) -> Any:
    """blissdata's scan ``key`` from ``store`` (a DataStore), with every stream it has.

    blissdata's ``load_scan`` reads the scan's model (which holds its streams) before its
    state: a scan prepared and started between the two reads comes as STARTED without its
    streams, and no update brings them until its next state, at its end (seen under load:
    a map's spectra all handed out when it stopped). The model is saved with the PREPARED
    state in one transaction, so a scan known prepared is loaded again, whole.
    """
    from blissdata.redis_engine.scan import ScanState

    scan = store.load_scan(key)
    if scan.state >= ScanState.PREPARED:
        scan = store.load_scan(key)
    return scan


def _connect(url: str):
    import redis
    from blissdata.redis_engine.store import DataStore

    try:
        return DataStore(url)
    except (redis.exceptions.RedisError, RuntimeError) as exc:
        raise RawDataError(
            f"no blissdata server answers at {url} ({exc}): start it (Bliss's Redis with "
            "RedisJSON and RediSearch), or follow the growing files instead (--live files)"
        ) from None


class BlissdataScan:
    """One scan on a blissdata server, from its creation to its end.

    ``detector`` picks the Lima stream (``pilatus`` or ``pilatus:image``; default: the
    only one); frames are handed out once they are in closed Lima files and every
    counter named in ``counters`` has as many points.
    """

    def __init__(
        self,
        url: str,
        key: str,
        *,
        detector: str | None = None,
        counters: tuple[str, ...] = (),
        stall_timeout: float = 60.0,
    ) -> None:
        from blissdata.exceptions import ScanLoadError

        self.url = url
        self.key = key
        self.stall_timeout = stall_timeout
        self._detector = detector
        self._required = tuple(counters)
        self._store = _connect(url)
        try:
            self._scan = load_scan(self._store, key)
        except ScanLoadError as exc:
            raise RawDataError(f"scan {key} cannot be loaded from {url}: {exc}") from None
        self._lima = None  # the Lima stream, once the scan is prepared
        self._status = None  # a cursor on its status events
        self._saved = -1
        self._sealed = False
        self._handed = 0
        self._progress = time.monotonic()

    # -- what is known of the scan --------------------------------------------------

    @property
    def state(self):
        """blissdata's ScanState (CREATED, PREPARED, STARTED, STOPPED, CLOSED)."""
        return self._scan.state

    @property
    def info(self) -> LiveScanInfo:
        streams = self._scan.streams
        return LiveScanInfo(
            number=self._scan.number,
            # Bliss's title says the grid (``amesh sy 0 1 4 ...``): the dataset file may
            # not hold it yet when the first frames come.
            name=self._scan.info.get("title") or self._scan.name,
            npoints=self._scan.info.get("npoints"),
            detectors=tuple(n for n, s in streams.items() if s.plugin == "lima"),
            counters=tuple(n for n, s in streams.items() if _is_counter(s)),
        )

    @property
    def end_reason(self) -> str | None:
        """Bliss's ``end_reason`` (SUCCESS, USER_ABORT, FAILURE ...) once the scan is closed."""
        return self._scan.info.get("end_reason")

    @property
    def frames(self) -> int:
        return self._handed

    @property
    def finished(self) -> bool:
        """Lima's stream is sealed, all its frames handed out, and the scan closed (its
        ``end_reason`` known)."""
        from blissdata.redis_engine.scan import ScanState

        closed = self._scan.state >= ScanState.CLOSED
        return closed and self._sealed and self._handed >= self._saved + 1

    @property
    def partial(self) -> bool:
        """Finished with fewer frames than the scan's ``npoints`` or not ending in SUCCESS."""
        npoints = self._scan.info.get("npoints")
        short = npoints is not None and self._handed < npoints
        return self.finished and (short or self.end_reason not in (None, "SUCCESS"))

    # -- following it ---------------------------------------------------------------

    def ready(self) -> list[tuple[int, int]]:
        with self._server_gone_named():
            return self._ready()

    def _ready(self) -> list[tuple[int, int]]:
        from blissdata.exceptions import ScanNotFoundError

        try:
            available, changed = self._available()
        except ScanNotFoundError:
            raise RawDataError(
                f"scan {self.key} vanished from the blissdata server {self.url} while being "
                f"read ({self._handed} {self.points} were handed out)"
            ) from None
        if available > self._handed:
            first, self._handed = self._handed, available
            self._progress = time.monotonic()
            return [(first, available)]
        self._check_stall(changed)
        return []

    points = "frames"  # what is handed out, in messages

    def _available(self) -> tuple[int, bool]:
        """How many frames can be handed out now, and whether anything changed since the
        last look (the stall time-out counts from the last change)."""
        changed = self._update_state()
        if self._lima is None:
            return 0, changed
        changed = self._update_status() or changed
        available = closed_frames(self._lima.info["lima_info"], self._saved, self._sealed)
        for name in self._required:
            available = min(available, len(self._scan.streams[name]))
        return available, changed

    def _update_state(self) -> bool:
        from blissdata.redis_engine.scan import ScanState

        changed = False
        while self._scan.update(block=False):
            changed = True
        if self._lima is None and self._scan.state >= ScanState.PREPARED:
            self._lima = self._pick_detector()
            if self._lima is not None:
                from blissdata.streams.default import Stream

                self._status = Stream(self._lima.event_stream).cursor()
        return changed

    def _pick_detector(self):
        from blissdata.redis_engine.scan import ScanState

        streams = self._scan.streams
        lima = {n: s for n, s in streams.items() if s.plugin == "lima"}
        if not lima and self._scan.state < ScanState.STOPPED:
            # Its streams not seen yet (a scan not yet prepared): looked for again at its
            # next state; the stall time-out still bounds the wait.
            return None
        wanted = self._detector
        chosen = [n for n in lima if wanted is None or n == wanted or n.split(":")[0] == wanted]
        if len(chosen) != 1:
            raise ParameterError(
                f"scan {self.key} has Lima streams {sorted(lima) or 'none'}: "
                + ("name one with detector=" if chosen else f"none is {wanted!r}")
            )
        missing = [n for n in self._required if n not in streams]
        if missing:
            raise ParameterError(
                f"scan {self.key} has no counter {', '.join(missing)}; its counters: "
                f"{sorted(n for n, s in streams.items() if _is_counter(s))}"
            )
        stream = lima[chosen[0]]
        if "file_path" not in stream.info["lima_info"]:
            raise RawDataError(
                f"{chosen[0]} of scan {self.key} is not saved to files: its frames live only "
                "in the Lima server's memory, which Calypso does not read"
            )
        return stream

    def _update_status(self) -> bool:
        from blissdata.exceptions import EndOfStream

        changed = False
        while not self._sealed:
            try:
                view = self._status.read(block=False, last_only=True)
            except EndOfStream:
                self._sealed = changed = True
                break
            if view is None:
                break
            status = view.get_data()[-1]
            self._saved = max(self._saved, int(status.get("last_index_saved", -1)))
            changed = True
        return changed

    def _check_stall(self, changed: bool) -> None:
        if changed:
            self._progress = time.monotonic()
            return
        waited = time.monotonic() - self._progress
        if not self.finished and waited > self.stall_timeout:
            what = f"scan {self.key} on {self.url} is {self._scan.state.name}"
            if self._lima is not None:
                what += f" with {self._saved + 1} frames of {self._lima.name} saved"
            raise _stalled(what, waited)

    # -- reading --------------------------------------------------------------------

    def references(self, first: int, stop: int) -> list[tuple[str, str, int]]:
        """Which Lima file, dataset and index hold frames ``first`` to ``stop - 1``."""
        if self._lima is None or not 0 <= first < stop <= self._handed:
            raise ParameterError(
                f"frames {first}-{stop - 1} of scan {self.key} are not all handed out yet "
                f"({self._handed} are)"
            )
        with self._server_gone_named():
            refs = self._lima.get_references(slice(first, stop))
        return [(r.file_path, r.data_path, r.index) for r in refs]

    def locations(self, first: int, stop: int) -> list[FileRun]:
        runs: list[list] = []  # [path, dataset, first index, stop index]
        for path, dataset, index in self.references(first, stop):
            if runs and runs[-1][:2] == [path, dataset] and runs[-1][3] == index:
                runs[-1][3] += 1
            else:
                runs.append([path, dataset, index, index + 1])
        return [(path, dataset, lo, hi) for path, dataset, lo, hi in runs]

    def read(self, first: int, stop: int) -> np.ndarray:
        return read_runs(self.locations(first, stop))

    def read_counters(self, first: int, stop: int) -> dict[str, np.ndarray]:
        """The points ``first`` to ``stop - 1`` of every counter that has them all."""
        with self._server_gone_named():
            return {
                name: np.asarray(stream[first:stop], dtype=np.float64)
                for name, stream in self._scan.streams.items()
                if _is_counter(stream) and len(stream) >= stop
            }

    @contextmanager
    def _server_gone_named(self) -> Iterator[None]:
        """A server that stops answering while frames or counters are read is named as in
        :meth:`ready` (the caller then reads the files: :meth:`as_files`)."""
        import redis

        try:
            yield
        except redis.exceptions.RedisError as exc:
            raise StreamServerGone(
                f"the blissdata server {self.url} went away while scan {self.key} was read "
                f"({exc}); {self._handed} frames were handed out. as_files() reads the rest "
                "from the Lima files"
            ) from None

    def as_files(self) -> LimaFiles:
        """The same scan's remaining frames from its Lima files (the server went away):
        the frames already handed out are not handed out again."""
        if self._lima is None and self._handed == 0 and self._scan.info.get("filename"):
            # Gone before the scan named its Lima files: found as growing files are found.
            from calypso.tasks.plans.live import open_live_scan

            number = self._scan.number
            files, _, _ = open_live_scan(
                "files", Path(self._scan.info["filename"]), [number], self._detector,
                stall_timeout=self.stall_timeout,
            )  # fmt: skip
            return files
        if self._lima is None:
            raise RawDataError(f"scan {self.key} never got as far as naming its Lima files")
        lima = self._lima.info["lima_info"]
        info = self._scan.info
        return LimaFiles(
            lima["file_path"],
            lima["data_path"],
            first_file=lima.get("file_offset", 0),
            npoints=info.get("npoints"),
            dataset_file=info.get("filename"),
            scan=self._scan.number,
            detector=self._lima.name.split(":")[0],
            stall_timeout=self.stall_timeout,
            skip=self._handed,
        )

    def close(self) -> None:
        self._store._redis.connection_pool.disconnect()


def _is_counter(stream) -> bool:
    """A stream of one number per point (Bliss's counters, timers, motors)."""
    return stream.plugin is None and stream.kind == "array" and tuple(stream.shape) == ()
