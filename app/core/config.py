"""Service settings, read from ``SEGMENT_*`` environment variables (and a ``.env`` file if present)."""

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL = "camvid_bisenetv2"


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/bisenet-serve``, else ``~/.cache/bisenet-serve``; the temp folder where there is no home (a
    container run with an arbitrary uid)."""
    import tempfile

    base = os.environ.get("XDG_CACHE_HOME")
    if not base:
        try:
            base = Path.home() / ".cache"
        except RuntimeError:
            base = Path(tempfile.gettempdir())
    return Path(base) / "bisenet-serve"


class Settings(BaseSettings):
    """Every knob of the service; docs/configuration.md lists them (a test keeps it in step)."""

    model_config = SettingsConfigDict(env_prefix="SEGMENT_", env_file=".env", extra="ignore")

    engines_dir: Path | str = Field(
        Path("engines"), description="Model repository: ONNX files, engines, metadata JSON. A folder (created with "
                                     "the bundled models when it does not exist yet; relative paths are from the "
                                     "working folder) or an fsspec URI (s3://, gs://, file://, memory://; read-only, "
                                     "fetched into model_cache_dir and checked by hash; needs control_db).")
    model_cache_dir: Path = Field(
        default_factory=lambda: default_cache_dir() / "models",
        description="With an engines_dir URI: the local copies of its models, one folder per URI, each file checked "
                    "against the sha256 in its metadata.")
    model: str = Field(DEFAULT_MODEL, description="Default model at the first start and whenever this setting changes "
                                                  "(else the default set through the API persists): a file name or "
                                                  "stem inside engines_dir.")
    backend: Literal["auto", "tensorrt", "onnxruntime"] = Field(
        "auto", description="auto: TensorRT for .engine/.plan files, ONNX Runtime for .onnx.")
    ort_threads: int = Field(0, ge=0, description="ONNX Runtime intra-op threads (0: one per CPU core).")
    ort_providers: str = Field(
        "auto", description="auto (CUDA when onnxruntime-gpu sees a GPU, else CPU) or a comma list, e.g. cpu.")
    ort_cuda_options: dict[str, str | int] = Field(
        {"prefer_nhwc": 1, "fuse_conv_bias": 1},
        description="ONNX Runtime CUDA provider options as JSON ({} for ONNX Runtime's defaults). The default, "
                    "NHWC convolutions with fused bias, ran BiSeNetV2 fp16 1.9x faster on an H100.")
    cuda_blocking_sync: bool = Field(
        False, description="CUDA waits sleep instead of spinning a CPU core (frees CPU when many workers share a GPU).")
    gpu_decode: bool = Field(
        False, description="JPEG uploads decoded on the GPU (nvImageCodec) for raw-pixel models on CUDA at their "
                           "size; with SEGMENT_BATCH_MAX > 1, concurrent JPEGs are decoded and run as one batch. In "
                           "Ray mode the model replica decodes them (the ingress sends the JPEG's bytes). Run NVIDIA "
                           "MPS with several workers: without it, decodes stalled for seconds.")
    admin_token: SecretStr | None = Field(
        None, description="Bearer token for admin routes. Empty or only whitespace counts as unset (admin routes off).")
    allow_unauthenticated_admin: bool = Field(
        False, description="Local development only: admin routes without a token when none is set.")
    max_onnx_bytes: int = Field(512 * 2**20, gt=0, description="Largest ONNX upload to POST /engines (413 beyond).")
    max_upload_bytes: int = Field(25 * 2**20, gt=0, description="Largest accepted upload (413 beyond).")
    max_pixels: int = Field(50_000_000, gt=0, description="Largest accepted image, width x height (413 beyond).")
    min_side: int = Field(1, ge=1, description="Smallest accepted image side in pixels (400 below).")
    max_inflight: int = Field(32, ge=1, description="Segmentation requests admitted at once (503 + Retry-After beyond).")
    max_pixels_inflight: int = Field(
        200_000_000, gt=0, description="Decoded image pixels, width x height, held by all requests in flight together; "
                                       "a request that would pass it gets 503 + Retry-After. At least max_pixels "
                                       "(raised to it when unset).")
    body_timeout_s: float = Field(120.0, gt=0, description="Longest time to receive a request body (408 beyond).")
    body_idle_timeout_s: float = Field(
        15.0, gt=0, description="Longest wait for the next piece of a request body (408 beyond).")
    max_dynamic_side: int = Field(2048, ge=32, description="Longest side fed to a model with dynamic H/W.")
    batch_max: int = Field(1, ge=1, le=256, description="Dynamic batching: most images per runner call (1: off).")
    batch_wait_ms: float = Field(2.0, ge=0, le=1000, description="Dynamic batching: longest wait for a batch to fill.")
    png_compression: int = Field(1, ge=0, le=9, description="PNG compression level of responses (1: fast).")
    max_request_images: int = Field(
        32, ge=1, le=1024, description="Most images in one Open Inference Protocol request (/v2, 400 beyond).")
    grpc_address: str | None = Field(
        None, description="Open Inference Protocol over gRPC on this host:port (e.g. 0.0.0.0:8001; the grpc extra), "
                          "beside the HTTP port. Unset: no gRPC.")
    tracing: bool = Field(
        False, description="OpenTelemetry traces (the otel extra); exporter from the standard OTEL_* variables "
                           "(OTLP over HTTP by default). Off: OpenTelemetry is not even imported.")
    max_video_bytes: int = Field(500 * 2**20, gt=0, description="Largest video upload to POST /segment/video (413 "
                                                                 "beyond); separate from the image limit.")
    max_video_frames: int = Field(18_000, gt=0, description="Most frames in one video job (413 beyond): 10 minutes "
                                                             "at 30 fps.")
    video_queue: int = Field(4, ge=1, description="Video jobs queued or running at once (503 + Retry-After beyond).")
    results_dir: Path = Field(Path("results"), description="Folder of video job results (overlay video, statistics, "
                                                           "label archive, job record); relative paths are from the "
                                                           "working folder.")
    results_keep: int = Field(50, ge=1, description="Finished video jobs kept on disk; the oldest go first.")
    results_max_age_h: float = Field(24.0, gt=0, description="Hours a finished video job is kept on disk (swept at "
                                                              "start, on each submit, after each job, and every "
                                                              "tenth of this, at most 10 minutes, apart).")
    video_decode: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Video jobs' decoder: auto (NVDEC on an NVIDIA GPU where FFmpeg can use it, else the "
                            "CPU, saying why in the log), cpu, or cuda (NVDEC or the server does not start).")
    live_max_streams: int = Field(8, ge=1, description="Live camera WebSocket connections at once (closed with code "
                                                       "1013, try again later, beyond).")
    log_level: str = Field("info", description="Server log level.")
    workers: int = Field(1, ge=1, le=64, description="Server processes; each loads the models the control store wants "
                                                     "(docs/control-plane.md) with its own batcher.")
    worker_start_timeout_s: int = Field(
        120, ge=5, description="With several workers: how long a (re)started worker may take to load its models and "
                               "answer uvicorn's health check before it is killed and started again (uvicorn: 5 s).")
    control_db: Path | None = Field(
        None, description="The control store (SQLite): models wanted loaded, the default, build jobs. Default: "
                          ".control.db inside engines_dir. Shared by every worker of the machine.")
    autoload: bool = Field(False, description="Load a model on its first request (?model=NAME) instead of answering "
                                              "409; least recently used ones unloaded beyond max_loaded_models.")
    max_loaded_models: int = Field(4, ge=1, description="Autoload: most models loaded at once (the default is never "
                                                        "unloaded to make room; explicit loads are not limited).")
    reconcile_interval_ms: float = Field(100.0, gt=0, le=500, description="How often each worker checks the control "
                                                                          "store for changes.")
    # Ray Serve (`segment serve --ray`, the `cluster` extra); a Serve config file's own fields override these.
    ray_layout: Literal["split", "fused"] = Field(
        "split", description="Ray: `split`: CPU ingress replicas (HTTP, decode, encode) in front of model replicas "
                             "(the runners); `fused`: each replica serves the whole app with runners of its own, as "
                             "the embedded server's workers do (no hop between replicas; the ray_model_* and "
                             "replica settings size it, the ray_ingress_* ones are unused).")
    ray_ingress_replicas: int = Field(
        1, ge=1, description="Ray: HTTP ingress replicas (decode, encode, the FastAPI app; CPU only).")
    ray_ingress_cpus: float = Field(1.0, ge=0, description="Ray: CPUs reserved per ingress replica.")
    ray_model_cpus: float = Field(1.0, ge=0, description="Ray: CPUs per model replica (also its ONNX Runtime "
                                                         "threads when SEGMENT_ORT_THREADS is 0).")
    ray_model_gpus: float = Field(0.0, ge=0, description="Ray: GPUs per model replica; fractions share a GPU.")
    ray_min_replicas: int = Field(1, ge=0, description="Ray: fewest model replicas (autoscaling).")
    ray_max_replicas: int = Field(1, ge=1, description="Ray: most model replicas (autoscaling; equal to the "
                                                       "minimum: a fixed number).")
    ray_max_replicas_per_node: int | None = Field(
        None, ge=1, description="Ray: most model (or fused) replicas on one node, so that a lost node takes no more "
                                "than that many with it (unset: Serve places them wherever they fit).")
    ray_target_ongoing_requests: float = Field(
        2.0, gt=0, description="Ray: requests in flight per model replica the autoscaler aims for.")
    ray_models_per_replica: int = Field(
        3, ge=1, description="Ray: models each model replica keeps loaded (multiplexing; least recently used go).")
    ray_request_timeout_s: float = Field(
        30.0, gt=0, description="Ray: longest wait for a model replica's answer (503 + Retry-After beyond).")
    ray_retries: int = Field(2, ge=0, description="Ray: retries of a call whose model replica died (node lost) "
                                                  "before answering 503 + Retry-After.")

    @field_validator("engines_dir", mode="before")
    @classmethod
    def _folder_or_uri(cls, value):
        # A URI stays text (a Path would fold "s3://b" into "s3:/b"); anything else is a folder.
        if is_uri(value):
            return check_uri(value)
        return Path(value) if isinstance(value, str) else value

    @field_validator("admin_token", mode="after")
    @classmethod
    def _blank_token_is_unset(cls, token: SecretStr | None) -> SecretStr | None:
        # An empty token would match an empty ``Authorization: Bearer``: never a token, always "no token".
        return token if token is not None and token.get_secret_value().strip() else None

    @model_validator(mode="after")
    def _one_image_fits_the_budget(self):
        if self.max_pixels_inflight < self.max_pixels and "max_pixels_inflight" not in self.model_fields_set:
            self.max_pixels_inflight = self.max_pixels  # the default budget grows with a raised per-image limit
        elif self.max_pixels_inflight < self.max_pixels:
            raise ValueError(f"max_pixels_inflight ({self.max_pixels_inflight:,}) must be at least max_pixels "
                             f"({self.max_pixels:,}): an image within the limit could otherwise never be served")
        return self

    @model_validator(mode="after")
    def _store_beside_a_remote_repository(self):
        if is_uri(self.engines_dir) and self.control_db is None:
            raise ValueError(f"engines_dir is the object-store URI {self.engines_dir}: the control store (SQLite) needs "
                             "a local or shared filesystem, so set SEGMENT_CONTROL_DB to a file path there")
        return self


def is_uri(location: Path | str) -> bool:
    """Whether a repository location is an fsspec URI (``scheme://...``, kept as text) rather than a folder."""
    return isinstance(location, str) and "://" in location


def check_uri(uri: str) -> str:
    """``uri`` without trailing slashes, if fsspec knows its scheme and can open it here (its package installed)."""
    import fsspec  # only for a URI: a folder never imports it

    scheme = uri.split("://", 1)[0].lower()
    try:
        fsspec.get_filesystem_class(scheme)
    except ValueError:
        raise ValueError(f"unknown URI scheme {scheme!r} in {uri!r}: use a folder or one of s3://, gs://, file://, "
                         f"memory:// (fsspec's schemes)") from None
    except ImportError as exc:
        raise ValueError(f"{uri!r} needs a package this install lacks: {exc} (e.g. pip install s3fs for s3://, "
                         "gcsfs for gs://)") from None
    return uri.rstrip("/")


@lru_cache
def get_settings() -> Settings:
    """Process-wide settings (tests build their own and pass them to ``create_app``)."""
    return Settings()
