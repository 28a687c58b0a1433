"""Image bytes in, image bytes out: decoding with limits, colourising, overlays and PNG encoding.

Images stay in OpenCV's BGR order inside the service; only the model input is RGB.
"""

import io

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

# Pillow only reads headers here (to check the size before decoding); OpenCV decodes.
Image.MAX_IMAGE_PIXELS = None


class ImageError(ValueError):
    """An upload that is not a usable image; ``status_code`` is the HTTP answer."""

    def __init__(self, status_code: int, detail: str):
        super().__init__(detail)
        self.status_code, self.detail = status_code, detail


def probe(data: bytes) -> tuple[int, int, str]:
    """(width, height, format) from the header alone, without decoding pixels."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.width, im.height, (im.format or "unknown").lower()
    except UnidentifiedImageError:
        raise ImageError(415, "unsupported or unrecognised image format; send JPEG, PNG, BMP, WebP or TIFF") from None
    except Exception as exc:  # a header that lies or is cut short
        raise ImageError(400, f"the image header could not be read ({exc.__class__.__name__})") from None


def decode(data: bytes, max_pixels: int) -> np.ndarray:
    """Decode an upload to a BGR uint8 image, honouring EXIF orientation; :class:`ImageError` if unusable."""
    if not data:
        raise ImageError(400, "the uploaded file is empty")
    width, height, fmt = probe(data)
    if width * height > max_pixels:
        raise ImageError(413, f"image is {width}x{height} = {width * height:,} pixels; the limit is {max_pixels:,}")
    if width < 1 or height < 1:
        raise ImageError(400, f"image has no pixels ({width}x{height})")
    # IMREAD_COLOR: grey becomes 3 channels, alpha is dropped, 16-bit is scaled to 8, EXIF rotation applied.
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise ImageError(415 if fmt not in ("jpeg", "png", "bmp", "webp", "tiff", "gif") else 400,
                         f"the {fmt.upper()} image could not be decoded (corrupt, truncated or unsupported)")
    return img


def colorize(labels: np.ndarray, palette_bgr: np.ndarray) -> np.ndarray:
    """Class ids [H,W] to a BGR colour image, by one table lookup."""
    return palette_bgr[labels]


def overlay(image_bgr: np.ndarray, mask_bgr: np.ndarray, alpha: float) -> np.ndarray:
    """The mask blended over the photo; ``alpha`` is the mask's weight."""
    return cv2.addWeighted(image_bgr, 1.0 - alpha, mask_bgr, alpha, 0.0)


def encode_png(image: np.ndarray, compression: int = 1) -> bytes:
    """PNG bytes of a BGR, grey or 16-bit image; low compression keeps encoding fast."""
    ok, buf = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, compression])
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()
