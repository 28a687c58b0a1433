"""GPU serving through ONNX Runtime's CUDA provider, measured on one NVIDIA GPU (the lent H100).

    python benchmarks/gpu_serving.py --models DIR [--seconds 12] [--clients 1,8,32]

DIR holds BiSeNetV2 ONNX files exported at 1024x2048 (`float.onnx`: float input; `uint8.onnx`: raw pixels),
labels output, dynamic batch. For each: the engine-only loop (NumPy in and labels out; and GPU-only, inputs
and outputs bound on the device), then the service on loopback with 1, 8 and 32 clients sending the real
2048x1024 sample, dynamic batching off and on. Prints throughput, p50/p99 and the server's stage means.
"""

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
IMAGE = ROOT / "benchmarks" / "data" / "cityscapes_example.png"

from benchmarks.loadgen import run_clients  # noqa: E402
from tests.conftest import Server  # noqa: E402


def engine_only(path: Path, uint8: bool, batch: int, n: int = 30) -> dict:
    import onnxruntime as ort

    ort.preload_dlls()
    sess = ort.InferenceSession(str(path), providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert sess.get_providers()[0] == "CUDAExecutionProvider", sess.get_providers()
    name = sess.get_inputs()[0].name
    rng = np.random.default_rng(0)
    x = (rng.integers(0, 255, (batch, 1024, 2048, 3), np.uint8) if uint8
         else rng.standard_normal((batch, 3, 1024, 2048), np.float32))
    for _ in range(5):
        sess.run(None, {name: x})
    host = []
    for _ in range(n):
        t = time.perf_counter()
        sess.run(None, {name: x})
        host.append((time.perf_counter() - t) * 1000)
    # GPU-only: input already on the device, output left there.
    binding = sess.io_binding()
    binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0))
    binding.bind_output(sess.get_outputs()[0].name, "cuda")
    for _ in range(5):
        sess.run_with_iobinding(binding)
    dev = []
    for _ in range(n):
        t = time.perf_counter()
        sess.run_with_iobinding(binding)
        binding.synchronize_outputs()
        dev.append((time.perf_counter() - t) * 1000)
    return {"host_p50": statistics.median(host), "gpu_p50": statistics.median(dev),
            "host_img_s": batch * 1000 / statistics.median(host), "gpu_img_s": batch * 1000 / statistics.median(dev)}


def load(url: str, data: bytes, clients: int, seconds: float) -> dict:
    lat, lock, stop = [], threading.Lock(), time.time() + seconds
    errors = []

    def worker():
        with httpx.Client(base_url=url, timeout=60) as http:
            while time.time() < stop:
                t = time.perf_counter()
                r = http.post("/segment", files={"image": ("s.png", data, "image/png")})
                ms = (time.perf_counter() - t) * 1000
                with lock:
                    if r.status_code == 200:
                        lat.append(ms)
                    else:
                        errors.append(r.status_code)

    wall = run_clients(worker, clients)
    lat.sort()
    if not lat:  # every request failed (e.g. the server died): say so instead of crashing
        return {"img_s": 0.0, "p50": float("nan"), "p99": float("nan"), "n": 0, "errors": len(errors)}
    return {"img_s": len(lat) / wall, "p50": lat[len(lat) // 2], "p99": lat[max(0, int(len(lat) * 0.99) - 1)],
            "n": len(lat), "errors": len(errors)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=Path, required=True)
    p.add_argument("--seconds", type=float, default=12)
    p.add_argument("--clients", default="1,8,32")
    p.add_argument("--kinds", default="float,uint8")
    p.add_argument("--configs", default="1:1,8:1,1:8,8:4", help="server setups as BATCH_MAX:WORKERS")
    p.add_argument("--no-engine", action="store_true", help="skip the engine-only loop")
    args = p.parse_args()
    data = IMAGE.read_bytes()
    for kind in args.kinds.split(","):
        path = args.models / f"{kind}.onnx"
        for batch in (() if args.no_engine else (1, 8)):
            r = engine_only(path, kind == "uint8", batch)
            print(f"engine {kind:5} batch {batch}: numpy in/labels out p50 {r['host_p50']:7.2f} ms "
                  f"({r['host_img_s']:7.1f} img/s); GPU-only p50 {r['gpu_p50']:7.2f} ms ({r['gpu_img_s']:7.1f} img/s)",
                  flush=True)
        for batching, workers in (tuple(int(v) for v in c.split(":")) for c in args.configs.split(",")):
            env = {"SEGMENT_BATCH_MAX": str(batching), "SEGMENT_BATCH_WAIT_MS": "3", "SEGMENT_MAX_INFLIGHT": "256",
                   "SEGMENT_LOG_LEVEL": "warning", "SEGMENT_WORKERS": str(workers)}
            server = Server(args.models, model=kind, env=env)
            try:
                info = httpx.get(f"{server.url}/models/active").json()
                assert info["device"] == "cuda", info["device"]
                for clients in (int(c) for c in args.clients.split(",")):
                    r = load(server.url, data, clients, args.seconds)
                    print(f"service {kind:5} {workers} proc batching {'on ' if batching > 1 else 'off'} {clients:3} clients: "
                          f"{r['img_s']:7.1f} img/s  p50 {r['p50']:7.1f} ms  p99 {r['p99']:7.1f} ms  "
                          f"({r['n']} ok, {r['errors']} errors)", flush=True)
                stats = httpx.get(f"{server.url}/models/active").json()["batching"]  # one worker's
                metrics = httpx.get(f"{server.url}/metrics").text
            finally:
                server.stop()
            stages = {}
            for line in metrics.splitlines():
                if line.startswith("segment_stage_duration_ms_sum") or line.startswith("segment_stage_duration_ms_count"):
                    key, value = line.rsplit(" ", 1)
                    stage = key.split('stage="')[1].split('"')[0]
                    stages.setdefault(stage, {})["sum" if "_sum" in key else "count"] = float(value)
            print(f"   stage means ms: " + ", ".join(f"{k} {v['sum'] / v['count']:.1f}" for k, v in stages.items()
                                                     if v.get("count")) + (f"; batching {stats}" if stats else ""),
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
