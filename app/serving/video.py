"""Video through the image pipeline: frames decoded by PyAV (FFmpeg) go straight to ``preprocess`` and the model
(no image decoder on the way), the overlay is written as H.264 in MP4, and per-frame class shares are kept.

Used by the video jobs of the API and by ``segment run model in.mp4 out.mp4``; a camera or stream URL that FFmpeg
opens is read the same way.
"""

import csv
import io
import json
import logging
import os
import queue
import re
import threading
import time
import zipfile
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction
from functools import cache
from pathlib import Path

import av
import cv2
import numpy as np

from ..core.errors import VideoError
from ..engines import SegmentationModel
from . import nvdec
from .imaging import colorize, encode_indexed_png, overlay
from .pipeline import input_size, preprocess, restore_size

log = logging.getLogger("segment.video")

VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".webm", ".mkv", ".avi")
# Leading bytes of the containers we take: a file that starts like one but cannot be read is damaged (400), anything
# else is not a video (415). MP4/MOV carry "ftyp" at offset 4, Matroska/WebM the EBML magic, AVI a RIFF header.
_CONTAINER = {"ftyp": lambda d: d[4:8] == b"ftyp", "matroska": lambda d: d[:4] == b"\x1a\x45\xdf\xa3",
              "avi": lambda d: d[:4] == b"RIFF" and d[8:11] == b"AVI"}
# Chromium's <video> plays H.264 in MP4; PyAV's wheels ship libx264. VP9 in WebM is the fallback for a PyAV built
# without it. x264's ultrafast preset: 9 ms a 360x480 frame against 28 for veryfast (2 loaded cores), for a 1.4x
# larger file at CRF 23; the encoder must not eat the model's CPU.
ENCODERS = (("libx264", ".mp4", {"preset": "ultrafast", "crf": "23"}),
            ("libvpx-vp9", ".webm", {"deadline": "realtime", "cpu-used": "8", "crf": "30", "b": "0"}))


def encoder() -> tuple[str, str, dict]:
    """(codec, file suffix, options) of the overlay video: the first browser-playable encoder this PyAV has."""
    for name, suffix, options in ENCODERS:
        if name in av.codecs_available:
            return name, suffix, options
    raise RuntimeError("this PyAV has neither libx264 nor libvpx-vp9; install the PyPI wheel of `av`")


def is_video_path(text: str) -> bool:
    """Whether a command-line input is a video: a video file suffix, a device (e.g. /dev/video0), or a URL FFmpeg
    opens (rtsp://..., file:..., pipe:0: a scheme of two letters or more, so not a Windows drive)."""
    return Path(text).suffix.lower() in VIDEO_SUFFIXES or text.startswith("/dev/") or is_url(text)


def is_url(text: str) -> bool:
    return re.match(r"^[a-z][a-z0-9+.-]+:", text) is not None


@dataclass
class VideoInfo:
    """What a video says about itself, checked against the limits; ``frames`` is None when the source cannot tell
    (a camera, a stream)."""

    width: int
    height: int
    fps: float
    frames: int | None
    codec: str

    def as_dict(self) -> dict:
        return {"width": self.width, "height": self.height, "fps": self.fps, "frames": self.frames,
                "codec": self.codec}


def _open_error(path: Path, exc: Exception) -> VideoError:
    """Why FFmpeg could not open a file: damaged if it starts like a container we take, else not a video."""
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        return VideoError(400, "the uploaded file is empty")
    kind = next((k for k, looks in _CONTAINER.items() if looks(head)), None)
    if kind:
        return VideoError(400, f"the video is damaged or truncated ({kind} container: {exc.__class__.__name__})")
    return VideoError(415, "not a video we can read; send MP4, WebM, MOV, MKV or AVI")


def _rate(stream) -> Fraction:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return Fraction(rate) if rate and rate > 0 else Fraction(25)


def open_video(source: str | Path, options: dict | None = None, hwaccel=None):
    """An FFmpeg input: a file, a URL or a device; raises ``VideoError`` when it opens as no video at all."""
    try:
        container = av.open(str(source), "r", options=options or {}, timeout=(10.0, 10.0), hwaccel=hwaccel)
    except av.EOFError:
        raise VideoError(400, "the video has no frames: it ends before the first one (empty or truncated)") from None
    except av.FFmpegError as exc:
        if Path(str(source)).is_file():
            raise _open_error(Path(source), exc) from None
        raise VideoError(400, f"cannot open {source}: {exc}") from None
    if not container.streams.video:
        container.close()
        raise VideoError(415, "the file has no video stream")
    return container


