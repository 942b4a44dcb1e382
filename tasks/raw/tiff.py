"""Reading TIFF images whole or not at all.

fabio's TIFF reader returns wrong pixels without an error in two cases a beamline meets:
a single-strip PackBits image (it takes the compressed bytes for pixels), and a file cut
short (a compressed strip cut reads as zeros; an uncompressed image with one row on disk
reads as that row over every row). So TIFF images are read here with tifffile (its
codecs from imagecodecs), each page only once every strip or tile it announces lies
within the file: what the first page reads is what fabio reads of a whole, uncompressed
file, bit for bit.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from calypso.errors import RawDataError

TIFF_SUFFIXES = (".tif", ".tiff")


def is_tiff(path: str | Path) -> bool:
    return str(path).lower().endswith(TIFF_SUFFIXES)


@contextmanager
def _quiet() -> Iterator[None]:
    """tifffile logs each tag of a file cut short before it raises: a file being written
    is looked at again and again."""
    quiet = logging.Filter("nothing")
    logger = logging.getLogger("tifffile")
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def _whole(page, size: int) -> bool:
    counts, offsets = page.databytecounts, page.dataoffsets
    if len(counts) != len(offsets):  # the tags caught half written
        return False
    ends = [offset + count for offset, count in zip(offsets, counts, strict=True)]
    return bool(ends) and min(counts) > 0 and max(ends) <= size


def tiff_written(path: str | Path) -> bool:
    """Whether every page of a TIFF file another process may still be writing is wholly
    on disk: every strip or tile each announces lies within the file. A file caught
    before its header or a page's tags are whole is not."""
    try:
        with _opened(path) as (tiff, size):
            pages = range(_count(path, tiff))
            return bool(pages) and all(_whole(_page(path, tiff, i), size) for i in pages)
    except RawDataError:  # caught before its header or a page's tags are whole
        return False


def tiff_layout(path: str | Path) -> tuple[int, tuple[int, int], str]:
    """(pages, image shape, pixel type) of a whole TIFF file, or a RawDataError naming it."""
    with _opened(path) as (tiff, size):
        pages = [_page(path, tiff, index) for index in range(_count(path, tiff))]
        if not pages:
            raise RawDataError(f"{path} holds no image yet: the file is truncated; copy it again")
        for index, page in enumerate(pages):
            _require_whole(path, page, size, index)
        first = pages[0]
        if len(first.shape) != 2 or any(page.shape != first.shape for page in pages):
            shapes = sorted({tuple(page.shape) for page in pages})
            raise RawDataError(
                f"{path} holds images of shape {', '.join(map(str, shapes))}: expected 2D "
                "images of one shape (one detector's frames)"
            )
        return len(pages), (first.shape[0], first.shape[1]), str(first.dtype)


def read_tiff(path: str | Path, indices: range) -> Iterator[np.ndarray]:
    """Pages ``indices`` of a TIFF file, each checked whole, then decoded."""
    with _opened(path) as (tiff, size):
        for index in indices:
            if index >= (count := _count(path, tiff)):
                raise RawDataError(
                    f"{path} holds {count} images, image {index} was asked for: "
                    "the file was cut short or replaced"
                )
            page = _page(path, tiff, index)
            _require_whole(path, page, size, index)
            try:
                yield page.asarray()
            except Exception as exc:  # a codec missing or a strip that does not decode
                raise RawDataError(
                    f"image {index} of {path} cannot be decoded ({exc}): the file is damaged "
                    "or compressed in a way not read here; copy it again, or save it "
                    "uncompressed"
                ) from None


@contextmanager
def _opened(path: str | Path):
    """The open TIFF file and its size, or a RawDataError naming it."""
    import tifffile

    if not Path(path).is_file():
        raise RawDataError(f"{path} does not exist")
    with _quiet():
        try:
            tiff = tifffile.TiffFile(path)
        except Exception as exc:  # tifffile fails in its own ways on a damaged file
            raise RawDataError(
                f"{path} cannot be read as a TIFF image ({exc}): the file is truncated or "
                "damaged; copy it again"
            ) from None
        with tiff:
            yield tiff, os.stat(path).st_size


def _count(path: str | Path, tiff) -> int:
    try:
        return len(tiff.pages)
    except Exception as exc:  # a page's tags cut short or damaged
        raise RawDataError(
            f"{path}'s images cannot be counted ({exc}): the file is truncated or damaged; "
            "copy it again"
        ) from None


def _page(path: str | Path, tiff, index: int):
    try:
        return tiff.pages[index]
    except Exception as exc:  # a page's tags cut short or damaged
        raise RawDataError(
            f"image {index} of {path} cannot be read ({exc}): the file is truncated or "
            "damaged; copy it again"
        ) from None


def _require_whole(path: str | Path, page, size: int, index: int) -> None:
    if not _whole(page, size):
        raise RawDataError(
            f"image {index} of {path} lies partly beyond the file's end ({size} bytes): "
            "the file is truncated; copy it again (or wait for the scan)"
        )
