"""The ``segment`` command line: serve, export, train, eval (and the seed's compile, run, test)."""

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager, nullcontext
from pathlib import Path

EPILOG = """examples (the seed's three commands work as written, on .onnx files too):
  segment compile model.onnx model.trt --fp16     # TensorRT engine (needs TensorRT and a GPU)
  segment compile model.onnx model_int8.onnx --int8 photos/   # int8 for ONNX Runtime on CPU (~2.3x faster)
  segment run model.trt street.jpg mask.png       # colour mask; --view overlay|labels
  segment test model.trt                          # throughput and latency percentiles
  segment serve                                   # the bundled CamVid model on http://127.0.0.1:8000
  segment engines                                 # list the model repository
  segment export --arch bisenetv2 --weights model_final_v2_city.pth --classes 19 --dataset cityscapes \\
                 --height 1024 --width 2048 --output labels --out engines/city_v2.onnx
  segment eval engines/camvid_bisenetv2.onnx --data data/camvid --void-id 11
"""


@contextmanager
def worker_environment(workers: int):
    """What the server's worker processes read at start-up, set in this process's environment for them to
    inherit: their number, and where Prometheus values are shared (a temporary folder, removed afterwards, unless
    PROMETHEUS_MULTIPROC_DIR is set). Both are taken back afterwards: a later child must not be sent to a folder
    that is gone."""
    before = {key: os.environ.get(key) for key in ("SEGMENT_WORKERS", "PROMETHEUS_MULTIPROC_DIR")}
    os.environ["SEGMENT_WORKERS"] = str(workers)
    metrics_dir = None
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        metrics_dir = os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="segment-metrics-")
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def cmd_serve(args) -> int:
    import uvicorn

    from .core.config import get_settings
    from .core.resources import seed_repository

    settings = get_settings()
    if args.ray:
        return serve_on_ray(settings, args)
    if args.address:
        raise fail("--address joins a Ray cluster: use it with --ray")
    seed_repository(settings.engines_dir)  # once, before the workers start and open the control store there
    workers = args.workers or settings.workers
    with worker_environment(workers) if workers > 1 else nullcontext():
        uvicorn.run("app.main:create_app", factory=True, host=args.host, port=args.port, workers=workers,
                    log_level=settings.log_level, timeout_graceful_shutdown=30,
                    timeout_worker_healthcheck=settings.worker_start_timeout_s)
    return 0


def serve_on_ray(settings, args) -> int:
    """``serve --ray``: Ray is imported only here, and only when it is installed."""
    if args.workers:
        raise fail("--workers is for the embedded server; with --ray, set SEGMENT_RAY_INGRESS_REPLICAS and "
                   "SEGMENT_RAY_MIN_REPLICAS / SEGMENT_RAY_MAX_REPLICAS")
    try:
        from .cluster.launch import serve_on_ray as launch
    except ImportError as exc:
        raise fail(f"--ray needs Ray Serve: pip install 'bisenet-serve[cluster]' ({exc})")
    from .core.resources import seed_repository

    if not (args.address or os.environ.get("RAY_ADDRESS")):
        # A local Ray: once, before its replicas open the control store there. In a cluster this machine joins,
        # the replicas fill their repository themselves.
        seed_repository(settings.engines_dir)
    return launch(settings, args.host, args.port, args.address)


