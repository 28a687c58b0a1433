"""Concurrent HTTP clients for the benchmark scripts."""

import http.client
import multiprocessing
import threading
import time
from typing import Callable
from urllib.parse import urlsplit

import httpx


def run_clients(worker: Callable[[], None], clients: int) -> float:
    """Run ``worker`` in ``clients`` threads at once; the wall time in seconds until all have finished."""
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start


def _client_process(url: str, body: bytes, headers: dict, threads: int, start_at: float, stop_at: float,
                    keep_alive: bool, out) -> None:
    """``threads`` clients posting ``body`` from ``start_at`` until ``stop_at``, over one kept-alive connection
    each or a new one per request; (latencies, errors, summed server stage times) of the requests finished in
    that window go to ``out``."""
    host, port = urlsplit(url).hostname, urlsplit(url).port
    lock, latencies, errors, stages, batches = threading.Lock(), [], [], {}, []

    def worker():
        conn = http.client.HTTPConnection(host, port, timeout=120)
        time.sleep(max(0.0, start_at - time.time()))
        while time.time() < stop_at:
            t = time.perf_counter()
            try:
                conn.request("POST", "/segment", body=body, headers=headers)
                response = conn.getresponse()
                response.read()
                status, timing = response.status, response.getheader("Server-Timing", "")
                batch = response.getheader("X-Model-Batch")  # Ray mode: the model replica's batch
                if not keep_alive:
                    conn.close()  # the next request connects again (http.client reopens by itself)
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                conn = http.client.HTTPConnection(host, port, timeout=120)
                status = exc.__class__.__name__
            ms = (time.perf_counter() - t) * 1000
            if time.time() <= stop_at:
                with lock:
                    if status != 200:
                        errors.append(status)
                        continue
                    latencies.append(ms)
                    for part in timing.split(","):  # "decode;dur=61.20, inference;dur=5.10, ..."
                        stage, _, dur = part.strip().partition(";dur=")
                        stages[stage] = stages.get(stage, 0.0) + float(dur)
                    if batch:
                        batches.append(int(batch))
        conn.close()

    run_clients(worker, threads)
    out.put((latencies, errors, stages, batches))


def post_load(url: str, data: bytes, filename: str, content_type: str, clients: int, seconds: float,
              processes: int = 4, keep_alive: bool = True) -> dict:
    """``clients`` concurrent clients uploading ``data`` to ``url``/segment for ``seconds``, spread over
    ``processes`` so that the load generator's own Python does not set the pace. The multipart body is built once
    (by httpx) and re-sent, over kept-alive connections or (``keep_alive=False``) a new connection per request,
    which lets a multi-worker server hand each request to whichever worker accepts first. Returns images/s, p50/p99 ms, count, error codes and the
    mean of each server stage (from the responses' Server-Timing headers, so every worker process counts), and
    in Ray mode the mean batch a request ran in (``batch``, None otherwise)."""
    request = httpx.Request("POST", f"{url}/segment", files={"image": (filename, data, content_type)})
    body, headers = request.read(), {k: v for k, v in request.headers.items() if k.lower() != "host"}
    processes = max(1, min(processes, clients))
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    start_at = time.time() + 1.0 + 0.2 * processes  # after every process has started
    stop_at = start_at + seconds
    procs = [ctx.Process(target=_client_process, args=(url, body, headers, clients // processes
                                                       + (i < clients % processes), start_at, stop_at, keep_alive, out))
             for i in range(processes)]
    for p in procs:
        p.start()
    results = [out.get() for _ in procs]
    for p in procs:
        p.join()
    latencies = sorted(ms for lat, *_ in results for ms in lat)
    errors = [e for _, err, *_ in results for e in err]
    batches = [b for *_, sizes in results for b in sizes]
    if not latencies:  # every request failed (e.g. the server died): say so instead of crashing
        return {"img_s": 0.0, "p50": float("nan"), "p99": float("nan"), "n": 0, "errors": errors, "stages": {},
                "batch": None}
    stages = {}
    for _, _, sums, _ in results:
        for stage, total in sums.items():
            stages[stage] = stages.get(stage, 0.0) + total / len(latencies)
    return {"img_s": len(latencies) / seconds, "p50": latencies[len(latencies) // 2],
            "p99": latencies[max(0, int(len(latencies) * 0.99) - 1)], "n": len(latencies), "errors": errors,
            "stages": stages, "batch": sum(batches) / len(batches) if batches else None}
