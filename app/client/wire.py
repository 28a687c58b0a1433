"""What the sync and async clients share: turning an image into an upload, a response into a result or a typed
error, and how long to wait before a retry."""

import io
from pathlib import Path
from typing import Literal, Union

import numpy as np
from PIL import Image

from .errors import ModelMismatch, error_for

ImageInput = Union[str, Path, bytes, np.ndarray, Image.Image]
View = Literal["labels", "mask", "overlay"]
Output = Literal["numpy", "pil", "png"]
RETRY_STATUSES = (502, 503, 504)


def upload(image: ImageInput) -> tuple[str, bytes]:
    """(file name, bytes) to send: a file's bytes as they are, encoded bytes as given, an array (RGB, or class ids /
    grey) or a PIL image as PNG."""
    if isinstance(image, (str, Path)):
        path = Path(image)
        return path.name, path.read_bytes()
    if isinstance(image, (bytes, bytearray, memoryview)):
        return "image", bytes(image)
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.save(buf, "PNG", compress_level=1)
        return "image.png", buf.getvalue()
    raise TypeError(f"an image is a path, bytes, a NumPy array or a PIL image, not {type(image).__name__}")


def segment_params(view: View, alpha: float, model: str | None) -> dict:
    params = {"view": view, "alpha": alpha}
    if model is not None:
        params["model"] = model
    return params


def detail_of(response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text.strip() or response.reason_phrase
    if isinstance(body, dict):
        return str(body.get("detail") or body.get("error") or body)
    return str(body)


def check(response) -> None:
    """Raise the typed error for a refusal."""
    if response.status_code >= 400:
        raise error_for(response.status_code, detail_of(response))


def result(response, output: Output, model: str | None):
    """The segmentation from a ``POST /segment`` response: class ids [H,W] (labels view) or RGB [H,W,3] as a NumPy
    array, a PIL image, or the PNG bytes."""
    check(response)
    served = response.headers.get("X-Model")
    if model is not None and served != model:
        raise ModelMismatch(response.status_code, f"asked for model {model!r}, the server answered with {served!r} "
                                                  "(a server without per-request model choice ignores ?model=)")
    if output == "png":
        return response.content
    image = Image.open(io.BytesIO(response.content))
    image.load()
    if output == "pil":
        return image
    return np.asarray(image if image.mode in ("L", "I;16", "I") else image.convert("RGB"))


def worth_retrying(response) -> bool:
    """Whether another try may succeed: busy or no model yet (502/503/504), or a 500 that is not the service's own
    answer (no JSON ``detail``), as Ray Serve's proxy gives for a request whose replica was lost with its node (the
    fused layout, docs/ray.md)."""
    code = response.status_code
    return code in RETRY_STATUSES or (code == 500 and "json" not in response.headers.get("content-type", ""))


def retry_delay(response, attempt: int, backoff: float, max_delay: float) -> float:
    """Seconds before retry number ``attempt`` (0-based): the server's ``Retry-After`` when it gives one (in
    seconds), else exponential backoff from ``backoff``; capped at ``max_delay``."""
    after = response.headers.get("Retry-After") if response is not None else None
    if after is not None and after.strip().replace(".", "", 1).isdigit():
        return min(float(after), max_delay)
    return min(backoff * 2 ** attempt, max_delay)


def mask_path(source: Path, view: View) -> Path:
    """Where ``segment client`` writes the result for ``source``: beside it, ``NAME.VIEW.png``."""
    return source.with_name(f"{source.stem}.{view}.png")
