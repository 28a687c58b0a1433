"""A model as the service serves it: batching and GPU decoding above the engine's model, and the reference count
that lets a swap wait for the requests still using it."""

import threading

import numpy as np

from ..engines import SegmentationModel
from . import gpu_decode
from .batching import Batcher


class ServedModel:
    """Wraps a :class:`SegmentationModel` with what serving adds; reads like the model it wraps (same contract,
    ``infer`` with the same signature), so the pipeline takes either."""

    def __init__(self, model: SegmentationModel, batcher: Batcher | None = None, gpu_decode_on: bool = False):
        self.model, self.batcher = model, batcher
        self.jpeg_batcher: Batcher | None = None  # JPEGs decoded on the GPU as one batch (infer_jpeg)
        self.gpu_decode_on = gpu_decode_on  # SEGMENT_GPU_DECODE: off unless asked for
        # JPEGs can go from nvImageCodec straight into this model
        self.can_decode_on_gpu = model.accepts_gpu_images and gpu_decode.available()
        self._ref_lock = threading.Lock()  # never held for long
        self._users = 0
        self._retired = False

    @classmethod
    def serve(cls, model: SegmentationModel, batch_max: int = 1, batch_wait_ms: float = 2.0, on_batch=None,
              gpu_decode_on: bool = False) -> "ServedModel":
        """Batching for a model with a dynamic batch dimension when ``batch_max`` > 1; with ``gpu_decode_on``, the
        GPU decoders of a model that can take their images warmed now, not on the first requests."""
        batcher = None
        if batch_max > 1 and model.batch_dynamic:
            costly = model.runtime.shape_change_is_costly
            if costly and not model.dynamic_hw:  # the one batch shape's first run (cuDNN's search) now, before a
                model.infer(np.zeros(model.input_shape(batch_max, *model.input_hw), model.input_dtype))  # thread
            batcher = Batcher.of_arrays(model.infer, batch_max, batch_wait_ms, on_batch, fixed_batch=costly)
        served = cls(model, batcher, gpu_decode_on)
        if served.decodes_on_gpu:
            gpu_decode.warm(*model.input_hw)
            if batcher is not None:  # GPU-decoded JPEGs batch too, in the one warmed batch shape (CUDA: costly)
                served.jpeg_batcher = Batcher(lambda datas: served.decode_and_infer(datas, batch_max), batch_max,
                                              batch_wait_ms, on_batch, fixed_batch=True)
        return served

    @property
    def decodes_on_gpu(self) -> bool:
        """Whether JPEGs of this model's size are decoded on the GPU: asked for, and this model and host can."""
        return self.gpu_decode_on and self.can_decode_on_gpu

    def __getattr__(self, name):  # the model's contract, meta, palette... (only called for what is not here)
        return getattr(self.model, name)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Labels for one batch; single images go through the batcher when there is one."""
        if self.batcher is not None and batch.shape[0] == 1:
            return self.batcher.submit(batch)
        return self.model.infer(batch)

    def infer_jpeg(self, data: bytes) -> np.ndarray | None:
        """Labels [1,H,W] for a complete JPEG of the model's size, decoded on the GPU (batched with other requests'
        when batching is on); None when nvImageCodec declines it or it decodes to another size (EXIF rotation):
        the caller then decodes it on the CPU."""
        if self.jpeg_batcher is not None:
            return self.jpeg_batcher.submit(data)
        return self.decode_and_infer([data])[0]

    def decode_and_infer(self, datas: list[bytes], rows: int | None = None) -> list:
        """:meth:`infer_jpeg` for several JPEGs: one GPU decode, one model run of ``rows`` (default: as many as
        decoded). The batcher's counts include JPEGs declined here (they are answered None)."""
        images = gpu_decode.decode(datas)
        good = [i for i, image in enumerate(images) if image is not None and gpu_decode.is_rgb8(image, self.input_hw)]
        answers: list = [None] * len(datas)
        if good:
            labels = self.model.infer_on_gpu([images[i] for i in good], rows or len(good))
            for row, i in enumerate(good):
                answers[i] = labels[row:row + 1]
        return answers

    def acquire(self) -> "ServedModel":
        """Mark one request as using this model; pair with :meth:`release`.

        Called on the event loop: it takes its own lock, never the one held during inference."""
        with self._ref_lock:
            self._users += 1
        return self

    def release(self) -> None:
        with self._ref_lock:
            self._users -= 1
            close = self._retired and self._users == 0
        if close:
            self.close()

    def retire(self) -> None:
        """No new requests will come: close now if idle, else when the last request releases it."""
        with self._ref_lock:
            close = self._users == 0 and not self._retired  # once: a second retire closes nothing
            self._retired = True
        if close:
            self.close()

    def describe(self) -> dict:
        return {**self.model.describe(), "batching": self.batcher.stats() if self.batcher is not None else None,
                **({"gpu_decode_batching": self.jpeg_batcher.stats()} if self.jpeg_batcher is not None else {})}

    def close(self) -> None:
        for batcher in (self.batcher, self.jpeg_batcher):
            if batcher is not None:
                batcher.close()
        self.model.close()
