"""Per-model metadata: the JSON file beside each model in the repository (``NAME.onnx`` + ``NAME.json``)."""

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .datasets import DATASETS
from .errors import MetadataError

Precision = Literal["fp32", "fp16", "bf16", "int8"]


class BuildInfo(BaseModel):
    """How a built model was made (``segment compile`` / ``POST /engines``): what it came from, with which tools
    on which hardware, and how well it agrees with its source. Tool-specific fields are kept as they come."""

    model_config = ConfigDict(extra="allow")

    target: Literal["tensorrt", "onnxruntime"]
    source: str | None = None
    source_sha256: str | None = None
    tensorrt_version: str | None = None
    gpu: str | None = None
    compute_capability: str | None = None
    options: dict = Field(default_factory=dict)
    parity: dict | None = None


class ModelMeta(BaseModel):
    """What the service needs to know about a model beyond its graph; Cityscapes defaults when absent."""

    dataset: str = "cityscapes"
    arch: str | None = None
    num_classes: int | None = Field(None, ge=1)
    class_names: list[str] = Field(default_factory=list)
    palette: list[tuple[int, int, int]] = Field(default_factory=list)
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    input_size: tuple[int, int] | None = Field(None, description="[H, W] the model was exported for")
    input_format: str = Field("float_nchw", description="float_nchw (normalised) or uint8_nhwc (raw RGB pixels)")
    trained: bool = True
    source_sha256: str | None = None
    sha256: str | None = Field(None, description="SHA-256 of the model file itself: a copy fetched from a remote "
                                                 "repository must match it")
    description: str | None = None
    precision: Precision = Field("fp32", description="numeric precision the model computes in")
    build: BuildInfo | None = Field(None, description="set on models made by a build")
    extra: dict = Field(default_factory=dict, description="free-form fields (export options, training summary)")

    @model_validator(mode="before")
    @classmethod
    def _lift_old_fields(cls, data):
        # Files written before precision and build were typed fields kept them under "extra".
        if isinstance(data, dict) and isinstance(data.get("extra"), dict):
            extra = dict(data["extra"])
            for key in ("precision", "build"):
                if key in extra and key not in data:
                    data = {**data, key: extra.pop(key)}
            data["extra"] = extra
        return data

    @model_validator(mode="after")
    def _fill_from_dataset(self):
        names, palette, mean, std = DATASETS.get(self.dataset, DATASETS["cityscapes"])
        if self.mean is None:
            self.mean = mean
        if self.std is None:
            self.std = std
        if not self.class_names:
            self.class_names = list(names)
        if not self.palette:
            self.palette = list(palette)
        if self.num_classes is None:
            self.num_classes = len(self.class_names)
        return self


def meta_path(model_path: Path, exists: Callable[[Path], bool] = Path.exists) -> Path:
    """The metadata file that belongs to ``model_path``: ``NAME.json`` for ``NAME.onnx``; an engine's own
    ``NAME.trt.json`` (``.engine.json``, ``.plan.json``), so that ``segment compile m.onnx m.trt`` (the seed's form)
    leaves the ONNX's ``m.json`` alone. An engine with only a ``NAME.json`` and no ``NAME.onnx`` beside it (as
    written before) keeps reading that one. ``exists`` answers for another store than the local disk."""
    if model_path.suffix.lower() == ".onnx":
        return model_path.with_suffix(".json")
    own, shared = model_path.with_name(model_path.name + ".json"), model_path.with_suffix(".json")
    if not exists(own) and exists(shared) and not exists(model_path.with_suffix(".onnx")):
        return shared
    return own


def load_meta(model_path: Path) -> ModelMeta:
    """Read the metadata beside ``model_path``; Cityscapes defaults when there is none."""
    path = meta_path(model_path)
    if not path.exists():
        return ModelMeta()
    try:
        return ModelMeta.model_validate(json.loads(path.read_text()))
    except (ValueError, ValidationError) as exc:
        raise MetadataError(f"{path.name}: invalid metadata ({exc})") from exc


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename: readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_meta(model_path: Path, meta: ModelMeta) -> Path:
    """Write the metadata beside ``model_path`` atomically; returns its path."""
    path = meta_path(model_path)
    write_atomic(path, (meta.model_dump_json(indent=2) + "\n").encode())
    return path


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
