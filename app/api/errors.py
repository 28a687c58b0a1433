"""Errors to HTTP, in one place: every :class:`ServiceError` becomes its status with a JSON ``detail``."""

import sqlite3

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from ..core.errors import ServiceError, StorageError


async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


async def storage_error(request: Request, exc: Exception) -> JSONResponse:
    """A full or read-only repository (ENOSPC, EROFS, EACCES..., or SQLite's FULL and READONLY for the control
    store) wherever it is met: 507 or 503 with a detail, never a bare 500; any other such error stays a 500."""
    if (known := StorageError.of(exc)) is None:
        raise exc
    return await service_error(request, known)


async def invalid_options(request: Request, exc: ValidationError) -> JSONResponse:
    """A typed request object (build options, metadata) built from form fields that do not fit it."""
    problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'request'}: {e['msg']}" for e in exc.errors())
    return JSONResponse({"detail": f"invalid request: {problems}"}, status_code=422)


async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    """Anything no other handler answers (a bug, a runtime's failure): still a 500 in the service's own JSON, so a
    client tells it from a proxy's plain-text 500 (Ray Serve's for a replica lost with its node), which it retries.
    Starlette logs the traceback after this answer."""
    return JSONResponse({error_key(request.url.path): f"internal error ({type(exc).__name__}); the server's log has "
                                                       "the traceback"}, status_code=500)


def install(app: FastAPI) -> None:
    """Register the handlers on ``app``."""
    app.add_exception_handler(Exception, unexpected_error)
    app.add_exception_handler(ServiceError, service_error)
    app.add_exception_handler(OSError, storage_error)
    app.add_exception_handler(sqlite3.OperationalError, storage_error)
    app.add_exception_handler(ValidationError, invalid_options)


def error_key(path: str) -> str:
    """The key of an error body: the Open Inference Protocol's routes answer ``{"error": ...}``, the others
    ``{"detail": ...}`` (for middleware that answers before any route runs)."""
    return "error" if path.startswith("/v2/") else "detail"
