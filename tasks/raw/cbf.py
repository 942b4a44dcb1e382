"""Checking a CBF image before its pixels or its header are trusted.

fabio takes the image size from the binary section's MIME header and decodes that many
values, whatever the binary holds: a fastest dimension off by one gives an image of
nearly the right size whose rows drift one pixel further each row (spots smeared into
streaks: thousands of false spots); a byte count or checksum that disagrees is only
logged; a header that is not ASCII comes back as bytes, and the geometry parsed from it
fails later with a traceback. So the sections of every CBF are read here first and
compared with each other: the header text, the announced size and checksum, and the
number of values the byte-offset stream really holds.
"""

from __future__ import annotations

import base64
import bz2
import gzip
import hashlib
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from fabio.compression import decByteOffset

from calypso.errors import RawDataError

CBF_SUFFIXES = (".cbf", ".cbf.gz", ".cbf.bz2")
BINARY_SECTION = b"--CIF-BINARY-FORMAT-SECTION--"
STARTER = b"\x0c\x1a\x04\xd5"  # where the binary data starts, after the MIME header
ELEMENT_TYPES = {
    f"{sign} {bits}-bit integer": f"{'u' if sign == 'unsigned' else ''}int{bits}"
    for sign in ("signed", "unsigned")
    for bits in (8, 16, 32, 64)
}


@dataclass(frozen=True)
class CbfInfo:
    """What a checked CBF holds: its header text, image shape and pixel type."""

    header: str  # the CIF text before the binary section (the miniCBF lines included)
    shape: tuple[int, int]  # (rows, columns)
    dtype: str


def is_cbf(path: str | Path) -> bool:
    return str(path).lower().endswith(CBF_SUFFIXES)


def check_cbf(path: str | Path) -> CbfInfo:
    """The header and shape of a CBF image, once its sections agree with each other.

    Raises
    ------
    RawDataError
        Naming the file and what disagrees: a header that is not text, a binary shorter
        than announced or whose checksum differs, dimensions that do not multiply to the
        number of values, or a byte-offset stream holding another number of values.
    """
    path = Path(path)
    stat = path.stat()
    return _check(str(path), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=16)  # planning reads the first image's header twice (shape, geometry)
def _check(name: str, _mtime_ns: int, _size: int) -> CbfInfo:
    return _parse(Path(name))[0]


def read_cbf(path: str | Path) -> np.ndarray:
    """The pixels of a CBF image, its sections checked against each other as
    :func:`check_cbf` does, in the same pass (the binary is decoded once): the values
    fabio reads, as a (rows, columns) array of the header's element type."""
    _, pixels = _parse(Path(path))
    if pixels is None:
        raise RawDataError(
            f"{path}: the binary is not byte-offset compressed (x-CBF_BYTE_OFFSET), the one "
            "compression fabio reads; convert the image (cbflib's convert_image)"
        )
    return pixels


