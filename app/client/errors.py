"""The client's errors: one type per kind of refusal, each carrying the status and the server's ``detail``."""


class SegmentError(Exception):
    """The server refused or failed a request; ``status`` is its HTTP status (0: no answer), ``detail`` its words."""

    def __init__(self, status: int, detail: str):
        super().__init__(f"{status}: {detail}" if status else detail)
        self.status, self.detail = status, detail


class BadImage(SegmentError):
    """400 or 415: the image is damaged, too small, or of a format the server does not read."""


class TooLarge(SegmentError):
    """413: the upload or the image is over the server's limits."""


class Unauthorized(SegmentError):
    """401 or 403: an admin route without the right token."""


class NotFound(SegmentError):
    """404: no such model (or route)."""


class Conflict(SegmentError):
    """409: the request clashes with the server's state."""


class Unavailable(SegmentError):
    """503 still after the retries: the server is busy or has no model loaded."""


class ServerError(SegmentError):
    """Any other status: 5xx, or a 4xx the client has no type for."""


class ModelMismatch(SegmentError):
    """The server answered with another model than the one asked for."""


class ConnectionFailed(SegmentError):
    """No answer at all: the server cannot be reached (after the retries)."""


_BY_STATUS = {400: BadImage, 415: BadImage, 413: TooLarge, 401: Unauthorized, 403: Unauthorized, 404: NotFound,
              409: Conflict, 503: Unavailable}


def error_for(status: int, detail: str) -> SegmentError:
    return _BY_STATUS.get(status, ServerError)(status, detail)
