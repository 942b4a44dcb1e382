"""Lima's EDF files while they are written: one text header a frame, then its pixels,
frame after frame, appended (docs/live.md).

fabio parses the headers; what is kept here is where each whole frame begins, so that
each look at a growing file parses only the frames added since the last one, and a run
of frames is read by parsing only its own headers. fabio alone parses every header of
the file each time: ~50 µs a frame, so 0.1 s a look at a file of 2,000 frames, and
as much again for each run of frames read from it (measured here, docs/performance.md).
"""

from __future__ import annotations

import io
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from calypso.errors import RawDataError

_KEPT_FILES = 16  # files whose frame offsets a process keeps (a scan's few growing ones)
_HEAD_BYTES = 512  # an EDF header block: its first frame's header, time stamps included


@dataclass
class _Frames:
    """Where the whole frames of one EDF file begin, as far as it was looked at."""

    inode: int
    starts: list[int] = field(default_factory=list)  # each whole frame's header offset
    end: int = 0  # the byte after the last whole frame
    first_number: int | None = None  # Lima's acq_frame_nb of frame 0
    general: bool = False  # a general header (not Lima's): parsed whole at each look
    head: bytes = b""  # the file's first bytes: rewritten in place, it is looked at afresh


_known: OrderedDict[str, _Frames] = OrderedDict()
_lock = threading.Lock()  # a worker's threads read the same files


class _Window(io.RawIOBase):
    """Bytes ``start`` to ``stop`` of an open file, as a file of their own: fabio parses
    the headers of these frames only."""

    def __init__(self, raw: io.BufferedReader, start: int, stop: int, name: str) -> None:
        super().__init__()
        self._raw, self._start, self._stop, self.name = raw, start, stop, name
        self._position = 0
        self.lock = threading.Lock()  # fabio reads a frame's pixels under its file's lock

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, data) -> int:  # fabio takes a stream that has both
        raise OSError(f"{self.name} is read only")

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._position}.get(whence, self._stop - self._start)
        self._position = max(0, base + offset)
        return self._position

    def read(self, size: int = -1) -> bytes:
        left = max(0, self._stop - self._start - self._position)
        size = left if size is None or size < 0 else min(size, left)
        self._raw.seek(self._start + self._position)
        data = self._raw.read(size)
        self._position += len(data)
        return data

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()


def open_frames(path: str | Path, start: int = 0, stop: int | None = None):
    """fabio's ``EdfImage`` of the frames between bytes ``start`` and ``stop`` (the end)
    of an EDF file, their headers parsed, no pixel read yet; ``OSError`` while the first
    of them is not whole. A later header caught half written ends the frames read:
    fabio marks the file incomplete, as it does a frame whose pixels are not all there
    (``incomplete_data``)."""
    from fabio.edfimage import EdfImage

    raw = open(path, "rb")  # noqa: SIM115 (closed with the image)
    end = os.fstat(raw.fileno()).st_size if stop is None else stop
    window = _Window(raw, start, end, str(path))
    try:
        return EdfImage().read(window)
    except OSError:
        window.close()
        raise
    except Exception as exc:  # fabio's parser fails in its own ways on a header in flux
        window.close()
        raise OSError(f"{path} cannot be read as EDF (yet): {exc}") from None


def edf_look(path: str | Path, size: int, inode: int) -> tuple[int, int, int | None]:
    """(frames wholly on disk, frames begun, Lima's number of the first frame) of an EDF
    file of ``size`` bytes another process may still write, parsing only the frames added
    since the last look (a file replaced or cut short is looked at afresh)."""
    key = str(path)
    with _lock:
        known = _known.pop(key, None)
        if known is None or known.inode != inode or size < known.end or known.general:
            known = _Frames(inode)
        elif known.head and _head(path, len(known.head)) != known.head:
            known = _Frames(inode)  # the same file written again from its start
        _known[key] = known
        while len(_known) > _KEPT_FILES:
            _known.popitem(last=False)
        if size > known.end:
            _extend(path, known, size)
    whole = len(known.starts)
    return whole, whole + (size > known.end), known.first_number


def _extend(path: str | Path, known: _Frames, size: int) -> None:
    """Add the frames whole within ``size`` bytes after ``known.end``."""
    try:
        image = open_frames(path, known.end, size)
    except OSError:
        if known.end == 0:
            raise  # not even the first header is whole: unreadable yet
        with open(path, "rb") as raw:
            raw.seek(known.end)
            begun = raw.read(1)
        if begun not in (b"", b"{"):  # pixels where the next frame's header should be
            raise RawDataError(
                f"{path}: the bytes after its last whole frame (at {known.end}) begin no "
                "EDF header: the file is not written a frame at a time (Lima's EDFConcat "
                "saving rewrites its one header); reduce the scan offline once it has ended"
            ) from None
        return  # the next frame's header is being written
    try:
        offset = known.end
        for index in range(image.nframes):
            frame = image.get_frame(index)
            if getattr(frame, "incomplete_data", False) or frame.start + frame.blobsize > (
                size - known.end
            ):
                break
            known.starts.append(offset)
            offset = known.end + frame.start + frame.blobsize
            if len(known.starts) == 1:
                number = frame.header.get("acq_frame_nb")
                known.first_number = int(number) if str(number).isdigit() else None
        known.general = image.generalframe is not None
        known.end = offset
        if not known.head and known.starts:
            known.head = _head(path, min(_HEAD_BYTES, known.end))
    finally:
        image.close()


def _head(path: str | Path, size: int) -> bytes:
    with open(path, "rb") as raw:
        return raw.read(size)


def iter_edf(path: str | Path, first: int, stop: int) -> Iterator[np.ndarray]:
    """Frames ``first`` to ``stop - 1`` of an EDF file, all of them whole, one at a time:
    once the file's frames are known, only their own headers are parsed."""
    try:
        status = os.stat(path)
        whole, _, _ = edf_look(path, status.st_size, status.st_ino)
        with _lock:
            known = _known.get(str(path))
            starts = list(known.starts) if known is not None and not known.general else []
        base = first if first < len(starts) else 0  # the frame the bytes read begin with
        begin = starts[base] if starts else 0
        end = starts[stop] if stop < len(starts) else None
        image = open_frames(path, begin, end)
    except OSError as exc:
        raise RawDataError(
            f"frames {first}-{stop - 1} of Lima file {path} cannot be read ({exc}); the "
            "file is announced as complete"
        ) from None
    try:
        for index in range(first, stop):
            at = index - base
            frame = image.get_frame(at) if at < image.nframes else None
            if frame is None or getattr(frame, "incomplete_data", False):
                raise RawDataError(
                    f"{path} holds {max(whole, base + image.nframes)} frames, frame {index} "
                    f"is not whole, frames {first}-{stop - 1} were announced: the Lima file "
                    "was truncated or replaced"
                )
            yield frame.data
    finally:
        image.close()
