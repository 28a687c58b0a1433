"""Small clips made in the tests: a CamVid sequence from ../shared when it is there, else photos drawn here."""

from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np

from .models import SAMPLE, SHARED, quadrants

CAMVID = SHARED / "datasets" / "camvid" / "images" / "val"


def scene_frames(count: int, height: int = 360, width: int = 480) -> list[np.ndarray]:
    """``count`` BGR frames of a moving street: consecutive CamVid val frames (one sequence), or without ../shared
    the bundled sample photo panned sideways, so the picture (and its mask) changes from frame to frame."""
    files = sorted(CAMVID.glob("*.jpg"))[:count] if CAMVID.is_dir() else []
    if len(files) == count:
        return [cv2.resize(cv2.imread(str(f)), (width, height)) for f in files]
    photo = cv2.imread(str(SAMPLE))
    ph, pw = photo.shape[:2]
    crop_w = pw // 2
    return [cv2.resize(photo[:, int(i * (pw - crop_w) / max(1, count - 1)):][:, :crop_w], (width, height))
            for i in range(count)]


def colour_frames(colours: list[int], height: int = 64, width: int = 96) -> list[np.ndarray]:
    """Frames each filled with one of the RGB-argmax model's classes (0 red, 1 green, 2 blue), in BGR."""
    bgr = {0: (20, 20, 230), 1: (20, 230, 20), 2: (230, 20, 20)}
    return [np.full((height, width, 3), bgr[c], np.uint8) for c in colours]


def quadrant_frames(count: int, height: int = 64, width: int = 96) -> list[np.ndarray]:
    """The quadrant photo of ``models.py``, rolled sideways a little more each frame."""
    photo = quadrants(height, width)[0]
    return [np.roll(photo, i * 4, axis=1) for i in range(count)]


def write_clip(path: Path, frames: list[np.ndarray], fps: int = 10, codec: str = "libx264", **options) -> Path:
    """Encode BGR frames with PyAV into ``path`` (container from its suffix)."""
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=Fraction(fps))
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p" if codec != "mjpeg" else "yuvj420p"
        stream.options = {k: str(v) for k, v in options.items()}
        for frame in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="bgr24")))
        out.mux(stream.encode(None))
    return path


def write_y4m(path: Path, frames: list[np.ndarray], fps: int = 10) -> Path:
    """A raw YUV4MPEG2 clip, the format Chromium's fake camera reads (--use-file-for-fake-video-capture)."""
    return write_clip(path, frames, fps, codec="rawvideo")