def open_decoding(source: str | Path, decode: str = "cpu", options: dict | None = None):
    """``open_video`` with the decoder ``decode`` asks for (``cpu``, ``cuda``: NVDEC or a ``VideoError``, ``auto``:
    NVDEC where it works, else the CPU with one log line saying why); returns (container, decoder name), e.g.
    ``"h264 (nvdec)"`` or ``"h264 (cpu)"``. A file's first frame is decoded once on the GPU to make sure (a profile
    NVDEC lacks, such as H.264 4:4:4, fails only there); a camera or stream is not tried beforehand."""
    if decode != "cpu":
        why = nvdec.problem()
        if why is None:
            container = open_video(source, options, hwaccel=nvdec.hwaccel())
            stream = container.streams.video[0]
            ctx = stream.codec_context
            if not ctx.is_hwaccel():
                why = f"NVDEC has no decoder for {ctx.name}"
            elif not Path(str(source)).is_file():
                return container, f"{ctx.name} (nvdec)"
            else:
                try:
                    next(container.decode(stream), None)
                    container.seek(0)
                    return container, f"{ctx.name} (nvdec)"
                except av.FFmpegError as exc:
                    why = f"NVDEC cannot decode this {ctx.name} video ({exc.__class__.__name__}: {exc})"
            container.close()
        if decode == "cuda":
            raise VideoError(415, f"video_decode is cuda, but {why}; use auto (SEGMENT_VIDEO_DECODE, "
                                  "segment run --decode) to decode on the CPU instead")
        _on_the_cpu(why)
    container = open_video(source, options)
    return container, f"{container.streams.video[0].codec_context.name} (cpu)"


@cache
def _on_the_cpu(why: str) -> None:
    """One log line per process and reason, not one per job (a server also says it once at start)."""
    log.info("video_decode is auto: decoding video on the CPU, since %s", why)


def probe(path: Path, max_pixels: int, max_frames: int) -> VideoInfo:
    """Check an uploaded video before it is queued: it opens, its codec decodes, its first frame comes out, it is
    within the pixel and frame limits, and its packets are all there. Cheap: one frame decoded, the rest only
    demuxed."""
    container = open_video(path)
    try:
        stream = container.streams.video[0]
        ctx = stream.codec_context
        if ctx is None or not ctx.codec or not ctx.codec.is_decoder:
            raise VideoError(415, f"unsupported video codec ({ctx.name if ctx else 'not known to FFmpeg'}); send "
                                  "H.264, HEVC, VP8, VP9, AV1 or MPEG-4")
        width, height = stream.width, stream.height
        if width * height > max_pixels:
            raise VideoError(413, f"frames are {width}x{height} = {width * height:,} pixels; the limit is "
                                  f"{max_pixels:,}")
        try:
            packets = sum(1 for p in container.demux(stream) if p.size)
        except av.FFmpegError as exc:
            raise VideoError(400, f"the video is damaged or truncated ({exc.__class__.__name__})") from None
        if packets == 0:
            raise VideoError(400, "the video has no frames")
        if stream.frames and packets < stream.frames:
            raise VideoError(400, f"the video is truncated: {packets:,} of the {stream.frames:,} frames it declares "
                                  "are in the file")
        if packets > max_frames:
            raise VideoError(413, f"the video has {packets:,} frames; the limit is {max_frames:,}")
        container.seek(0)
        try:
            first = next(container.decode(stream), None)
        except av.FFmpegError as exc:
            raise VideoError(400, f"the first frame cannot be decoded ({exc.__class__.__name__}: {exc})") from None
        if first is None:
            raise VideoError(400, "the video has no frames that decode")
        return VideoInfo(first.width, first.height, float(_rate(stream)), packets, ctx.name)
    finally:
        container.close()


@dataclass
class Frame:
    index: int
    time_s: float
    image: np.ndarray  # BGR


def read_frames(container, max_frames: int | None = None) -> Iterator[Frame]:
    """Decoded BGR frames in presentation order (FFmpeg's own decoding threads on)."""
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    rate = _rate(stream)
    for index, frame in enumerate(container.decode(stream)):
        if max_frames is not None and index >= max_frames:
            raise VideoError(413, f"the video has more than {max_frames:,} frames")
        t = frame.time if frame.time is not None else index / rate
        yield Frame(index, round(float(t), 6), frame.to_ndarray(format="bgr24"))


