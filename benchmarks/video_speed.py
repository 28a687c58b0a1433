"""Video and live-stream speed (docs/video.md): runs on CPU as is, and on a GPU host with onnxruntime-gpu or a
TensorRT engine as MODEL. One invocation, about 2 minutes with the defaults (--budget-s caps the live steps):

    python benchmarks/video_speed.py [MODEL] [--size 1080x1920] [--frames 120] [--batch 1] [--decode auto]
        [--streams 1,2,4,8,12,16] [--seconds 10] [--workers N] [--env SEGMENT_BATCH_MAX=8 ...] [--json out.json]

(1) Video job frames/s: a clip of --size (default 1920x1080) made from CamVid val frames (../shared) or the
    bundled 2048x1024 photo panned sideways (scaled to the size), through the video job's own code
    (`open_decoding` with --decode, `serving.video.process`: decode, pre-process, model, overlay, H.264 encode,
    per-frame statistics), --batch frames per runner call, against the engine-only loop (`model.infer` on the same
    frames, pre-processed beforehand, in batches of --batch). Target: ratio >= 0.8.
(2) Live WebSocket: `segment serve` on loopback with MODEL (--workers, --env passed to it); one stream lock-step
    (send, wait for the reply: the unloaded latency), then for each count in --streams that many free-running
    30 fps cameras of 640x480 JPEGs (the clients spread over a few processes, so the client's own loop does not
    add latency): frames/s answered per stream, p50/p99 latency from send to reply, the share of frames dropped.
    A count is sustained when p99 < --p99-ms (100) and every stream gets >= 90% of 30 fps; the stepping stops
    after the first count that is not (--keep-going to run them all). --json writes the whole summary.
"""

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
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

CAMERA_FPS = 30


def video_job(model_path: Path, frames: int, size: tuple[int, int], batch: int, decode: str, rounds: int = 3) -> dict:
    h, w = size
    pictures = scene_frames(frames, h, w)
    with tempfile.TemporaryDirectory() as tmp:
        clip = write_clip(Path(tmp) / "clip.mp4", pictures, fps=30)
        model = load_model(model_path)
        try:
            side = input_size(model, h, w, 2048)
            tensors = [np.concatenate([preprocess(p, model, side) for p in pictures[i:i + batch]])
                       for i in range(0, frames, batch)]
            del pictures
            for x in tensors[:3]:  # warm-up
                model.infer(x)
            engines, jobs = [], []
            for _ in range(rounds):  # alternated, best of each: a shared machine's slow spells hit either side
                start = time.perf_counter()
                for x in tensors:
                    model.infer(x)
                engines.append(frames / (time.perf_counter() - start))
                container, decoder = video.open_decoding(clip, decode)
                start = time.perf_counter()
                try:
                    video.process(model, container, Path(tmp) / "out.mp4", batch=batch, frames_total=frames)
                finally:
                    container.close()
                jobs.append(frames / (time.perf_counter() - start))
            del tensors
        finally:
            model.close()
    engine, job = max(engines), max(jobs)
    return {"frames": frames, "size": f"{w}x{h}", "model_input": f"{side[1]}x{side[0]}", "batch": batch,
            "decoder": decoder, "nvdec_problem": video.nvdec.problem() if decode != "cpu" else None,
            "rounds": rounds, "engine_fps_each": [round(e, 2) for e in engines], "job_fps_each": [round(j, 2) for j in jobs],
            "engine_fps": round(engine, 2), "job_fps": round(job, 2), "ratio": round(job / engine, 3)}


