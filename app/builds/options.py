"""What to build, typed once: the route, the command line and the build job all use :class:`BuildOptions`."""

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, Field, ValidationError, model_validator

from ..core.errors import BuildError
from ..core.metadata import Precision

Target = Literal["tensorrt", "onnxruntime"]
PRECISIONS: tuple[str, ...] = Precision.__args__
ONNXRUNTIME_BUILDS = ("fp16", "int8")  # fp32 is the source ONNX itself; bf16 only TensorRT builds


def parse_shape(text) -> tuple[int, int, int]:
    """'batch,height,width' (or three ints) as three positive ints; :class:`BuildError` naming the expected form."""
    if isinstance(text, (tuple, list)):
        text = ",".join(map(str, text))
    try:
        b, h, w = (int(v) for v in str(text).split(","))
    except ValueError:
        raise BuildError(f"invalid shape {text!r}: expected 'batch,height,width', e.g. 1,512,1024") from None
    if min(b, h, w) < 1:
        raise BuildError(f"invalid shape {text!r}: every dimension must be at least 1")
    return b, h, w


def check_precision(target: str, precision: str) -> None:
    """ONNX Runtime serves fp32 (the ONNX as registered), fp16 and int8 (built copies); TensorRT builds all four."""
    if target == "onnxruntime" and precision not in ("fp32", *ONNXRUNTIME_BUILDS):
        raise BuildError(f"a build for ONNX Runtime is an fp16 or int8 model for ONNX Runtime, not {precision} (it "
                         "serves fp32, fp16 (CUDA) or int8 models: fp32 is the ONNX as registered; bf16 is a TensorRT "
                         "precision)")


Shape = Annotated[tuple[int, int, int], BeforeValidator(parse_shape)]


class BuildOptions(BaseModel):
    """A build: for which backend, in which precision, with which shapes (batch, height, width; None takes them
    from the ONNX and its metadata) and, for int8, which calibration photos."""

    target: Target = "tensorrt"
    precision: Precision = "fp32"
    min_shape: Shape | None = None
    opt_shape: Shape | None = None
    max_shape: Shape | None = None
    workspace_mb: int | None = Field(None, gt=0)
    calib_dir: Path | None = None
    calib_images: int = Field(64, ge=1)

    @classmethod
    def parse(cls, **fields) -> "BuildOptions":
        """Options from the route's form fields or the command line's flags; :class:`BuildError` (422) in plain
        words when they do not fit together."""
        try:
            return cls(**{k: v for k, v in fields.items() if v is not None})
        except ValidationError as exc:
            raise BuildError("; ".join(_plain(e) for e in exc.errors())) from None

    @model_validator(mode="after")
    def _consistent(self):
        check_precision(self.target, self.precision)
        if self.target == "onnxruntime" and self.precision == "fp32":
            raise BuildError("an fp32 model for ONNX Runtime is the source ONNX itself: build fp16 (CUDA) or int8 (CPU)")
        if self.precision == "int8" and self.calib_dir is None:
            raise BuildError("int8 needs calibration images (a folder of typical photos)")
        return self


class BuildRequest(BaseModel):
    """One build job: the registered source ONNX, the file to write, and how."""

    name: str
    source: Path
    output: Path
    options: BuildOptions


def _plain(error: dict) -> str:
    """One pydantic error as a sentence: our own BuildError text as it was, others with the field named."""
    message = str(error.get("ctx", {}).get("error") or error["msg"])
    field = ".".join(map(str, error["loc"]))
    return message if not field or isinstance(error.get("ctx", {}).get("error"), BuildError) else f"{field}: {message}"