def _parse(path: Path) -> tuple[CbfInfo, np.ndarray | None]:
    data = _read(path)
    start = data.find(BINARY_SECTION)
    if start < 0:
        raise RawDataError(
            f"{path}: no binary section ({BINARY_SECTION.decode()}): not a CBF image, or "
            "a truncated one; copy it again"
        )
    header = _text(path, data[:start], "header")
    stop = data.find(STARTER, start)
    if stop < 0:
        raise RawDataError(f"{path}: the binary section never starts: the file is truncated")
    mime = _text(path, data[start:stop], "binary section header")
    fields = dict(re.findall(r"^\s*(X-Binary-[\w-]+|Content-MD5)\s*:\s*(.*?)\s*$", mime, re.M))
    announced = _integer(path, fields, "X-Binary-Size")
    elements = _integer(path, fields, "X-Binary-Number-of-Elements")
    columns = _integer(path, fields, "X-Binary-Size-Fastest-Dimension")
    rows = _integer(path, fields, "X-Binary-Size-Second-Dimension")
    binary = data[stop + len(STARTER) : stop + len(STARTER) + announced]
    if len(binary) < announced:
        raise RawDataError(
            f"{path}: the binary holds {len(binary)} of the {announced} bytes its header "
            "announces (X-Binary-Size): the file is truncated; copy it again"
        )
    md5 = fields.get("Content-MD5")
    if md5 and base64.b64encode(hashlib.md5(binary).digest()).decode() != md5:
        raise RawDataError(
            f"{path}: the binary's MD5 checksum differs from the header's (Content-MD5 "
            f"{md5}): the pixels were altered or damaged in a copy; copy the file again"
        )
    element_type = fields.get("X-Binary-Element-Type", "").strip('"')
    dtype = ELEMENT_TYPES.get(element_type, "int32")  # fabio's default as well
    if rows * columns != elements:
        raise RawDataError(
            f"{path}: the header's dimensions {rows} x {columns} "
            f"(X-Binary-Size-Second/Fastest-Dimension) make {rows * columns} pixels but "
            f"X-Binary-Number-of-Elements says {elements}: the image would be read with "
            "shifted rows; re-export it from the detector's original file"
        )
    pixels = None
    if "x-cbf_byte_offset" in mime.lower():
        pixels = decByteOffset(binary, size=None, dtype=np.dtype(dtype))
        if len(pixels) != elements:
            raise RawDataError(
                f"{path}: the header announces {rows} x {columns} = {elements} pixels but "
                f"the binary holds {len(pixels)} values: the image would be read with "
                "shifted rows; re-export it from the detector's original file"
            )
        pixels = np.ascontiguousarray(pixels, dtype).reshape(rows, columns)
    return CbfInfo(header=header, shape=(rows, columns), dtype=dtype), pixels


def cbf_written(path: str | Path, head: int = 8192) -> bool:
    """Whether a CBF file another process may still be writing holds its whole binary:
    its header, its binary section's header and the ``X-Binary-Size`` bytes announced
    there are on disk. A light look for live reduction and for the watcher (the file's
    head up to its binary, a few kB, no pixel decoded); :func:`read_cbf` checks the rest
    as the pixels are read."""
    try:
        with open(path, "rb") as stream:
            size = os.fstat(stream.fileno()).st_size
            data = b""
            while STARTER not in data:  # a long header: read on, in doubling blocks
                block = stream.read(max(head, len(data)))
                if not block:
                    break
                data += block
    except OSError:
        return False
    start = data.find(BINARY_SECTION)
    stop = data.find(STARTER, start) if start >= 0 else -1
    if stop < 0:
        return False
    fields = dict(re.findall(rb"^\s*(X-Binary-Size)\s*:\s*(\d+)\s*$", data[start:stop], re.M))
    if b"X-Binary-Size" not in fields:
        return False
    return size >= stop + len(STARTER) + int(fields[b"X-Binary-Size"])


def _read(path: Path) -> bytes:
    opener = {".gz": gzip.open, ".bz2": bz2.open}.get(path.suffix.lower(), open)
    try:
        with opener(path, "rb") as stream:
            return stream.read()
    except (OSError, EOFError, ValueError) as exc:  # gzip/bz2 raise these on damaged data
        raise RawDataError(f"{path} cannot be read as a CBF image ({exc}); copy it again") from None


def _text(path: Path, text: bytes, what: str) -> str:
    """The text of a CBF section (ASCII in a miniCBF; UTF-8 is read too): the geometry read
    from a header that is not text cannot be trusted."""
    try:
        return text.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = text[: exc.start].count(b"\n") + 1
        raise RawDataError(
            f"{path}: the CBF {what} is not text (byte 0x{text[exc.start]:02x} on line {line} "
            "is neither ASCII nor UTF-8): the geometry it carries cannot be trusted; re-export "
            "the image from the detector's original file"
        ) from None


def _integer(path: Path, fields: dict[str, str], name: str) -> int:
    try:
        value = int(fields[name])
    except (KeyError, ValueError):
        raise RawDataError(
            f"{path}: no valid {name} in the binary section header: not a complete CBF image"
        ) from None
    if value < 0:
        raise RawDataError(f"{path}: {name} is {value}: not a complete CBF image")
    return value
