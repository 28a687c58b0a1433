"""A Python client for bisenet-serve: ``from app.client import Client`` (blocking) or ``AsyncClient``.

It imports nothing else of the service (NumPy, Pillow, httpx and tqdm only), so it runs on any machine.
"""

from .client import AsyncClient, Client
from .errors import (BadImage, Conflict, ConnectionFailed, ModelMismatch, NotFound, SegmentError, ServerError,
                     TooLarge, Unauthorized, Unavailable)
from .wire import mask_path

__all__ = ["AsyncClient", "BadImage", "Client", "Conflict", "ConnectionFailed", "ModelMismatch", "NotFound",
           "SegmentError", "ServerError", "TooLarge", "Unauthorized", "Unavailable", "mask_path"]
