"""One segmentation model behind a Polygraphy runner, whatever the backend, and the contract read from it.

The model only wraps its backend: batching, GPU decoding and hot-swap reference counts live in the serving layer.
"""

import threading
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Protocol

import numpy as np

from ..core.metadata import ModelMeta


class Backend(Protocol):
    """What a backend object gives the model (see ``onnxrt.OnnxRuntime`` and ``tensorrt.TensorRT``)."""

    name: str
    runner: object
    device: str
    shape_change_is_costly: bool
    can_bind_gpu_input: bool
    device_index: int  # the CUDA device it runs on

    def device_bytes(self) -> int | None: ...  # GPU memory it knows it holds; None: measure it from outside

    def run_bound(self, input_name: str, images: list, rows: int = 1) -> np.ndarray: ...

    def release(self) -> None: ...  # what run_bound kept between calls, at close


def _dim(value) -> int | None:
    return value if isinstance(value, int) and value > 0 else None


@dataclass(frozen=True)
class InputContract:
    """A model's single image input: name, dtype, layout and which sizes are fixed (None where dynamic).

    Raw-pixel models (``segment export --input uint8``) take uint8 RGB [N,H,W,3]; the others float32 [N,3,H,W]."""

    name: str
    dtype: np.dtype
    hw: tuple[int | None, int | None]
    batch_dynamic: bool

    @classmethod
    def from_dims(cls, name: str, dtype: np.dtype, dims: list) -> "InputContract":
        """From a 4-D shape as a runner or graph reports it (ints, or names / None / -1 where dynamic)."""
        if len(dims) != 4:
            raise ValueError(f"input {name!r} has shape {list(dims)}; expected 4-D [N,3,H,W]")
        if dtype == np.uint8 and dims[3] == 3:
            hw = (_dim(dims[1]), _dim(dims[2]))
        elif dtype == np.float32 and dims[1] == 3:
            hw = (_dim(dims[2]), _dim(dims[3]))
        else:
            raise ValueError(f"input {name!r} is {dtype} {list(dims)}; expected float32 [N,3,H,W] or uint8 [N,H,W,3]")
        return cls(name, np.dtype(dtype), hw, _dim(dims[0]) is None)

    @property
    def uint8(self) -> bool:
        return self.dtype == np.uint8

    @property
    def dynamic_hw(self) -> bool:
        return None in self.hw

    def shape(self, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
        """A full input shape in this layout: NHWC for raw-pixel models, NCHW otherwise."""
        return (batch, height, width, 3) if self.uint8 else (batch, 3, height, width)


@dataclass
class SegmentationModel:
    """An activated runner plus the contract read from it. ``infer`` is thread-safe."""

    name: str
    path: Path
    meta: ModelMeta
    runtime: Backend
    contract: InputContract
    output_kind: str = "labels"  # "labels" ([N,H,W] ints) or "logits" ([N,C,H,W] floats)
    num_classes: int = 0
    palette: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.uint8))
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # held during inference

    @property
    def backend(self) -> str:
        return self.runtime.name

    @property
    def device(self) -> str:
        return self.runtime.device

    @property
    def input_name(self) -> str:
        return self.contract.name

    @property
    def input_dtype(self) -> np.dtype:
        return self.contract.dtype

    @property
    def input_hw(self) -> tuple[int | None, int | None]:
        return self.contract.hw

    @property
    def batch_dynamic(self) -> bool:
        return self.contract.batch_dynamic

    @property
    def dynamic_hw(self) -> bool:
        return self.contract.dynamic_hw

    @property
    def uint8_input(self) -> bool:
        return self.contract.uint8

    def input_shape(self, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
        return self.contract.shape(batch, height, width)

    @cached_property
    def class_names(self) -> list[str]:
        """One name per class the model outputs: the metadata's, then ``class N`` past them."""
        names = list(self.meta.class_names)
        return [names[i] if i < len(names) else f"class {i}" for i in range(self.num_classes)]

    @cached_property
    def palette_bgr(self) -> np.ndarray:
        """The palette in OpenCV's channel order, contiguous for fast lookups."""
        return np.ascontiguousarray(self.palette[:, ::-1])

    @property
    def label_dtype(self) -> type:
        return np.uint8 if self.num_classes <= 256 else np.int32

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Run one batch (NCHW float32, or NHWC uint8 for raw-pixel models); labels [N,H,W] uint8/int32."""
        with self._lock:  # runners are not thread-safe, and reuse their output buffers
            out = next(iter(self.runtime.runner.infer({self.input_name: batch}, check_inputs=False).values()))
            out = np.asarray(out)
            if self.output_kind == "logits":
                out = out.argmax(axis=1)
            else:
                out = out.reshape(out.shape[0], out.shape[-2], out.shape[-1]).copy()
        return out.astype(self.label_dtype, copy=False)

    @property
    def accepts_gpu_images(self) -> bool:
        """Whether a decoded image in GPU memory can be fed as it is: raw pixels in, labels out, a fixed size, and a
        backend that binds device memory."""
        return (self.uint8_input and self.output_kind == "labels" and not self.dynamic_hw
                and self.runtime.can_bind_gpu_input)

    def infer_on_gpu(self, images: list, rows: int = 1) -> np.ndarray:
        """Labels [N,H,W] for N RGB uint8 [H,W,3] images of the model's size already in GPU memory, run as one
        batch of ``rows`` (>= N; the batch size warmed on ONNX Runtime's CUDA provider)."""
        with self._lock:
            out = self.runtime.run_bound(self.input_name, images, rows)
        return out.reshape(len(images), *out.shape[-2:]).astype(self.label_dtype, copy=False)

    def describe(self) -> dict:
        """JSON-ready summary for /models/active and reports."""
        h, w = self.input_hw
        return {
            "name": self.name, "file": self.path.name, "backend": self.backend, "device": self.device,
            "input": {"name": self.input_name, "dtype": str(self.input_dtype),
                      "height": h, "width": w, "dynamic_hw": self.dynamic_hw, "dynamic_batch": self.batch_dynamic},
            "output_kind": self.output_kind, "num_classes": self.num_classes,
            "precision": self.meta.precision,
            "metadata": self.meta.model_dump(),
        }

    def close(self) -> None:
        """Deactivate the runner, releasing its session or engine."""
        with self._lock:
            self.runtime.release()
            if getattr(self.runtime.runner, "is_active", False):
                self.runtime.runner.deactivate()
