"""h5grove's endpoints (what h5web asks: ``/meta``, ``/attr``, ``/data``, ``/stats``,
``/paths``), each behind the portal's check.

h5grove has no access control of its own and would open whatever path it is given, so
its FastAPI router is not mounted: each endpoint here resolves ``file``
(``<proposal>/<path>``) with :func:`calypso.flows.portal.paths.readable_file` for the
signed-in user, then hands the checked path to h5grove's handler.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Annotated, BinaryIO
from urllib.parse import quote

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse
from h5grove import fastapi_utils as grove
from h5grove.utils import NotFoundError

from calypso.flows.portal.auth import User
from calypso.flows.portal.paths import opened_in_proposal, readable_file
from calypso.registry.access import Identity

router = APIRouter()
INLINE = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".txt": "text/plain; charset=utf-8",
    ".dat": "text/plain; charset=utf-8",
    ".xy": "text/plain; charset=utf-8",
    ".log": "text/plain; charset=utf-8",
}


async def _answer(request: Request, identity: Identity, file: str, handler: Callable) -> Response:
    settings = request.app.state.settings
    path = await run_in_threadpool(readable_file, settings, identity, file)
    try:
        return await run_in_threadpool(opened_in_proposal, settings, path, handler, str(path))
    except grove.H5GroveException as exc:  # a missing entity, a bad selection
        return JSONResponse({"message": exc.message}, status_code=exc.status_code)
    except NotFoundError as exc:  # a link that leads nowhere (h5grove's LinkError)
        return JSONResponse({"message": str(exc).splitlines()[0][:300]}, status_code=404)
    except SystemError as exc:  # the same, raised inside h5py's visit of the links
        if isinstance(exc.__context__, NotFoundError):
            return JSONResponse({"message": str(exc.__context__)[:300]}, status_code=404)
        raise
    except OSError as exc:  # not HDF5, truncated, a link that leads nowhere
        message = f"{file} cannot be read here: {str(exc).splitlines()[0][:300]}"
        return JSONResponse({"message": message}, status_code=422)
    except (LookupError, ValueError, TypeError) as exc:  # what h5grove lets through
        message = f"cannot answer this request on {file}: {str(exc).splitlines()[0][:300]}"
        return JSONResponse({"message": message}, status_code=400)


@router.get("/h5grove/")
def root() -> Response:
    return Response("ok")


@router.get("/h5grove/meta")
async def meta(
    request: Request,
    identity: User,
    file: str,
    path: str = "/",
    resolve_links: str = "only_valid",
) -> Response:
    return await _answer(
        request, identity, file, lambda real: grove.get_meta(real, path, resolve_links)
    )


@router.get("/h5grove/attr")
async def attr(
    request: Request,
    identity: User,
    file: str,
    path: str = "/",
    attr_keys: Annotated[list[str] | None, Query()] = None,
) -> Response:
    return await _answer(
        request, identity, file, lambda real: grove.get_attr(real, path, attr_keys)
    )


@router.get("/h5grove/data")
async def data(
    request: Request,
    identity: User,
    file: str,
    path: str = "/",
    dtype: str = "origin",
    format: str = "json",
    flatten: bool = False,
    selection: str | None = None,
) -> Response:
    return await _answer(
        request,
        identity,
        file,
        lambda real: grove.get_data(real, path, dtype, format, flatten, selection),
    )


@router.get("/h5grove/stats")
async def stats(
    request: Request,
    identity: User,
    file: str,
    path: str = "/",
    selection: str | None = None,
) -> Response:
    return await _answer(
        request, identity, file, lambda real: grove.get_stats(real, path, selection)
    )


@router.get("/h5grove/paths")
async def paths(
    request: Request,
    identity: User,
    file: str,
    path: str = "/",
    resolve_links: str = "only_valid",
) -> Response:
    return await _answer(
        request, identity, file, lambda real: grove.get_paths(real, path, resolve_links)
    )


@router.get("/files/{proposal}/{relative:path}")
async def download(request: Request, identity: User, proposal: str, relative: str) -> Response:
    """A file as it is (quick-look images, text results): the same check."""
    settings = request.app.state.settings
    path = await run_in_threadpool(readable_file, settings, identity, f"{proposal}/{relative}")
    # A file a proposal member wrote is not the portal's page: images and text are shown,
    # anything else is downloaded, and none may run a script in the portal's origin.
    shown = path.suffix.lower() in INLINE
    # Opened where the kernel keeps the portal inside the proposal, then sent from the
    # open file: a name swapped since the check cannot lead elsewhere.
    stream = await run_in_threadpool(opened_in_proposal, settings, path, open, path, "rb")
    size = os.fstat(stream.fileno()).st_size
    disposition = "inline" if shown else "attachment"
    quoted = quote(path.name)  # as Starlette's FileResponse names a file
    disposition += (
        f"; filename*=utf-8''{quoted}" if quoted != path.name else f'; filename="{path.name}"'
    )
    return StreamingResponse(
        _chunks(stream),
        media_type=INLINE.get(path.suffix.lower(), "application/octet-stream"),
        headers={
            "Content-Length": str(size),
            "Content-Disposition": disposition,
            "Content-Security-Policy": "sandbox",
            "X-Content-Type-Options": "nosniff",
        },
    )


def _chunks(stream: BinaryIO, size: int = 1 << 20) -> Iterator[bytes]:
    with stream:
        while block := stream.read(size):
            yield block
