"""How long after `POST /models/{name}/default` every worker of `segment serve --workers N` serves the new default.

Two small models of known answers are loaded in every worker; the default is switched back and forth. After each
switch, client threads send requests without a model (new connection each, so the kernel spreads them over the
workers) and note, per worker pid (`X-Worker`), when it first answered with the new default (`X-Model`). The switch
time is from sending the POST to the last worker's first such answer: an upper bound (a worker may have switched a
little before the request that showed it). Also prints the time of a switch to a model not loaded yet (each worker
loads it first), and the store's reconcile lag from /metrics.

    python benchmarks/switch_time.py --workers 3 --rounds 20
"""

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.models import argmin_model, png_bytes, quadrants, rgb_model  # noqa: E402
from tests.server import TOKEN, Server  # noqa: E402

ADMIN = {"Authorization": f"Bearer {TOKEN}"}
PHOTO = png_bytes(quadrants(64, 64)[0])


def probe_until_all(url: str, target: str, workers: set[int], start: float, clients: int = 6,
                    timeout: float = 30) -> dict[int, float]:
    """{pid: seconds from ``start`` to its first answer naming ``target``} for every pid in ``workers``."""
    first: dict[int, float] = {}
    done = threading.Event()
    lock = threading.Lock()

    def client():
        while not done.is_set() and time.perf_counter() - start < timeout:
            r = httpx.post(f"{url}/segment", params={"view": "labels"}, timeout=30,
                           files={"image": ("p.png", PHOTO, "image/png")})
            if r.headers.get("x-model") == target:
                with lock:
                    first.setdefault(int(r.headers["x-worker"]), time.perf_counter() - start)
                    if workers <= set(first):
                        done.set()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return first


def until_reported(url: str, name: str, n: int, start: float, timeout: float = 30) -> float:
    """Seconds from ``start`` until all ``n`` live workers report (GET /models, from the store) that they serve
    ``name`` by default, at the store's generation or later."""
    generation = None
    while time.perf_counter() - start < timeout:
        body = httpx.get(f"{url}/models", timeout=10).json()
        generation = generation or body["generation"]
        workers = body["workers"].values()
        if len(workers) >= n and all(w["default"] == name and w["generation"] >= generation for w in workers):
            return time.perf_counter() - start
        time.sleep(0.005)
    raise RuntimeError(f"the workers did not all report {name} within {timeout} s")


def worker_pids(url: str, n: int) -> set[int]:
    pids: set[int] = set()
    while len(pids) < n:
        pids.add(int(httpx.get(f"{url}/healthz", timeout=10).headers["x-worker"]))
    return pids


def summary(name: str, values: list[float]) -> None:
    ms = sorted(v * 1000 for v in values)
    print(f"{name}: n={len(ms)} median {statistics.median(ms):.0f} ms, p90 {ms[int(0.9 * (len(ms) - 1))]:.0f} ms, "
          f"max {ms[-1]:.0f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--interval-ms", type=float, default=100.0, help="SEGMENT_RECONCILE_INTERVAL_MS")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        engines = Path(tmp) / "engines"
        rgb_model(engines / "rgb.onnx", height="H", width="W")
        argmin_model(engines / "weakest.onnx")
        for i in range(args.rounds):
            rgb_model(engines / f"cold{i}.onnx", height="H", width="W")
        server = Server(engines, model="rgb", workers=args.workers,
                        env={"SEGMENT_RECONCILE_INTERVAL_MS": str(args.interval_ms)})
        try:
            pids = worker_pids(server.url, args.workers)
            for name in ("rgb", "weakest"):  # both wanted loaded: switching between them loads nothing
                assert httpx.post(f"{server.url}/models/{name}/load", headers=ADMIN, timeout=60).status_code == 200

            def switch(name: str, reported: list) -> float | None:
                nonlocal pids
                time.sleep(0.3)  # let the previous switch settle everywhere
                start = time.perf_counter()
                r = httpx.post(f"{server.url}/models/{name}/default", headers=ADMIN, timeout=60)
                assert r.status_code == 200, r.text
                posts.append(time.perf_counter() - start)
                reported.append(until_reported(server.url, name, len(pids), start))
                first = probe_until_all(server.url, name, pids, start)
                if set(first) < pids:  # not expected: say so, keep going
                    print(f"workers {sorted(pids - set(first))} did not answer with {name} within 30 s")
                    pids = worker_pids(server.url, args.workers)
                    return None
                return max(first.values())

            warm, cold, warm_reported, cold_reported, posts = [], [], [], [], []
            for i in range(args.rounds):
                warm.append(switch("weakest" if i % 2 == 0 else "rgb", warm_reported))
                cold.append(switch(f"cold{i}", cold_reported))
            warm, cold = [t for t in warm if t is not None], [t for t in cold if t is not None]
            print(f"segment serve --workers {args.workers}, reconcile every {args.interval_ms:.0f} ms, "
                  f"{len(pids)} worker pids")
            summary("loaded model, as the workers report it (POST .../default until every worker's report in the "
                    "store names it)", warm_reported)
            summary("loaded model, as clients see it (until a request answered by each worker named it)", warm)
            summary("model not loaded yet, as the workers report it (each loads it first)", cold_reported)
            summary("model not loaded yet, as clients see it", cold)
            summary("the POST itself (its worker switches before answering)", posts)
            metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
            lags = [line for line in metrics.splitlines() if line.startswith("segment_reconcile_lag_seconds_")
                    and ("_sum" in line or "_count" in line)]
            print("reconcile lag from /metrics:", "; ".join(lags))
        finally:
            server.stop()


if __name__ == "__main__":
    main()