async def live_client(url: str, jpegs: list[bytes], lockstep: bool, seconds: float) -> dict:
    """One stream: lock-step, or a 30 fps camera that never waits; latencies from send to the reply's header."""
    import websockets

    latencies, replies, dropped, sent, timings = [], 0, 0, 0, []
    async with websockets.connect(url, max_size=None) as ws:
        start = time.perf_counter()
        if lockstep:
            while time.perf_counter() - start < seconds:
                t = time.perf_counter()
                await ws.send(jpegs[sent % len(jpegs)])
                timings.append(json.loads(await ws.recv()).get("timings_ms") or {})
                await ws.recv()
                latencies.append((time.perf_counter() - t) * 1000)
                replies, sent = replies + 1, sent + 1
        else:
            sent_at: dict[int, float] = {}

            async def send():
                n = 0
                while time.perf_counter() - start < seconds:
                    sent_at[n] = time.perf_counter()
                    await ws.send(jpegs[n % len(jpegs)])
                    n += 1
                    await asyncio.sleep(max(0.0, start + n / CAMERA_FPS - time.perf_counter()))
                return n

            sender = asyncio.create_task(send())
            last = start
            while True:
                # Once the camera stops, replies still on their way get a short grace; the frame the server
                # dropped last never gets one, and waiting for it must not count as streaming time.
                wait = max(1.0, seconds) if not sender.done() else 0.5
                try:
                    header = json.loads(await asyncio.wait_for(ws.recv(), timeout=wait))
                except TimeoutError:
                    if sender.done():
                        break
                    continue
                await ws.recv()
                last = time.perf_counter()
                latencies.append((last - sent_at[header["frame"]]) * 1000)
                replies, dropped = replies + 1, header["dropped"]
                timings.append(header.get("timings_ms") or {})
            sent = await sender
        elapsed = (last if not lockstep else time.perf_counter()) - start
    return {"fps": replies / elapsed, "latencies": latencies, "replies": replies, "sent": sent,
            "dropped": sent - replies if not lockstep else 0, "server_dropped": dropped, "timings": timings}


def client_process(url: str, jpegs: list[bytes], lockstep: bool, seconds: float, streams: int) -> list[dict]:
    async def run():
        return await asyncio.gather(*(live_client(url, jpegs, lockstep, seconds) for _ in range(streams)))
    return asyncio.run(run())


