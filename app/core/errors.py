"""The service's errors, in plain words, each with the HTTP status it maps to (``api/errors.py`` maps them once).

Lower layers raise these; only the HTTP layer turns them into responses, so no route needs a try/except.
"""

import errno

TENSORRT_HINT = ("TensorRT is not installed here. On an NVIDIA GPU host install it with "
                 "`pip install '.[tensorrt]'`, or run the GPU Docker image; ONNX models keep working "
                 "through ONNX Runtime meanwhile.")


class ServiceError(ValueError):
    """Base of every error the service explains to its client; ``status_code`` is the HTTP answer, ``headers``
    any headers that go with it."""

    status_code = 400
    headers: dict[str, str] | None = None

    def __init__(self, detail: str, status_code: int | None = None):
        super().__init__(detail)
        self.detail = detail
        if status_code is not None:
            self.status_code = status_code


class ModelError(ServiceError):
    """The model file cannot be served; the message says why."""


class NotFound(ModelError):
    """No model (or job, or folder) of that name."""

    status_code = 404


class Conflict(ModelError):
    """The operation clashes with the repository's state (name taken, model served, build running)."""

    status_code = 409


class IncompatibleEngine(ModelError):
    """An engine built by another TensorRT version or for another GPU: it must be rebuilt here."""

    status_code = 409


class TensorRTUnavailable(ModelError):
    """A TensorRT engine was asked for where the ``tensorrt`` package is missing."""

    status_code = 503

    def __init__(self, detail: str = TENSORRT_HINT):
        super().__init__(detail)


class Overloaded(ServiceError):
    """Too much work in flight to take this request now; the client should retry shortly."""

    status_code = 503
    headers = {"Retry-After": "1"}


class StorageError(ServiceError):
    """The model repository cannot be written: the disk is full (507) or read-only / not writable (503). The one
    mapping from an operating-system or SQLite error to an answer (``api/errors.py`` applies it to every route)."""

    STATUS = {errno.ENOSPC: 507, errno.EDQUOT: 507, errno.EROFS: 503, errno.EACCES: 503, errno.EPERM: 503}
    SQLITE_STATUS = {13: 507, 8: 503}  # SQLITE_FULL, SQLITE_READONLY (primary codes, extended ones masked)

    @classmethod
    def of(cls, exc: Exception) -> "StorageError | None":
        """The error to answer for ``exc`` (an ``OSError`` or a ``sqlite3.Error``), or None when it is not a storage
        condition the client can be told."""
        if isinstance(exc, OSError):
            status, why = cls.STATUS.get(exc.errno), exc.strerror or errno.errorcode.get(exc.errno)
        else:
            status = cls.SQLITE_STATUS.get((getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF)
            why = f"control store: {exc}"
        if status is None:
            return None
        state = "is full" if status == 507 else "is read-only or not writable"
        return cls(f"the model repository {state} ({why}); the server keeps serving the models it has", status)


class MetadataError(ServiceError):
    """A metadata file (or metadata sent with an upload) exists but cannot be used."""


class ImageError(ServiceError):
    """An upload that is not a usable image (400 damaged, 413 too large, 415 not an image we read)."""

    def __init__(self, status_code: int, detail: str):
        super().__init__(detail, status_code)


class BuildError(ServiceError):
    """A build request that cannot be carried out as asked (422: the request itself is wrong)."""

    status_code = 422


class VideoError(ServiceError):
    """An upload that is not a usable video (400 damaged or empty, 413 too large or too long, 415 not a video or a
    codec we cannot decode)."""

    def __init__(self, status_code: int, detail: str):
        super().__init__(detail, status_code)


class Busy(Overloaded):
    """:class:`Overloaded` for long work (video jobs): try again after ``retry_after`` seconds."""

    def __init__(self, detail: str, retry_after: int = 5):
        super().__init__(detail)
        self.headers = {"Retry-After": str(retry_after)}


class Unavailable(ServiceError):
    """Nobody can answer this request right now (a model replica lost with its node, or too slow); retry shortly."""

    status_code = 503
    headers = {"Retry-After": "1"}
