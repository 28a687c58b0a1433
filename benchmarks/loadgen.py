"""Concurrent HTTP clients for the benchmark scripts."""

import threading
import time
from typing import Callable


def run_clients(worker: Callable[[], None], clients: int) -> float:
    """Run ``worker`` in ``clients`` threads at once; the wall time in seconds until all have finished."""
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start
