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

    def __init__(self, model: SegmentationModel, batcher: Batcher | None = None):
        self.model, self.batcher = model, batcher
        # JPEGs can go from nvImageCodec straight into this model (used only with SEGMENT_GPU_DECODE on)
        self.decodes_on_gpu = model.accepts_gpu_images and gpu_decode.available()
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
            batcher = Batcher(model.infer, batch_max, batch_wait_ms, on_batch, fixed_batch=costly)
        served = cls(model, batcher)
        if gpu_decode_on and served.decodes_on_gpu:
            gpu_decode.warm(*model.input_hw)
        return served

    def __getattr__(self, name):  # the model's contract, meta, palette... (only called for what is not here)
        return getattr(self.model, name)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Labels for one batch; single images go through the batcher when there is one."""
        if self.batcher is not None and batch.shape[0] == 1:
            return self.batcher.submit(batch)
        return self.model.infer(batch)

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
        return {**self.model.describe(), "batching": self.batcher.stats() if self.batcher is not None else None}

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()
        self.model.close()