def fail(message: str, code: int = 2) -> SystemExit:
    """The one way a command stops on an error: ``error: ...`` on stderr and an exit status (2: bad usage or input,
    3: the model or build was refused, TensorRT missing included)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    return SystemExit(code)


def cmd_export(args) -> int:
    try:
        from .bisenet.export import export
    except ImportError as exc:
        raise fail(f"export needs PyTorch: pip install '.[export]' ({exc})") from None
    if args.weights is None and not args.random_init:
        raise fail("give --weights PATH.pth, or --random-init for untrained weights")
    if args.weights is not None and not args.weights.is_file():
        raise fail(f"no such checkpoint: {args.weights}")
    result = export(args.arch, args.out, weights=None if args.random_init else args.weights, classes=args.classes,
                    dataset=args.dataset, height=args.height, width=args.width, output=args.output,
                    dynamic_hw=args.dynamic_hw, opset=args.opset, seed=args.seed, input_kind=args.input)
    print(f"wrote {result['onnx']} and {result['metadata']}")
    print(f"ONNX Runtime vs PyTorch: max |logit difference| {result['max_abs_diff']:.3g}, "
          f"label agreement {result['label_agreement']:.4%}")
    return 0


def cmd_train(args) -> int:
    from .bisenet.train import main

    main(args)
    return 0


def _load(path: Path):
    """Load a model file for a one-off command, with plain-words errors instead of tracebacks."""
    from .core.config import get_settings
    from .core.errors import ServiceError
    from .engines import MODEL_SUFFIXES, OrtOptions, load_model

    if not path.is_file():
        raise fail(f"no such model file: {path}")
    if path.suffix.lower() not in MODEL_SUFFIXES:
        raise fail(f"{path.name}: expected a model file ({', '.join(MODEL_SUFFIXES)})")
    s = get_settings()
    try:
        return load_model(path, backend=s.backend, ort=OrtOptions.from_settings(s))
    except ServiceError as exc:
        raise fail(str(exc), 3) from None


def _shape(text: str) -> tuple[int, int, int]:
    from .builds.options import parse_shape

    try:
        return parse_shape(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW, e.g. 512x1024, got {text!r}") from None
    return h, w


def cmd_compile(args) -> int:
    from .builds.compiler import compile_model
    from .builds.options import BuildOptions
    from .engines import ONNX_SUFFIXES

    if not args.onnx.is_file():
        raise fail(f"no such ONNX file: {args.onnx}")
    if args.onnx.suffix.lower() != ".onnx":
        raise fail(f"{args.onnx.name}: the input must be an .onnx file")
    if args.int8 is not None and not args.int8.is_dir():
        raise fail(f"--int8 {args.int8}: no such folder of calibration images")
    target = "onnxruntime" if args.engine.suffix.lower() in ONNX_SUFFIXES else "tensorrt"
    try:
        opts = BuildOptions.parse(target=target, precision="int8" if args.int8 else args.precision,
                                  min_shape=args.min_shape, opt_shape=args.opt_shape, max_shape=args.max_shape,
                                  workspace_mb=args.workspace_mb, calib_dir=args.int8, calib_images=args.calib_images)
        compile_model(args.onnx, args.engine, opts, progress=lambda line: print(line, flush=True))
    except ValueError as exc:  # our ServiceErrors, and the libraries' own refusals of a bad model
        raise fail(str(exc), 3) from None
    return 0


def cmd_run(args) -> int:
    import cv2

    from .core.errors import ImageError
    from .serving.pipeline import segment_bytes, view_image
    from .serving.video import is_video_path

    if is_video_path(args.image):
        return run_video(args)
    image, view = Path(args.image), args.view or "mask"
    if not image.is_file():
        raise fail(f"no such image: {image}")
    model = _load(args.model)
    try:
        seg = segment_bytes(model, image.read_bytes(), 1 << 62, 4096)
        out = view_image(seg, model, view, args.alpha)
    except ImageError as exc:
        raise fail(f"{image.name}: {exc.detail}") from None
    finally:
        model.close()
    if view == "labels" and args.output.suffix.lower() in (".jpg", ".jpeg"):
        print("warning: JPEG is lossy and will alter class ids; use .png for --view labels", file=sys.stderr)
    if not cv2.imwrite(str(args.output), out):
        raise fail(f"could not write {args.output} (unknown image extension?)")
    print(f"wrote {args.output} ({out.shape[1]}x{out.shape[0]}, {view}); "
          + ", ".join(f"{k} {v:.1f} ms" for k, v in seg.timings.items()))
    return 0


def run_video(args) -> int:
    """``segment run`` on a video file, camera or stream: the overlay video, a progress bar, --stats, --labels.
    Ctrl-C stops at the next frame and still closes the video properly (a second Ctrl-C stops at once)."""
    import signal

    from tqdm import tqdm

    from .core.errors import VideoError
    from .serving.video import Stopped, encoder, is_url, open_decoding, process

    source = args.image
    if not is_url(source) and not Path(source).exists():
        raise fail(f"no such video: {source}")
    suffix = encoder()[1]
    if args.output.suffix.lower() != suffix:
        raise fail(f"{args.output.name}: the overlay video is written as {suffix} ({encoder()[0]}); name it *{suffix}")
    if args.view not in (None, "overlay"):
        print("note: videos are written as the overlay view (--labels ZIP keeps the class ids)", file=sys.stderr)
    model = _load(args.model)
    stop = []

    def on_interrupt(signum, frame):
        stop.append(True)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        container, decoder = open_decoding(source, args.decode)
        print(f"decoding with {decoder}", file=sys.stderr)
        total = container.streams.video[0].frames or None  # None for cameras and streams
        with tqdm(total=total, unit="frame", desc=Path(source).name or source, dynamic_ncols=True) as bar:
            try:
                stats = process(model, container, args.output, alpha=args.alpha, batch=1, labels_zip=args.labels,
                                frames_total=total, progress=lambda p: bar.update(p.frames_done - bar.n),
                                should_stop=lambda: bool(stop))
            except Stopped as exc:
                stats = exc.stats
            finally:
                container.close()
    except VideoError as exc:
        raise fail(f"{source}: {exc.detail}") from None
    finally:
        signal.signal(signal.SIGINT, previous)
        model.close()
    frames = len(stats.frames) if stats else 0
    if args.stats and stats:
        args.stats.write_text(json.dumps(stats.as_dict()) if args.stats.suffix.lower() == ".json" else stats.csv())
    print(f"wrote {args.output} ({frames} frames{', stopped by Ctrl-C' if stop else ''})"
          + (f", {args.stats}" if args.stats and stats else "") + (f", {args.labels}" if args.labels else ""))
    return 130 if stop else 0


def cmd_test(args) -> int:
    from tqdm import tqdm

    from .serving import bench

    cfg = bench.BenchConfig(mode=args.mode, iterations=args.iterations, seconds=args.seconds,
                            warmup_iterations=args.warmup, warmup_seconds=args.warmup_seconds, batch=args.batch,
                            size=args.size,
                            **({"image": args.image} if args.image else {}))
    model = _load(args.model)
    try:
        with tqdm(total=cfg.iterations, desc="timing", unit="it", leave=False) as bar:
            report = bench.run(model, cfg, progress=lambda n: bar.update(n - bar.n))
    except ValueError as exc:
        raise fail(str(exc)) from None
    finally:
        model.close()
    print(bench.table(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
        print(f"saved {args.json}")
    return 0


def cmd_engines(args) -> int:
    from .core.config import get_settings
    from .core.errors import ServiceError
    from .repository.remote import repository_at

    settings = get_settings()
    try:
        repository = repository_at(args.dir or settings.engines_dir, settings.model_cache_dir)
    except ValueError as exc:
        raise fail(str(exc))
    try:
        if args.stamp_sha256:
            stamped = repository.stamp_sha256()
            print(f"recorded the sha256 of {len(stamped)} model file(s) in their metadata: {', '.join(stamped) or '-'}")
        entries = repository.list()
    except ServiceError as exc:  # a read-only (URI) repository, an unreachable store
        raise fail(exc.detail) from None
    if not entries:
        print("the model repository is empty")
    for e in entries:
        meta = e["metadata"] or {}
        flags = "" if e["complete"] else "  [incomplete: no build metadata]"
        flags += "" if meta.get("trained", True) else "  [untrained]"
        print(f"{e['name']:<28} {e['kind']:<9} {e['precision']:<5} {e['bytes'] / 2**20:7.1f} MiB  "
              f"{meta.get('dataset', '?')}{flags}")
    return 0


def cmd_eval(args) -> int:
    import cv2

    from .serving.evaluate import confusion_image, confusion_table, evaluate

    if str(args.model).startswith(("http://", "https://")):
        result = eval_over_http(args)
    else:
        model = _load(Path(args.model))
        try:
            result = evaluate(model, args.data, args.split, void_id=args.void_id, flip=args.flip, scales=args.scales)
        except (ValueError, FileNotFoundError) as exc:
            raise fail(str(exc)) from None
        finally:
            model.close()
    print(f"{result['pipeline']}: mIoU {result['miou']:.4f}  pixel accuracy {result['pixel_accuracy']:.4f}  "
          f"({result['images']} images)")
    for name, iou in result["per_class_iou"].items():
        print(f"  {name:<16} {'-' if iou is None else f'{iou:.4f}'}")
    names = list(result["per_class_iou"])
    print("confusion matrix, % of each true class:\n" + confusion_table(result["confusion"], names))
    if args.confusion:
        cv2.imwrite(str(args.confusion), confusion_image(result["confusion"], names))
        print(f"wrote {args.confusion}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


def eval_over_http(args) -> dict:
    """``segment eval URL``: every image uploaded to a running service's ``POST /segment?view=labels`` (the served
    default, or ``--model-name``), scored against the labels: the check of a held-out split, through HTTP."""
    from .client import Client, SegmentError
    from .serving.evaluate import score

    if args.flip or args.scales != (1.0,):
        raise fail("--flip and --scales need a model file: the service never does test-time augmentation")
    with Client(args.model, model=args.model_name) as client:
        try:
            info = client.models()
            name = args.model_name or info["default"]
            entry = next((m for m in info["models"] if m["name"] == name), None)
            if entry is None or not entry.get("classes"):
                raise fail(f"{args.model} has no model {name!r} with class names (GET /models)")
            result = score(lambda path: client.segment(path, view="labels"), args.data, args.split,
                           entry["classes"], void_id=args.void_id)
        except (SegmentError, FileNotFoundError, ValueError) as exc:
            raise fail(str(exc)) from None
    return {"model": name, "pipeline": f"service over HTTP: POST {args.model}/segment?view=labels", **result}


def cmd_client(args) -> int:
    from .client import Client, SegmentError

    missing = [str(p) for p in args.images if not p.is_file()]
    if missing:
        raise fail(f"no such file: {', '.join(missing)}")
    with Client(args.url, model=args.model, retries=args.retries) as client:
        try:
            outcomes = client.segment_files(args.images, view=args.view, alpha=args.alpha,
                                            concurrency=args.concurrency, progress=not args.quiet)
        except SegmentError as exc:  # the server itself cannot be reached
            raise fail(exc.detail, 3) from None
    failed = {p: o for p, o in outcomes.items() if isinstance(o, SegmentError)}
    for path, exc in failed.items():
        print(f"error: {path}: {exc}", file=sys.stderr)
    if not args.quiet:
        print(f"{len(outcomes) - len(failed)} written (NAME.{args.view}.png beside each image), {len(failed)} failed")
    return 3 if failed else 0


def _scales(text: str) -> tuple[float, ...]:
    try:
        scales = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected scales like 0.75,1,1.25, got {text!r}") from None
    if not scales or any(not 0.25 <= s <= 4 for s in scales):
        raise argparse.ArgumentTypeError(f"scales must lie in 0.25..4, got {text!r}")
    return scales


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``segment train`` (kept here so that building the parser never imports torch)."""
    p.add_argument("--data", required=True, help="data set root with images/{train,val} and labels/{train,val}")
    p.add_argument("--splits", default="train",
                   help="split(s) to train on, comma-separated (train,val for a final model)")
    p.add_argument("--val-split", default="val", help="split scored at the end (flagged when it was trained on)")
    p.add_argument("--out", required=True, help="folder for weights.pth and train_log.json")
    p.add_argument("--arch", default="bisenetv2", choices=["bisenetv1", "bisenetv2"])
    p.add_argument("--classes", type=int, default=11)
    p.add_argument("--iters", type=int, default=12000)
    p.add_argument("--minutes", type=float, default=0, help="stop (and finish the schedule) after this long")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--crop", type=int, nargs=2, default=(352, 480), metavar=("H", "W"))
    p.add_argument("--scale", type=float, nargs=2, default=(0.75, 1.75), metavar=("MIN", "MAX"))
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=500, help="warm-up iterations")
    p.add_argument("--aux-weight", type=float, default=1.0)
    p.add_argument("--aux-loss", default="ce", choices=["ce", "ohem"], help="loss of the auxiliary heads (main: OHEM)")
    p.add_argument("--jitter", type=float, default=0.4, help="brightness/contrast/saturation jitter, +-fraction")
    p.add_argument("--aspect", type=float, nargs=2, default=(1.0, 1.0), metavar=("MIN", "MAX"),
                   help="random width/height stretch (log-uniform)")
    p.add_argument("--cast", type=float, default=0.0, help="per-channel colour gain, +-fraction (light colour)")
    p.add_argument("--blur", type=float, default=0.0, help="probability of a Gaussian blur (sigma 0.3-1.5)")
    p.add_argument("--class-weights", type=float, default=0.0, metavar="POWER",
                   help="weight classes by (median freq / freq) ** POWER in every loss (0: off)")
    p.add_argument("--ema", type=float, default=0.0, metavar="DECAY", help="average the weights (0: off)")
    p.add_argument("--ema-every", type=int, default=4, help="EMA update interval in iterations")
    p.add_argument("--ema-start", type=float, default=0.5, help="start the EMA at this fraction of the schedule")
    p.add_argument("--log-every", type=int, default=100, help="progress line interval in iterations")
    p.add_argument("--eval-sizes", default="352x480,384x480,448x608", help="val sizes for the final PyTorch eval")
    p.add_argument("--checkpoint-every", type=int, default=1000, help="save a resumable checkpoint every N iterations")
    p.add_argument("--resume", type=Path, help="continue from a checkpoint written by --checkpoint-every")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--seed", type=int, default=0)