def read_ahead(frames: Iterator, depth: int = 8) -> Iterator:
    """``frames`` decoded in a thread, ``depth`` ahead: decoding overlaps inference. Errors come through in order;
    when the consumer stops early, the thread ends at its next frame."""
    q: queue.Queue = queue.Queue(depth)
    done, stop = object(), threading.Event()

    def produce():
        try:
            for item in frames:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as exc:  # handed to the consumer
            q.put(exc)

    thread = threading.Thread(target=produce, name="video-decode", daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


class OverlayWriter:
    """Frames in, a browser-playable video out (H.264 MP4, faststart; or VP9 WebM), at the source's frame rate.
    Odd sizes are padded by one pixel (4:2:0 needs even sides)."""

    def __init__(self, path: Path, width: int, height: int, fps: float):
        codec, _, options = encoder()
        self.container = av.open(str(path), "w", options={"movflags": "+faststart"} if path.suffix == ".mp4" else {})
        self.stream = self.container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        self.stream.width, self.stream.height = width + width % 2, height + height % 2
        self.stream.pix_fmt = "yuv420p"
        self.stream.options = options
        self.frames = 0

    def write(self, frame: "av.VideoFrame") -> None:
        """One frame of the stream's size (:class:`Composer` makes them), in order."""
        frame.pts = self.frames
        self.frames += 1
        self.container.mux(self.stream.encode(frame))

    def close(self) -> None:
        """Flush the encoder and write the index: the file plays from here on."""
        try:
            self.container.mux(self.stream.encode(None))
        finally:
            self.container.close()


@dataclass
class FrameStats:
    """Per-frame class shares, by class name; JSON as the API serves it, or CSV."""

    class_names: list[str]
    fps: float
    width: int
    height: int
    frames: list[dict] = field(default_factory=list)

    def add(self, index: int, time_s: float, counts: np.ndarray) -> None:
        """One frame's pixel counts per class id (:func:`class_counts`)."""
        shares = counts[: len(self.class_names)] / max(1, int(counts.sum()))
        self.frames.append({"index": index, "time_s": time_s,
                            "classes": {n: round(float(s), 6) for n, s in zip(self.class_names, shares)}})

    def as_dict(self) -> dict:
        return {"frames": self.frames, "fps": self.fps, "width": self.width, "height": self.height,
                "class_names": self.class_names}

    @classmethod
    def load(cls, path: Path) -> "FrameStats":
        """Statistics saved as :meth:`as_dict` JSON."""
        d = json.loads(path.read_text())
        return cls(d["class_names"], d["fps"], d["width"], d["height"], d["frames"])

    def csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["index", "time_s", *self.class_names])
        for f in self.frames:
            writer.writerow([f["index"], f["time_s"], *(f["classes"][n] for n in self.class_names)])
        return out.getvalue()


@dataclass
class Progress:
    """Where a video run stands, handed to the ``progress`` callback after each batch."""

    frames_done: int = 0
    frames_total: int | None = None
    started: float = field(default_factory=time.perf_counter)

    @property
    def fps(self) -> float:
        elapsed = time.perf_counter() - self.started
        return round(self.frames_done / elapsed, 2) if elapsed > 0 else 0.0


class Stopped(Exception):
    """The run was stopped from outside (a cancelled job, Ctrl-C); what was written so far is closed properly and
    its statistics (None before the first frame) come with it."""

    def __init__(self, stats: "FrameStats | None"):
        super().__init__("stopped")
        self.stats = stats


def class_counts(labels: np.ndarray, classes: int) -> np.ndarray:
    """Pixels of each class id below ``classes`` (ids beyond it are counted as pixels, not as a class)."""
    if labels.dtype == np.uint8:  # OpenCV's histogram releases the GIL, so frames count in parallel
        hist = cv2.calcHist([labels], [0], None, [256], [0, 256]).ravel().astype(np.int64)
    else:
        ids = labels.ravel().astype(np.int64)
        hist = np.bincount(ids[ids >= 0], minlength=classes)
        hist = np.append(hist, int((ids < 0).sum()))  # negative ids are pixels of no class, like ids beyond it
    return np.append(hist[:classes], hist[classes:].sum())  # the rest, so shares are of all pixels


