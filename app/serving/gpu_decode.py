"""JPEG uploads decoded straight into GPU memory with nvImageCodec (the `gpu` extra), for raw-pixel models
that ONNX Runtime's CUDA provider serves at the photo's own size: no CPU decode, no host-to-device copy.

Measured on an H100: decode plus inference 4.2 ms of CPU an image, against 23.2 ms through OpenCV and NumPy.
"""

import queue
import threading

# A few decoders per process, shared by the request threads: nvImageCodec decoders are not thread-safe,
# each takes time to create, and the GPU's JPEG engines refuse new ones once many exist (seen with one per
# thread in 16 processes: allocator failures and a slow first minute).
DECODERS_PER_PROCESS = 2
_pool: queue.Queue = queue.Queue()
_filled = threading.Lock()
_created = 0
_warmed: set = set()


def available() -> bool:
    """Whether nvImageCodec can be imported (it is never imported on hosts without it)."""
    try:
        from nvidia import nvimgcodec  # noqa: F401
    except ImportError:
        return False
    return True


def _ensure_decoders() -> None:
    global _created
    if _created < DECODERS_PER_PROCESS:
        from nvidia import nvimgcodec

        with _filled:
            while _created < DECODERS_PER_PROCESS:
                _pool.put(nvimgcodec.Decoder())
                _created += 1


def warm(height: int, width: int) -> None:
    """Create this process's decoders and run each once on a blank JPEG of the model's size, at model load:
    their first decode allocates GPU memory and took seconds under load."""
    import cv2
    import numpy as np

    _ensure_decoders()
    with _filled:
        if (height, width) in _warmed:
            return
        blank = cv2.imencode(".jpg", np.zeros((height, width, 3), np.uint8))[1].tobytes()
        decoders = [_pool.get() for _ in range(DECODERS_PER_PROCESS)]
        try:
            for decoder in decoders:
                decoder.decode(blank)
        finally:
            for decoder in decoders:
                _pool.put(decoder)
        _warmed.add((height, width))


def decode(datas: list[bytes]) -> list:
    """The JPEGs as RGB uint8 [H,W,3] images in GPU memory (``__cuda_array_interface__``, on CUDA's default
    stream), EXIF orientation applied, decoded as one batch; None for each that nvImageCodec cannot decode (the
    caller then decodes it on the CPU, which explains bad input)."""
    _ensure_decoders()
    decoder = _pool.get()
    try:
        try:
            return list(decoder.decode(list(datas)))  # a failed image is None in its place
        except Exception:  # nvImageCodec raises RuntimeError and its own types: each alone, to keep the good ones
            return [_one(decoder, data) for data in datas] if len(datas) > 1 else [None]
    finally:
        _pool.put(decoder)


def is_rgb8(image, hw: tuple) -> bool:
    """Whether a decoded image is RGB uint8 of height and width ``hw`` (EXIF rotation may swap the sides, and a
    12-bit JPEG decodes to 16 bits)."""
    face = image.__cuda_array_interface__
    return tuple(face["shape"]) == (*hw, 3) and face["typestr"] == "|u1"


def _one(decoder, data: bytes):
    try:
        return decoder.decode(data)
    except Exception:
        return None