def live_step(pool: ProcessPoolExecutor, procs: int, url: str, jpegs: list[bytes], streams: int, seconds: float,
              lockstep: bool = False) -> list[dict]:
    """``streams`` clients spread over ``procs`` processes, all started together."""
    shares = [streams // procs + (i < streams % procs) for i in range(procs)]
    futures = [pool.submit(client_process, url, jpegs, lockstep, seconds, n) for n in shares if n]
    return [r for f in futures for r in f.result()]


def server_stages(timings: list[dict]) -> dict:
    """Mean time of each server stage (the replies' ``timings_ms``): where a frame's latency goes."""
    keys = {k for t in timings for k in t}
    return {k: round(statistics.mean(t[k] for t in timings if k in t), 2) for k in sorted(keys)}


def summarize(streams: int, per: list[dict], p99_limit: float) -> dict:
    latencies = [x for p in per for x in p["latencies"]]
    fps = [round(p["fps"], 2) for p in per]
    sent = sum(p["sent"] for p in per)
    out = {"streams": streams, "fps_per_stream": fps, "fps_min": min(fps), "fps_mean": round(statistics.mean(fps), 2),
           "p50_ms": round(float(np.percentile(latencies, 50)), 1) if latencies else None,
           "p99_ms": round(float(np.percentile(latencies, 99)), 1) if latencies else None,
           "sent": sent, "answered": sum(p["replies"] for p in per),
           "dropped_share": round(sum(p["dropped"] for p in per) / max(1, sent), 3),
           "server_ms": server_stages([t for p in per for t in p["timings"]])}
    out["sustained"] = bool(latencies) and out["p99_ms"] < p99_limit and min(fps) >= 0.9 * CAMERA_FPS
    return out


def live(model_path: Path, steps: list[int], seconds: float, workers: int | None, env: dict, p99_limit: float,
         keep_going: bool, deadline: float) -> dict:
    pictures = scene_frames(30, 480, 640)
    jpegs = [cv2.imencode(".jpg", p, [cv2.IMWRITE_JPEG_QUALITY, 85])[1].tobytes() for p in pictures]
    procs = max(1, min(max(steps), (os.cpu_count() or 4) // 4))
    with tempfile.TemporaryDirectory() as tmp, ProcessPoolExecutor(procs) as pool:
        engines = Path(tmp) / "engines"
        engines.mkdir()
        for f in model_path.parent.glob(model_path.stem + ".*"):
            shutil.copy(f, engines)
        server = Server(engines, model=model_path.stem, workers=workers,
                        env={"SEGMENT_RESULTS_DIR": str(Path(tmp) / "results"),
                             "SEGMENT_LIVE_MAX_STREAMS": str(2 * max(steps) + 2), **env})  # room for closing ones
        url = server.url.replace("http", "ws") + "/ws/segment?view=mask"
        try:
            live_step(pool, 1, url, jpegs, 1, min(3.0, seconds), lockstep=True)  # warm-up
            one = summarize(1, live_step(pool, 1, url, jpegs, 1, seconds, lockstep=True), p99_limit)
            result = {"lockstep_1_stream": {k: one[k] for k in ("fps_mean", "p50_ms", "p99_ms", "server_ms")}, "steps": [],
                      "client_processes": procs}
            for n in steps:
                if time.monotonic() + seconds + 5 > deadline:
                    result["stopped"] = f"--budget-s reached before {n} streams"
                    break
                step = summarize(n, live_step(pool, procs, url, jpegs, n, seconds), p99_limit)
                result["steps"].append(step)
                print(f"  {n:2d} streams: {step['fps_mean']:6.2f} frames/s per stream (min {step['fps_min']}), "
                      f"p50 {step['p50_ms']} ms, p99 {step['p99_ms']} ms, dropped {step['dropped_share']:.1%}"
                      f"{'' if step['sustained'] else '  (not sustained)'}", flush=True)
                if not step["sustained"] and not keep_going:
                    result["stopped"] = f"{n} streams not sustained"
                    break
        finally:
            server.stop()
    ok = [s["streams"] for s in result["steps"] if s["sustained"]]
    result["sustained_streams"] = max(ok) if ok else 0
    return result


def machine() -> dict:
    import av
    import onnxruntime

    gpu = None
    if shutil.which("nvidia-smi"):
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True).stdout.strip() or None
    return {"host": platform.node(), "cpu_count": os.cpu_count(), "gpu": gpu, "python": platform.python_version(),
            "av": av.__version__, "ffmpeg": av.ffmpeg_version_info, "onnxruntime": onnxruntime.__version__,
            "ort_providers": onnxruntime.get_available_providers(), "encoder": video.encoder()[0]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", type=Path, default=bundled_models() / "camvid_bisenetv2.onnx")
    p.add_argument("--frames", type=int, default=120)
    p.add_argument("--rounds", type=int, default=3, help="video job and engine loop, alternated; best of each")
    p.add_argument("--size", default="1080x1920", help="HxW of the clip")
    p.add_argument("--batch", type=int, default=1, help="frames per runner call (a model with a dynamic batch)")
    p.add_argument("--decode", choices=("auto", "cpu", "cuda"), default="auto", help="the video job's decoder")
    p.add_argument("--streams", default="1,2,4,8,12,16", help="live stream counts to step through")
    p.add_argument("--seconds", type=float, default=10, help="length of each live step")
    p.add_argument("--p99-ms", type=float, default=100, help="the latency a sustained step stays under")
    p.add_argument("--keep-going", action="store_true", help="run every step, not only up to the first failing")
    p.add_argument("--workers", type=int, help="server processes (segment serve --workers)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="server setting, e.g. SEGMENT_BATCH_MAX=8 SEGMENT_BATCH_WAIT_MS=2 (repeatable)")
    p.add_argument("--budget-s", type=float, default=240, help="no live step starts past this many seconds")
    p.add_argument("--skip-job", action="store_true")
    p.add_argument("--skip-live", action="store_true")
    p.add_argument("--json", type=Path, help="write the summary here")
    args = p.parse_args()
    deadline = time.monotonic() + args.budget_s
    h, w = (int(v) for v in args.size.split("x"))
    env = dict(item.split("=", 1) for item in args.env)
    summary = {"machine": machine(), "model": args.model.name, "server": {"workers": args.workers, "env": env}}
    print(json.dumps(summary["machine"]), flush=True)
    if not args.skip_job:
        job = summary["video_job"] = video_job(args.model, args.frames, (h, w), args.batch, args.decode, args.rounds)
        print(f"video job: {job['job_fps']} frames/s; engine-only loop {job['engine_fps']} frames/s; ratio "
              f"{job['ratio']} (target >= 0.8)  [{job['frames']} frames of {job['size']}, batch {job['batch']}, "
              f"decoder {job['decoder']}]", flush=True)
    if not args.skip_live:
        steps = [int(n) for n in args.streams.split(",")]
        print(f"live, 640x480 JPEG at {CAMERA_FPS} fps per stream:", flush=True)
        result = summary["live"] = live(args.model, steps, args.seconds, args.workers, env, args.p99_ms,
                                        args.keep_going, deadline)
        print(f"  lock-step, 1 stream: {result['lockstep_1_stream']}")
        print(f"  sustained (p99 < {args.p99_ms:g} ms, >= {0.9 * CAMERA_FPS:g} fps each): "
              f"{result['sustained_streams']} streams")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