class Composer:
    """The work after the model, per frame, in a few threads (OpenCV releases the GIL): colour mask, blend,
    class counts, label PNG, and the YUV frame the encoder takes. Results come back in frame order, at most
    ``depth`` frames ahead of the encoder, so memory stays bounded."""

    def __init__(self, palette: np.ndarray, alpha: float, classes: int, labels_png: bool, threads: int):
        self.palette, self.alpha, self.classes, self.labels_png = palette, alpha, classes, labels_png
        self.pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="video-compose")
        self.pending: deque = deque()
        self.depth = 2 * max(1, threads) + 2

    def _compose(self, f: Frame, labels: np.ndarray, width: int, height: int):
        bgr = overlay(f.image, colorize(labels, self.palette), self.alpha)
        h, w = bgr.shape[:2]
        if (w, h) != (width, height):  # 4:2:0 needs even sides
            bgr = cv2.copyMakeBorder(bgr, 0, height - h, 0, width - w, cv2.BORDER_REPLICATE)
        frame = av.VideoFrame.from_ndarray(bgr, format="bgr24").reformat(format="yuv420p")
        png = encode_indexed_png(labels, None) if self.labels_png else None
        return f, frame, class_counts(labels, self.classes), png

    def submit(self, f: Frame, labels: np.ndarray, width: int, height: int) -> Iterator[tuple]:
        """Queue one frame; yields the finished frames that must go out now to keep within ``depth``."""
        self.pending.append(self.pool.submit(self._compose, f, labels, width, height))
        while len(self.pending) > self.depth:
            yield self.pending.popleft().result()

    def drain(self) -> Iterator[tuple]:
        while self.pending:
            yield self.pending.popleft().result()

    def close(self) -> None:
        for fut in self.pending:
            fut.cancel()
        self.pool.shutdown(wait=True)


def batches(frames: Iterator[Frame], size: int) -> Iterator[list[Frame]]:
    """Runs of up to ``size`` frames of one size, each handed on as soon as it is full (a camera's frame is not
    held back waiting for the next)."""
    pending: list[Frame] = []
    for f in frames:
        if pending and pending[0].image.shape != f.image.shape:
            yield pending
            pending = []
        pending.append(f)
        if len(pending) == size:
            yield pending
            pending = []
    if pending:
        yield pending


def segment_batch(model: SegmentationModel, images: list[np.ndarray], max_side: int) -> list[np.ndarray]:
    """Labels at each frame's size for frames of one size, in one runner call (the image pipeline's steps)."""
    h, w = images[0].shape[:2]
    size = input_size(model, h, w, max_side)
    labels = model.infer(np.concatenate([preprocess(im, model, size) for im in images]))
    return [restore_size(lab, h, w) for lab in labels]


def process(model: SegmentationModel, container, output: Path, *, alpha: float = 0.5, max_side: int = 2048,
            batch: int = 1, labels_zip: Path | None = None, frames_total: int | None = None,
            max_frames: int | None = None, progress: Callable[[Progress], None] | None = None,
            should_stop: Callable[[], bool] | None = None, compose_threads: int | None = None) -> FrameStats:
    """Segment every frame of an opened video: the overlay video to ``output``, label PNGs (lossless) to
    ``labels_zip`` if given; returns the per-frame statistics. ``batch`` frames go to the runner at once (give 1
    unless the model takes a dynamic batch). ``should_stop`` (checked per batch) raises :class:`Stopped`; the
    video written so far is closed properly either way, so a stopped run leaves a playable file."""
    stream = container.streams.video[0]
    fps = float(_rate(stream))
    stats: FrameStats | None = None
    writer: OverlayWriter | None = None
    archive = zipfile.ZipFile(labels_zip, "w", zipfile.ZIP_STORED) if labels_zip else None  # PNGs are compressed
    state = Progress(frames_total=frames_total)
    names = model.class_names
    if compose_threads is None:  # a GPU host's cores keep up with its model; two still overlap on a small CPU
        compose_threads = max(2, min(8, (os.cpu_count() or 2) // 2))
    composer = Composer(model.palette_bgr, alpha, len(names), archive is not None, compose_threads)

    def emit(done: Iterator[tuple]) -> None:
        for f, frame, counts, png in done:
            writer.write(frame)
            stats.add(f.index, f.time_s, counts)
            if png is not None:
                archive.writestr(f"frame_{f.index:06d}.png", png)
            state.frames_done += 1

    try:
        for todo in batches(read_ahead(read_frames(container, max_frames)), batch):
            if should_stop is not None and should_stop():
                emit(composer.drain())  # what was segmented is in the file a stopped run leaves
                raise Stopped(stats)
            h, w = todo[0].image.shape[:2]
            if writer is None:
                writer = OverlayWriter(output, w, h, fps)
                stats = FrameStats(names, fps, w, h)
            for f, labels in zip(todo, segment_batch(model, [f.image for f in todo], max_side)):
                emit(composer.submit(f, labels, writer.stream.width, writer.stream.height))
            if progress is not None:
                progress(state)
        emit(composer.drain())
        if progress is not None:
            progress(state)
    finally:
        composer.close()
        if writer is not None:
            writer.close()
        if archive is not None:
            archive.close()
    if stats is None:
        raise VideoError(400, "the video has no frames")
    return stats
