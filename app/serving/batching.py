"""Dynamic batching: concurrent single-image calls gathered into one runner call.

Requests wait at most ``max_wait_ms`` for company, up to ``max_batch`` images; items of one kind run together
(tensors of one shape: a dynamic-H/W model may see several) and each caller gets back its own answer. Items are
tensors (:meth:`Batcher.of_arrays`: stacked into one runner call) or anything a batch step takes as a list
(JPEG bytes decoded on the GPU as one batch).
"""

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable

import numpy as np

log = logging.getLogger("segment.batching")


@dataclass(frozen=True)
class BatchRun:
    """The runner call an image was part of: when it started (``perf_counter_ns``) and how many images it held."""

    started_ns: int
    size: int


_last = threading.local()


def last_batch() -> BatchRun | None:
    """The batch of this thread's last :meth:`Batcher.submit` (once; None when it did not go through a batcher)."""
    run = getattr(_last, "run", None)
    _last.run = None
    return run


def batch_size(run: BatchRun | None) -> int:
    """The images in the runner call an image ran in: its batch's, or 1 where no batcher ran it."""
    return run.size if run is not None else 1


def infer_with_batch(infer: Callable[[np.ndarray], np.ndarray], x: np.ndarray) -> tuple[np.ndarray, BatchRun | None]:
    """``infer(x)`` and the batch it ran in (None when no batcher ran it)."""
    last_batch()  # forget one this thread ran earlier, for another caller
    out = infer(x)
    return out, last_batch()


class Batcher:
    """A worker thread that owns the runner calls; ``submit`` blocks the calling thread until its result.

    ``run`` takes a list of items of one kind (``kind(item)`` equal) and returns one answer per item, in order."""

    def __init__(self, run: Callable[[list], list], max_batch: int, max_wait_ms: float,
                 on_batch: Callable[[int], None] | None = None, kind: Callable[[object], object] = lambda _: None,
                 fixed_batch: bool = False):
        self.run, self.kind, self.max_batch, self.max_wait = run, kind, max_batch, max_wait_ms / 1000.0
        self.on_batch = on_batch
        self.fixed_batch = fixed_batch  # every run has max_batch rows (said by stats; run does the padding)
        self.batches = self.images = self.largest = 0
        self._queue: queue.Queue = queue.Queue()
        self._closed, self._close_lock = False, threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="batcher", daemon=True)
        self._thread.start()

    @classmethod
    def of_arrays(cls, infer: Callable[[np.ndarray], np.ndarray], max_batch: int, max_wait_ms: float,
                  on_batch: Callable[[int], None] | None = None, fixed_batch: bool = False) -> "Batcher":
        """Batch-1 tensors stacked into one ``infer`` call per shape; each caller gets its row (batch 1). With
        ``fixed_batch`` every call has ``max_batch`` rows (see :func:`pad_batch`)."""

        def run(xs: list) -> list:
            x = np.concatenate(xs) if len(xs) > 1 else xs[0]
            if fixed_batch:
                # ONNX Runtime's CUDA provider spends seconds whenever the input shape changes, even back to one
                # it has run (H100, onnxruntime-gpu 1.31, cuDNN 9.14: 2.1-2.8 s with its defaults, 3.9-12 s with
                # NHWC and fused bias, heuristic algorithm search included), so on CUDA every call has the one
                # shape warmed at start-up: max_batch rows, the missing ones repeating the last image.
                x = pad_batch(x, max_batch)
            out = infer(x)
            return [out[i:i + 1] for i in range(len(xs))]

        return cls(run, max_batch, max_wait_ms, on_batch, kind=lambda x: x.shape, fixed_batch=fixed_batch)

    def submit(self, x):
        """Run ``x`` as part of the next batch; returns its own answer. RuntimeError once closed (a late caller
        fails instead of waiting for a thread that is gone)."""
        future: Future = Future()
        with self._close_lock:
            if self._closed:
                raise RuntimeError("the model was closed")
            self._queue.put((x, future))
        out = future.result()
        _last.run = future.batch_run
        return out

    def stats(self) -> dict:
        return {"max_batch": self.max_batch, "max_wait_ms": self.max_wait * 1000.0, "fixed_batch": self.fixed_batch,
                "batches": self.batches,
                "images": self.images, "largest_batch": self.largest,
                "mean_batch": self.images / self.batches if self.batches else 0.0}

    def close(self) -> None:
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)  # after everything already submitted: those still run
        self._thread.join(timeout=10)

    def _gather(self, first) -> tuple[list, bool]:
        items, deadline = [first], time.monotonic() + self.max_wait
        while len(items) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:  # past the wait, what already queued (while the last batch ran) still joins
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                return items, True
            items.append(item)
        return items, False

    def _loop(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                break
            items, stop = self._gather(first)
            by_kind: dict = {}
            for x, fut in items:
                by_kind.setdefault(self.kind(x), []).append((x, fut))
            for group in by_kind.values():
                self._run(group)
        while not self._queue.empty():  # closing: nobody is left waiting forever
            item = self._queue.get_nowait()
            if item is not None:
                item[1].set_exception(RuntimeError("the model was closed"))

    def _run(self, group: list) -> None:
        try:
            start_ns = time.perf_counter_ns()
            outs = self.run([x for x, _ in group])
            if len(outs) != len(group):  # a caller left without an answer would wait forever
                raise RuntimeError(f"the batch step answered {len(outs)} of {len(group)} items")
        except Exception as exc:  # every caller of the batch learns of the failure; the thread goes on
            for _, fut in group:
                fut.set_exception(exc)
            return
        log.debug("batch of %d: %.1f ms", len(group), (time.perf_counter_ns() - start_ns) / 1e6)
        self.batches += 1
        self.images += len(group)
        self.largest = max(self.largest, len(group))
        if self.on_batch:
            try:
                self.on_batch(len(group))
            except Exception:  # a metric's failure must not cost the answers
                log.exception("on_batch failed")
        run = BatchRun(start_ns, len(group))
        for (_, fut), out in zip(group, outs):
            fut.batch_run = run
            fut.set_result(out)


def pad_batch(x: np.ndarray, size: int) -> np.ndarray:
    """``x`` grown to ``size`` rows by repeating its last one: the one batch shape warmed on ONNX Runtime CUDA."""
    return x if x.shape[0] >= size else np.concatenate([x, np.repeat(x[-1:], size - x.shape[0], axis=0)])
