"""Live streams: a one-frame mailbox per connection (the newest frame wins, never a backlog) and the count of
streams open."""

import asyncio
from contextlib import contextmanager

from .pipeline import render, segment_bytes


class LatestFrame:
    """The frame waiting for the model: a newer one replaces it, and the one replaced counts as dropped. Frames are
    numbered in the order they arrive; :meth:`get` returns ``(number, data)``, or None once closed."""

    def __init__(self):
        self._item: tuple[int, bytes] | None = None
        self._ready = asyncio.Event()
        self._closed = False
        self.received = 0
        self.dropped = 0

    def put(self, data: bytes) -> None:
        if self._item is not None:
            self.dropped += 1
        self._item = (self.received, data)
        self.received += 1
        self._ready.set()

    def close(self) -> None:
        self._closed = True
        self._ready.set()

    async def get(self) -> tuple[int, bytes] | None:
        while self._item is None and not self._closed:
            self._ready.clear()
            await self._ready.wait()
        item, self._item = self._item, None
        return item


class LiveStreams:
    """How many live streams are open, against the limit."""

    def __init__(self, limit: int):
        self.limit, self.open = limit, 0

    @contextmanager
    def admit(self):
        """Yields False when ``limit`` streams are already open (only the event loop touches the count)."""
        if self.open >= self.limit:
            yield False
            return
        self.open += 1
        try:
            yield True
        finally:
            self.open -= 1


def segment_frame(state, model_name: str | None, data: bytes, view: str, alpha: float) -> tuple[bytes, dict]:
    """One encoded frame (JPEG, PNG, ...) to the PNG of a view through the image pipeline, with the model
    ``model_name`` (None: the default) held for this frame only; and its timings."""
    s = state.settings
    with state.use_model(model_name) as model:
        seg = segment_bytes(model, data, s.max_pixels, s.max_dynamic_side, s.min_side)
        png = render(seg, model, view, alpha, s.png_compression)
    return png, seg.timings
