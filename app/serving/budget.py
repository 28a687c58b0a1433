"""A budget of decoded pixels shared by every request in flight: memory bounded across requests, not only per image.

A request reserves its image's width x height from the header, before decoding, and gives it back after its
response; when the reservation would pass the budget the request is refused (503 + Retry-After) instead of decoded.
"""

import threading

from ..core.errors import Overloaded


class PixelBudget:
    """``limit`` pixels, reserved and released from any thread."""

    def __init__(self, limit: int):
        self.limit, self.in_use = limit, 0
        self._lock = threading.Lock()

    def reserve(self, pixels: int) -> None:
        """Take ``pixels``, or raise :class:`Overloaded` when the budget cannot hold them now."""
        with self._lock:
            if self.in_use + pixels > self.limit:
                raise Overloaded(f"the server is decoding {self.in_use:,} pixels for other requests and this image "
                                 f"has {pixels:,} (budget {self.limit:,}); retry shortly")
            self.in_use += pixels

    def release(self, pixels: int) -> None:
        with self._lock:
            self.in_use -= pixels


class Reservation:
    """One request's share of a :class:`PixelBudget`, given back by :meth:`release` (once, whatever it took)."""

    def __init__(self, budget: PixelBudget):
        self.budget, self.pixels = budget, 0

    def take(self, pixels: int) -> None:
        self.budget.reserve(pixels)
        self.pixels += pixels

    def release(self) -> None:
        pixels, self.pixels = self.pixels, 0
        if pixels:
            self.budget.release(pixels)
