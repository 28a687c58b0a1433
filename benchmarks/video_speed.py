"""Video and live-stream speed (docs/video.md): runs on CPU as is, and on a GPU host with onnxruntime-gpu or a
TensorRT engine as MODEL.

    python benchmarks/video_speed.py [MODEL] [--frames 120] [--size 360x480] [--live-frames 60] [--streams 1]

(1) Video job frames/s: a clip of --size made from CamVid val frames (../shared) or the bundled photo, through
    the video job's own code (`serving.video.process`: decode, pre-process, model, overlay, H.264 encode, per-frame
    statistics), against the engine-only loop (`model.infer` on the same frames, pre-processed beforehand).
    Target: ratio >= 0.8.
(2) Live WebSocket: `segment serve` on loopback with MODEL; --streams clients, each sending 640x480 JPEGs over
    /ws/segment. Lock-step (send, wait for the reply): p50/p99 latency and frames/s per stream. Free-running
    (a 30 fps sender): frames/s segmented and the share dropped.
"""

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.core.resources import bundled_models  # noqa: E402
from app.engines import load_model  # noqa: E402
from app.serving import video  # noqa: E402
from app.serving.pipeline import input_size, preprocess  # noqa: E402
from tests.server import Server  # noqa: E402
from tests.videos import scene_frames, write_clip  # noqa: E402


def video_job(model_path: Path, frames: int, size: tuple[int, int], batch: int) -> dict:
    h, w = size
    pictures = scene_frames(frames, h, w)
    with tempfile.TemporaryDirectory() as tmp:
        clip = write_clip(Path(tmp) / "clip.mp4", pictures, fps=30)
        model = load_model(model_path)
        try:
            tensors = [preprocess(p, model, input_size(model, h, w, 2048)) for p in pictures]
            for x in tensors[:3]:  # warm-up
                model.infer(x)
            start = time.perf_counter()
            for x in tensors:
                model.infer(x)
            engine = frames / (time.perf_counter() - start)
            container = video.open_video(clip)
            start = time.perf_counter()
            video.process(model, container, Path(tmp) / "out.mp4", batch=batch, frames_total=frames)
            job = frames / (time.perf_counter() - start)
            container.close()
        finally:
            model.close()
    return {"frames": frames, "size": f"{h}x{w}", "engine_fps": round(engine, 2), "job_fps": round(job, 2),
            "ratio": round(job / engine, 3)}


async def live_client(url: str, jpegs: list[bytes], lockstep: bool, seconds: float) -> dict:
    import websockets

    latencies, replies, dropped = [], 0, 0
    async with websockets.connect(url, max_size=None) as ws:
        start = time.perf_counter()
        if lockstep:
            i = 0
            while time.perf_counter() - start < seconds:
                t = time.perf_counter()
                await ws.send(jpegs[i % len(jpegs)])
                header = json.loads(await ws.recv())
                await ws.recv()
                latencies.append((time.perf_counter() - t) * 1000)
                replies, i = replies + 1, i + 1
        else:  # a 30 fps camera that never waits
            sent_at: dict[int, float] = {}

            async def send():
                n = 0
                while time.perf_counter() - start < seconds:
                    sent_at[n] = time.perf_counter()
                    await ws.send(jpegs[n % len(jpegs)])
                    n += 1
                    await asyncio.sleep(max(0.0, start + n / 30 - time.perf_counter()))
                return n

            sender = asyncio.create_task(send())
            while not sender.done() or replies < 1:
                try:
                    header = json.loads(await asyncio.wait_for(ws.recv(), timeout=max(1.0, seconds)))
                except TimeoutError:
                    break
                await ws.recv()
                latencies.append((time.perf_counter() - sent_at[header["frame"]]) * 1000)
                replies, dropped = replies + 1, header["dropped"]
            sent = await sender
        elapsed = time.perf_counter() - start
    out = {"fps": round(replies / elapsed, 2), "p50_ms": round(statistics.median(latencies), 1),
           "p99_ms": round(float(np.percentile(latencies, 99)), 1), "replies": replies}
    if not lockstep:
        out.update(sent=sent, dropped=dropped)
    return out


def live(model_path: Path, streams: int, seconds: float) -> dict:
    pictures = scene_frames(30, 480, 640)
    jpegs = [cv2.imencode(".jpg", p, [cv2.IMWRITE_JPEG_QUALITY, 85])[1].tobytes() for p in pictures]
    with tempfile.TemporaryDirectory() as tmp:
        engines = Path(tmp) / "engines"
        engines.mkdir()
        for f in model_path.parent.glob(model_path.stem + ".*"):
            shutil.copy(f, engines)
        server = Server(engines, model=model_path.stem, env={"SEGMENT_RESULTS_DIR": str(Path(tmp) / "results"),
                                                              "SEGMENT_LIVE_MAX_STREAMS": str(max(8, streams))})
        url = server.url.replace("http", "ws") + "/ws/segment?view=mask"
        try:
            asyncio.run(live_client(url, jpegs, True, 3))  # warm-up
            result = {}
            for mode, lockstep in (("lockstep", True), ("camera_30fps", False)):
                async def all_streams():
                    return await asyncio.gather(*(live_client(url, jpegs, lockstep, seconds) for _ in range(streams)))
                per = asyncio.run(all_streams())
                result[mode] = {"streams": streams, "fps_per_stream": [p["fps"] for p in per],
                                "p50_ms": statistics.median(p["p50_ms"] for p in per),
                                "p99_ms": max(p["p99_ms"] for p in per),
                                **({"dropped_share": round(sum(p["dropped"] for p in per) /
                                                           max(1, sum(p["sent"] for p in per)), 3)}
                                   if not lockstep else {})}
        finally:
            server.stop()
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", type=Path, default=bundled_models() / "camvid_bisenetv2.onnx")
    p.add_argument("--frames", type=int, default=120)
    p.add_argument("--size", default="360x480", help="HxW of the clip (GPU: 1080x1920)")
    p.add_argument("--batch", type=int, default=1, help="frames per runner call (a model with a dynamic batch)")
    p.add_argument("--streams", type=int, default=1, help="concurrent live streams")
    p.add_argument("--seconds", type=float, default=15, help="length of each live run")
    p.add_argument("--skip-live", action="store_true")
    args = p.parse_args()
    h, w = (int(v) for v in args.size.split("x"))
    import av
    import onnxruntime

    print(f"av {av.__version__} (FFmpeg {av.ffmpeg_version_info}), onnxruntime {onnxruntime.__version__}, "
          f"encoder {video.encoder()[0]}, model {args.model.name}")
    job = video_job(args.model, args.frames, (h, w), args.batch)
    print(f"video job: {job['job_fps']} frames/s; engine-only loop {job['engine_fps']} frames/s; "
          f"ratio {job['ratio']} (target >= 0.8)  [{job['frames']} frames of {job['size']}]")
    if not args.skip_live:
        result = live(args.model, args.streams, args.seconds)
        for mode, r in result.items():
            print(f"live {mode}, 640x480 JPEG: {r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