def _command(sub, name: str, help: str, *examples: str) -> argparse.ArgumentParser:
    """A sub-command whose --help ends with examples."""
    epilog = "examples:\n" + "\n".join(f"  {e}" for e in examples) if examples else None
    return sub.add_parser(name, help=help, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segment", description="BiSeNet segmentation: serve, export, evaluate.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = _command(sub, "serve", "start the web service (settings from SEGMENT_* variables)",
                 "segment serve", "SEGMENT_MODEL=city_v2 segment serve --host 0.0.0.0 --port 8000")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, help="server processes, all following one control store (default: SEGMENT_WORKERS, 1)")
    p.add_argument("--ray", action="store_true", help="serve on Ray Serve (the `cluster` extra): start a local Ray, "
                   "or join one with --address; replicas and resources from SEGMENT_RAY_* (docs/ray.md)")
    p.add_argument("--address", help="with --ray: a running Ray cluster to join, `auto` or `ray://HOST:10001`")
    p.set_defaults(func=cmd_serve)

    p = _command(sub, "compile", "build a TensorRT engine from ONNX (needs TensorRT and an NVIDIA GPU), "
                 "or an fp16 (CUDA) or int8 (CPU) ONNX model for ONNX Runtime",
                 "segment compile model.onnx model.trt --fp16",
                 "segment compile model.onnx model.plan --int8 calib_images/ --max-shape 8,1024,2048",
                 "segment compile model.onnx model_int8.onnx --int8 calib_images/   # ONNX Runtime, no GPU",
                 "segment compile model.onnx model_fp16.onnx --fp16   # ONNX Runtime's CUDA provider")
    p.add_argument("onnx", type=Path)
    p.add_argument("engine", type=Path, help="output: .trt, .engine or .plan (TensorRT); .onnx (ONNX Runtime fp16 or int8)")
    prec = p.add_mutually_exclusive_group()
    prec.add_argument("--fp32", dest="precision", action="store_const", const="fp32", help="(default)")
    prec.add_argument("--fp16", dest="precision", action="store_const", const="fp16")
    prec.add_argument("--bf16", dest="precision", action="store_const", const="bf16")
    prec.add_argument("--int8", type=Path, metavar="CALIB_DIR", help="int8, calibrated on these images")
    p.set_defaults(precision="fp32")
    p.add_argument("--min-shape", type=_shape, metavar="B,H,W", help="dynamic profile minimum")
    p.add_argument("--opt-shape", type=_shape, metavar="B,H,W", help="dynamic profile optimum")
    p.add_argument("--max-shape", type=_shape, metavar="B,H,W", help="dynamic profile maximum")
    p.add_argument("--workspace-mb", type=int, help="builder workspace limit")
    p.add_argument("--calib-images", type=int, default=64, help="int8: calibrate on the first N images (by name)")
    p.set_defaults(func=cmd_compile)

    p = _command(sub, "run", "segment one image, or a video, camera or stream, with an engine or ONNX model",
                 "segment run model.trt street.jpg mask.png",
                 "segment run engines/camvid_bisenetv2.onnx drive.mp4 overlay.mp4 --stats classes.csv",
                 "segment run engines/camvid_bisenetv2.onnx /dev/video0 camera.mp4   # Ctrl-C to stop",
                 "segment run engines/camvid_bisenetv2.onnx street.jpg overlay.jpg --view overlay")
    p.add_argument("model", type=Path)
    p.add_argument("image", help="an image; or a video (.mp4 .m4v .mov .webm .mkv .avi), a camera (/dev/video0) or "
                                 "a stream URL that FFmpeg opens (rtsp://..., file:..., pipe:0)")
    p.add_argument("output", type=Path, help="the PNG/JPEG of the view; for a video the overlay video (.mp4)")
    p.add_argument("--view", choices=["mask", "overlay", "labels"], help="image: the view written (default mask)")
    p.add_argument("--stats", type=Path, help="video: per-frame class shares as CSV (or JSON for .json)")
    p.add_argument("--labels", type=Path, help="video: every frame's class ids as PNGs in this ZIP (lossless)")
    p.add_argument("--alpha", type=float, default=0.5, help="mask weight of the overlay")
    p.add_argument("--decode", choices=["auto", "cpu", "cuda"], default="auto",
                   help="video: decoder, as SEGMENT_VIDEO_DECODE (auto: NVDEC where FFmpeg can, else the CPU)")
    p.set_defaults(func=cmd_run)

    p = _command(sub, "test", "measure throughput and latency (engine loop or end to end)",
                 "segment test model.trt",
                 "segment test engines/camvid_bisenetv2.onnx --mode e2e --iterations 50 --json run.json")
    p.add_argument("model", type=Path)
    p.add_argument("--mode", default="engine", choices=["engine", "e2e"])
    p.add_argument("--iterations", type=int, default=100)
    p.add_argument("--seconds", type=float, help="stop timing after this long")
    p.add_argument("--warmup", type=int, default=10, help="warm-up iterations")
    p.add_argument("--warmup-seconds", type=float, help="warm up for at least this long")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--size", type=_size, metavar="HxW", help="input size for a model with dynamic H/W (engine mode)")
    p.add_argument("--image", type=Path, help="input image (default: the bundled Cityscapes sample)")
    p.add_argument("--json", type=Path, help="save the report")
    p.set_defaults(func=cmd_test)

    p = _command(sub, "engines", "list the model repository", "segment engines", "segment engines --dir /srv/models")
    p.add_argument("--dir", help="repository folder or fsspec URI (default: SEGMENT_ENGINES_DIR)")
    p.add_argument("--stamp-sha256", action="store_true",
                   help="record each model file's sha256 in its metadata (a folder, before copying it to an object "
                        "store)")
    p.set_defaults(func=cmd_engines)

    p = _command(sub, "export", "export a BiSeNet checkpoint to ONNX with its metadata (needs the export extra)",
                 "segment export --arch bisenetv2 --weights v2_city.pth --classes 19 --dataset cityscapes "
                 "--height 1024 --width 2048 --out engines/city.onnx",
                 "segment export --arch bisenetv1 --random-init --seed 0 --classes 19 --dataset cityscapes "
                 "--height 512 --width 1024 --dynamic-hw --out engines/v1_random.onnx")
    p.add_argument("--arch", required=True, choices=["bisenetv1", "bisenetv2"])
    p.add_argument("--weights", type=Path, help="upstream-style state_dict (.pth)")
    p.add_argument("--random-init", action="store_true", help="export untrained weights (for tests and benchmarks)")
    p.add_argument("--seed", type=int, default=0, help="seed of --random-init weights and the verification input")
    p.add_argument("--classes", type=int, required=True)
    p.add_argument("--dataset", required=True, choices=["cityscapes", "coco", "ade20k", "camvid"])
    p.add_argument("--height", type=int, required=True)
    p.add_argument("--width", type=int, required=True)
    p.add_argument("--output", default="labels", choices=["labels", "logits"],
                   help="labels: argmax inside the graph (default); logits: [N,C,H,W]")
    p.add_argument("--dynamic-hw", action="store_true", help="leave height and width dynamic")
    p.add_argument("--input", default="float", choices=["float", "uint8"],
                   help="float: normalised float32 NCHW (upstream's contract); uint8: raw RGB pixels [N,H,W,3], "
                        "cast, layout and normalisation inside the graph")
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--out", type=Path, required=True, help="the .onnx to write (metadata goes beside it)")
    p.set_defaults(func=cmd_export)

    p = _command(sub, "train", "train a BiSeNet on a CamVid-layout data set (GPU; needs the export extra)",
                 "segment train --data data/camvid --out runs/camvid --minutes 8.2")
    add_train_arguments(p)
    p.set_defaults(func=cmd_train)

    p = _command(sub, "eval", "mIoU of a model through the service's pipeline",
                 "segment eval engines/camvid_bisenetv2.onnx --data data/camvid --void-id 11",
                 "segment eval m.onnx --data data/camvid --void-id 11 --flip --scales 0.75,1,1.25 --confusion cm.png",
                 "segment eval http://localhost:8000 --data data/camvid --split test --void-id 11")
    p.add_argument("model", help="a model file, or the URL of a running service (scored through POST /segment)")
    p.add_argument("--model-name", help="with a URL: the served model to score (default: the default model)")
    p.add_argument("--data", type=Path, required=True, help="root with images/SPLIT and labels/SPLIT")
    p.add_argument("--split", default="val")
    p.add_argument("--void-id", type=int, help="label id left out of the metrics (CamVid: 11)")
    p.add_argument("--json", type=Path, help="also write the result as JSON")
    p.add_argument("--confusion", type=Path, metavar="PNG", help="save the confusion matrix as an image")
    p.add_argument("--flip", action="store_true", help="also average with the mirrored image (reports only; "
                   "the service never does this)")
    p.add_argument("--scales", type=_scales, default=(1.0,), metavar="S,S,...",
                   help="multi-scale test, relative to the model's input size, e.g. 0.75,1,1.25 (reports only)")
    p.set_defaults(func=cmd_eval)

    p = _command(sub, "client", "segment images on a running server, writing NAME.VIEW.png beside each image",
                 "segment client http://localhost:8000 street.jpg",
                 "segment client http://gpu-box:8000 photos/*.jpg --view overlay --concurrency 8")
    p.add_argument("url", help="the server, e.g. http://localhost:8000")
    p.add_argument("images", type=Path, nargs="+")
    p.add_argument("--view", default="mask", choices=["mask", "overlay", "labels"])
    p.add_argument("--alpha", type=float, default=0.5, help="mask weight of the overlay")
    p.add_argument("--model", help="the model to use (refused if the server answers with another)")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight at once")
    p.add_argument("--retries", type=int, default=3, help="further attempts on 503 (busy) or no answer")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.set_defaults(func=cmd_client)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as exc:
        from pydantic import ValidationError

        if not isinstance(exc, ValidationError) or exc.title != "Settings":
            raise
        # A setting the service cannot start with (an unknown URI scheme, a missing SEGMENT_CONTROL_DB...): say
        # which and why, without a traceback.
        raise fail("invalid settings: " + "; ".join(
            f"{'SEGMENT_' + str(e['loc'][0]).upper() + ': ' if e['loc'] else ''}{e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors())) from None


if __name__ == "__main__":
    sys.exit(main())
