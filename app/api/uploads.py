"""Reading uploads: with their size limits, one image per request, calibration photo sets stored for builds."""

from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import HTTPException, Request, UploadFile
from fastapi.concurrency import run_in_threadpool

from ..core.errors import Conflict, ImageError
from ..repository import ModelRepository
from ..serving.imaging import decode


async def upload_chunks(upload: UploadFile, limit: int, what: str = "upload") -> AsyncIterator[bytes]:
    """The upload in 1 MiB chunks, refusing with 413 as soon as it passes ``limit``."""
    size = 0
    while chunk := await upload.read(1 << 20):
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, detail=f"{what} is larger than the {limit:,}-byte limit")
        yield chunk


async def read_upload(upload: UploadFile, limit: int) -> bytes:
    """The upload's bytes, refusing with 413 as soon as it passes ``limit``."""
    return b"".join([chunk async for chunk in upload_chunks(upload, limit)])


async def save_upload(upload: UploadFile, path: Path, limit: int, what: str = "upload") -> None:
    """Copy the upload to ``path`` in chunks (never all of it in memory), refusing with 413 past ``limit``."""
    with open(path, "wb") as out:
        async for chunk in upload_chunks(upload, limit, what):
            out.write(chunk)


async def read_one_image(request: Request, image: UploadFile, limit: int) -> bytes:
    """The bytes of the single file in the ``image`` field (400 for two or more)."""
    if len((await request.form()).getlist("image")) != 1:
        raise HTTPException(400, detail="send exactly one file in the `image` field")
    return await read_upload(image, limit)


async def save_calibration_set(repository: ModelRepository, name: str, uploads: list[UploadFile], limit: int,
                               max_pixels: int, min_side: int) -> None:
    """Check each upload is a usable image, then store the set as ``<repository>/calibration/<name>/``."""
    folder = repository.root / "calibration" / name
    if folder.exists():
        raise Conflict(f"a calibration set called {name!r} already exists; use calib_source={name}")
    files = []
    for i, upload in enumerate(uploads):
        data = await read_upload(upload, limit)
        try:
            await run_in_threadpool(decode, data, max_pixels, min_side)
        except ImageError as exc:
            raise ImageError(exc.status_code, f"calibration image {i} ({upload.filename}): {exc.detail}") from None
        files.append(data)
    folder.mkdir(parents=True)
    for i, data in enumerate(files):
        (folder / f"{i:04d}.img").write_bytes(data)
