"""One benchmark loop for ``GET /bench`` and ``segment test``: warm-up, timed iterations, honest statistics."""

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import numpy as np

from ..core.resources import sample_image
from ..engines import SegmentationModel
from .imaging import check_header, decode
from .pipeline import input_size, preprocess, render, segment_bytes

MAX_ITERATIONS = 100_000


@dataclass
class BenchConfig:
    """``engine``: the runner alone on a prepared input (like the seed and trtexec); ``e2e``: bytes to PNG."""

    mode: Literal["engine", "e2e"] = "engine"
    iterations: int = 100
    seconds: float | None = None  # stop early once this much time has been spent timing
    deadline_s: float | None = None  # the whole run, warm-up included, stops after this long (>= 1 timed iteration)
    warmup_iterations: int = 10
    warmup_seconds: float | None = None
    batch: int = 1
    size: tuple[int, int] | None = None  # (H, W) fed to a model with dynamic H/W; default: from the image
    image: Path = field(default_factory=sample_image)
    max_side: int = 2048

    def __post_init__(self):
        if not 1 <= self.iterations <= MAX_ITERATIONS:
            raise ValueError(f"iterations must be 1..{MAX_ITERATIONS}")
        if self.batch < 1:
            raise ValueError("batch must be at least 1")
        if self.mode == "e2e" and self.batch != 1:
            raise ValueError("e2e mode runs one request at a time (batch 1)")


def percentiles(ms: np.ndarray) -> dict:
    """min / mean / p50 / p90 / p95 / p99 / max in milliseconds."""
    p50, p90, p95, p99 = np.percentile(ms, [50, 90, 95, 99])
    return {"min": float(ms.min()), "mean": float(ms.mean()), "p50": float(p50), "p90": float(p90),
            "p95": float(p95), "p99": float(p99), "max": float(ms.max())}


def _fed_size(model: SegmentationModel, cfg: BenchConfig, image_hw: tuple[int, int]) -> tuple[int, int]:
    if cfg.size is None:
        return input_size(model, *image_hw, cfg.max_side)
    fixed = model.input_hw
    if any(f and f != s for f, s in zip(fixed, cfg.size)):
        raise ValueError(f"{model.name} has a fixed input of {fixed[0]}x{fixed[1]}; it cannot take {cfg.size[0]}x{cfg.size[1]}")
    if any(s % 32 for s in cfg.size):
        raise ValueError("height and width must be multiples of 32")
    return cfg.size


def fed_size(model: SegmentationModel, cfg: BenchConfig) -> tuple[int, int]:
    """(H, W) each step feeds the model, from the image's header alone: for checking a run's bounds before it."""
    width, height, _ = check_header(Path(cfg.image).read_bytes(), 1 << 62)
    if cfg.mode == "engine":
        return _fed_size(model, cfg, (height, width))
    return input_size(model, height, width, cfg.max_side)


def run(model: SegmentationModel, cfg: BenchConfig, progress: Callable[[int], None] | None = None) -> dict:
    """Benchmark ``model``; ``progress(n)`` is called after each timed iteration."""
    begun = time.perf_counter()

    def out_of_time() -> bool:
        return cfg.deadline_s is not None and time.perf_counter() - begun >= cfg.deadline_s

    data = Path(cfg.image).read_bytes()
    image = decode(data, 1 << 62)  # real pixels: the input is prepared once from them
    stages: dict[str, list[float]] = {}
    if cfg.mode == "engine":
        h, w = _fed_size(model, cfg, image.shape[:2])
        x = np.ascontiguousarray(np.repeat(preprocess(image, model, (h, w)), cfg.batch, axis=0))
        shape = list(x.shape)

        def step():
            model.infer(x)
    else:
        if cfg.size is not None:
            raise ValueError("e2e mode feeds the image as a request would; --size applies to engine mode")
        h, w = input_size(model, *image.shape[:2], cfg.max_side)
        shape = list(model.input_shape(1, h, w))

        def step():
            s = segment_bytes(model, data, 1 << 62, cfg.max_side)
            render(s, model, "mask", 0.5, 1)
            for k, v in s.timings.items():
                stages.setdefault(k, []).append(v)

    warm_start, done = time.perf_counter(), 0

    def warming() -> bool:
        wanted = done < cfg.warmup_iterations or (
            cfg.warmup_seconds and time.perf_counter() - warm_start < cfg.warmup_seconds)
        return bool(wanted) and not out_of_time()

    while warming():
        step()
        done += 1
    stages.clear()

    latencies = []
    start = time.perf_counter()
    for i in range(cfg.iterations):
        t = time.perf_counter()
        step()
        latencies.append((time.perf_counter() - t) * 1000.0)
        if progress:
            progress(i + 1)
        if (cfg.seconds is not None and time.perf_counter() - start >= cfg.seconds) or out_of_time():
            break
    wall = time.perf_counter() - start
    ms = np.asarray(latencies)
    report = {
        "mode": cfg.mode, "model": model.name, "backend": model.backend,
        "device": model.device, "precision": model.meta.precision, "input_shape": shape, "batch": cfg.batch,
        "iterations": len(latencies), "warmup_iterations": done, "wall_s": wall,
        "throughput_images_per_s": len(latencies) * cfg.batch / wall,
        "latency_ms": percentiles(ms),
    }
    if cfg.mode == "e2e":
        report["stage_mean_ms"] = {k: float(np.mean(v)) for k, v in stages.items()}
    return report


def table(report: dict) -> str:
    """The report as aligned text, for the command line."""
    lat = report["latency_ms"]
    lines = [f"model        {report['model']} ({report['backend']} on {report['device']}, {report['precision']})",
             f"mode         {report['mode']}, input {report['input_shape']}, batch {report['batch']}",
             f"iterations   {report['iterations']} timed after {report['warmup_iterations']} warm-up, "
             f"{report['wall_s']:.2f} s",
             f"throughput   {report['throughput_images_per_s']:.2f} images/s",
             "latency ms   " + "  ".join(f"{k} {lat[k]:.2f}" for k in ("min", "mean", "p50", "p90", "p95", "p99", "max"))]
    if "stage_mean_ms" in report:
        lines.append("stages ms    " + "  ".join(f"{k} {v:.2f}" for k, v in report["stage_mean_ms"].items()))
    return "\n".join(lines)
