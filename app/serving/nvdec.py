"""NVDEC: video decoded on an NVIDIA GPU through FFmpeg's CUDA hardware acceleration (PyAV's ``HWAccel``).

FFmpeg loads the driver's ``libcuda`` and ``libnvcuvid`` at run time, so one PyAV build decodes on the GPU where a
driver is present and on the CPU elsewhere; :func:`problem` says why the GPU cannot be used here, once per process.
"""

from functools import cache

import av
from av.codec.hwaccel import HWAccel, hwdevices_available


@cache
def problem() -> str | None:
    """Why NVDEC cannot be used in this process (None: it can): FFmpeg built without CUDA, or no CUDA device."""
    if "cuda" not in hwdevices_available():
        return (f"this FFmpeg ({av.ffmpeg_version_info}, PyAV {av.__version__}) was built without CUDA hardware "
                "decoding")
    try:
        hwaccel().create(av.Codec("h264", "r"))  # opens the CUDA device (the driver's libcuda), then frees it
    except Exception as exc:  # FFmpeg's errors: no driver, no GPU, no permission
        return f"FFmpeg cannot open a CUDA device (no NVIDIA GPU or driver here: {exc.__class__.__name__}: {exc})"
    return None


def hwaccel() -> HWAccel:
    """CUDA decoding without a silent software fallback: frames decode on the GPU or the decoder fails, so the
    decoder a job reports is the one that ran (``open_decoding`` falls back to the CPU itself, saying so). The
    device's primary context is shared with ONNX Runtime/TensorRT instead of a context (and its memory) per job."""
    return HWAccel("cuda", allow_software_fallback=False, options={"primary_ctx": "1"})
