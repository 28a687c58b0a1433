"""GPU serving through ONNX Runtime's CUDA provider, measured on one NVIDIA GPU (the lent H100).

    python benchmarks/gpu_serving.py --models DIR [--kinds camvid,camvid_fp16] [--uploads png,jpeg]
                                     [--configs 1:8,4:8] [--clients 1,32] [--seconds 10] [--cuda-options JSON]

DIR holds BiSeNetV2 ONNX files exported at 1024x2048 with labels output and a dynamic batch, one per kind
(`KIND.onnx` and its metadata; e.g. `segment export ... --input uint8 --out DIR/camvid.onnx`). A kind ending in
`_fp16` is built from the one before the suffix with `segment compile X.onnx X_fp16.onnx --fp16` when
missing. For each kind: the engine-only loop at batch 1 and 8 (NumPy in and labels out, with the CPU time
one call costs; and GPU-only, inputs and outputs bound on the device), then the service on loopback for each BATCH_MAX:WORKERS setup, with 1..N clients uploading the real
2048x1024 sample as PNG (the file itself) and as JPEG (the same photo at quality 95). Prints throughput,
p50/p99, the server's stage means (from every response's Server-Timing), and how busy the CPUs and the GPU were.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
IMAGE = ROOT / "benchmarks" / "data" / "cityscapes_example.png"

from app.core.config import Settings  # noqa: E402
from benchmarks.loadgen import post_load  # noqa: E402
from tests.server import Server  # noqa: E402


def engine_only(path: Path, batch: int, cuda_options: dict, n: int = 30) -> dict:
    import onnxruntime as ort

    ort.preload_dlls()
    sess = ort.InferenceSession(str(path), providers=[("CUDAExecutionProvider", cuda_options), "CPUExecutionProvider"])
    assert sess.get_providers()[0] == "CUDAExecutionProvider", sess.get_providers()
    name = sess.get_inputs()[0].name
    rng = np.random.default_rng(0)
    x = (rng.integers(0, 255, (batch, 1024, 2048, 3), np.uint8) if sess.get_inputs()[0].type == "tensor(uint8)"
         else rng.standard_normal((batch, 3, 1024, 2048), np.float32))
    for _ in range(5):
        sess.run(None, {name: x})
    host, cpu = [], time.process_time()
    for _ in range(n):
        t = time.perf_counter()
        sess.run(None, {name: x})
        host.append((time.perf_counter() - t) * 1000)
    cpu_ms = (time.process_time() - cpu) * 1000 / n  # near the wall time: the host thread spins while the GPU works
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
    return {"host_p50": statistics.median(host), "gpu_p50": statistics.median(dev), "cpu_ms": cpu_ms,
            "host_img_s": batch * 1000 / statistics.median(host), "gpu_img_s": batch * 1000 / statistics.median(dev)}


class Busy:
    """How busy the CPUs (from /proc/stat) and the GPU (nvidia-smi, sampled) were between start and stop."""

    def __enter__(self):
        self.cpu0, self.gpu, self.done = self._cpu(), [], threading.Event()
        self.t0, self.children0 = time.perf_counter(), self._children()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        (busy1, total1), (busy0, total0) = self._cpu(), self.cpu0
        self.cpu_pct = 100.0 * (busy1 - busy0) / max(1, total1 - total0)
        # The load generator's processes have ended and been joined by now; the server's are still running.
        self.loadgen_cores = (self._children() - self.children0) / (time.perf_counter() - self.t0)
        self.gpu_pct = statistics.mean(self.gpu) if self.gpu else float("nan")

    @staticmethod
    def _children() -> float:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime

    @staticmethod
    def _cpu() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + fields[4]
        return sum(fields) - idle, sum(fields)

    def _sample(self):
        while not self.done.wait(0.5):
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=5).stdout
                self.gpu.append(float(out.split()[0]))
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                return


def uploads(kinds: str) -> dict:
    """The sample as uploaded: the PNG file itself, and the same photo as a quality-95 JPEG."""
    png = IMAGE.read_bytes()
    out = {"png": (png, "street.png", "image/png")}
    jpeg = cv2.imencode(".jpg", cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR),
                        [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
    out["jpeg"] = (jpeg, "street.jpg", "image/jpeg")
    return {k: out[k] for k in kinds.split(",")}


def ensure_model(models: Path, kind: str) -> Path:
    """``models/kind.onnx``; an ``_fp16`` kind is compiled from its fp32 source when missing."""
    path = models / f"{kind}.onnx"
    if not path.exists() and kind.endswith("_fp16"):
        from app.builds.compiler import compile_model
        from app.builds.options import BuildOptions

        compile_model(models / f"{kind[:-5]}.onnx", path, BuildOptions(target="onnxruntime", precision="fp16"),
                      progress=lambda line: print(f"   compile: {line}", flush=True))
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=Path, required=True)
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--clients", default="1,32")
    p.add_argument("--kinds", default="camvid,camvid_fp16")
    p.add_argument("--uploads", default="png,jpeg")
    p.add_argument("--configs", default="1:8,4:8", help="server setups as BATCH_MAX:WORKERS")
    p.add_argument("--load-processes", type=int, default=4, help="processes the load generator spreads over")
    p.add_argument("--connections", default="keep-alive", help="keep-alive, close (a new one per request), or both")
    p.add_argument("--cuda-options", default=json.dumps(Settings().ort_cuda_options),
                   help="CUDA provider options, JSON (SEGMENT_ORT_CUDA_OPTIONS; default: the service's)")
    p.add_argument("--no-engine", action="store_true", help="skip the engine-only loop")
    args = p.parse_args()
    samples = uploads(args.uploads)
    import onnxruntime
    import PIL

    print(f"onnxruntime {onnxruntime.__version__}, OpenCV {cv2.__version__}, Pillow {PIL.__version__}, "
          f"NumPy {np.__version__}; {os.cpu_count()} CPUs; CUDA provider options {args.cuda_options}; uploads: " + ", ".join(f"{k} {len(v[0]) / 1e6:.2f} MB" for k, v in samples.items()),
          flush=True)
    for kind in args.kinds.split(","):
        path = ensure_model(args.models, kind)
        for batch in (() if args.no_engine else (1, 8)):
            r = engine_only(path, batch, json.loads(args.cuda_options))
            print(f"engine {kind:10} batch {batch}: numpy in/labels out p50 {r['host_p50']:7.2f} ms "
                  f"({r['host_img_s']:6.1f} img/s, CPU {r['cpu_ms']:6.2f} ms a call); "
                  f"GPU-only p50 {r['gpu_p50']:7.2f} ms ({r['gpu_img_s']:6.1f} img/s)", flush=True)
        for batching, workers in (tuple(int(v) for v in c.split(":")) for c in args.configs.split(",")):
            env = {"SEGMENT_BATCH_MAX": str(batching), "SEGMENT_BATCH_WAIT_MS": "3", "SEGMENT_MAX_INFLIGHT": "256",
                   "SEGMENT_LOG_LEVEL": "warning", "SEGMENT_WORKERS": str(workers),
                   "SEGMENT_ORT_CUDA_OPTIONS": args.cuda_options}
            server = Server(args.models, model=kind, env=env)
            try:
                info = httpx.get(f"{server.url}/models/active").json()
                assert info["device"] == "cuda", info["device"]
                for upload, (data, filename, content_type) in samples.items():
                    for clients, connection in ((int(c), k) for c in args.clients.split(",")
                                                for k in args.connections.split(",")):
                        with Busy() as busy:
                            r = post_load(server.url, data, filename, content_type, clients, args.seconds,
                                          args.load_processes, keep_alive=connection == "keep-alive")
                        print(f"service {kind:10} {upload:4} {workers:2} proc batching "
                              f"{'on ' + str(batching) if batching > 1 else 'off  '} {clients:3} clients "
                              f"({connection}): "
                              f"{r['img_s']:6.1f} img/s  p50 {r['p50']:7.1f} ms  p99 {r['p99']:7.1f} ms  "
                              f"CPU {busy.cpu_pct:3.0f}% (load generator {busy.loadgen_cores:.1f} cores)  "
                              f"GPU {busy.gpu_pct:3.0f}%  ({r['n']} ok, "
                              f"{len(r['errors'])} errors{' ' + str(sorted(set(map(str, r['errors'])))) if r['errors'] else ''})"
                              "\n   stage means ms: " + ", ".join(f"{k} {v:.1f}" for k, v in r["stages"].items()),
                              flush=True)
                stats = httpx.get(f"{server.url}/models/active").json()["batching"]
                if stats:
                    print(f"   batching (one worker): {stats}", flush=True)
            finally:
                server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
