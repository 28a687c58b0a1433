"""CPU speed, side by side on one machine and one real image (needs the export extra for (d)).

    python benchmarks/cpu_speed.py [--iterations N] [--sizes 1024x2048,512x1024]

For BiSeNetV2 (random weights, labels output) exported at each size:
  (a) raw ONNX Runtime `InferenceSession.run` on a prepared tensor (ORT defaults)
  (b) our runner (`SegmentationModel.infer`) on the same tensor
  (c) `POST /segment` end to end over HTTP on loopback, 1 client, and 4 concurrent clients
  (d) PyTorch eager, same weights, upstream demo pre- and post-processing, image file to mask file
and (a)-(c) again for the int8 build of the same ONNX (`segment compile x.onnx x_int8.onnx --int8 DIR`,
calibrated here on the sample photo: enough for speed; accuracy is measured on CamVid in engines/*.md).
Prints a table, the ratios against the targets, and the server's resident memory.
"""

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
IMAGE = ROOT / "benchmarks" / "data" / "cityscapes_example.png"

from app.serving.pipeline import input_size, preprocess  # noqa: E402
from app.engines import load_model
from app.engines.host import cpu_name  # noqa: E402
from benchmarks.loadgen import run_clients  # noqa: E402
from tests.server import Server  # noqa: E402


def timed(fn, iterations: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(iterations):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000.0)
    return out


def raw_onnxruntime(path: Path, x: np.ndarray, iterations: int) -> list[float]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return timed(lambda: sess.run(None, {name: x}), iterations)


def http_latency(url: str, data: bytes, iterations: int) -> list[float]:
    with httpx.Client(base_url=url, timeout=120) as http:
        def one():
            r = http.post("/segment", files={"image": ("street.png", data, "image/png")})
            assert r.status_code == 200, r.text
        return timed(one, iterations)


def http_throughput(url: str, data: bytes, clients: int, per_client: int) -> float:
    def worker():
        with httpx.Client(base_url=url, timeout=300) as http:
            for _ in range(per_client):
                assert http.post("/segment", files={"image": ("street.png", data, "image/png")}).status_code == 200

    http_latency(url, data, 1)  # warm
    return clients * per_client / run_clients(worker, clients)


def pytorch_eager(weights: Path, image: Path, out: Path, iterations: int) -> list[float]:
    """Upstream's demo: RGB, to_tensor + normalise, resize to multiples of 32, logits resized back, argmax."""
    import torch
    import torch.nn.functional as F

    from app.bisenet import build_model
    from app.core.datasets import DATASETS

    torch.set_num_threads(max(1, len(__import__("os").sched_getaffinity(0))))
    net = build_model("bisenetv2", 19).eval()
    net.load_state_dict(torch.load(weights, weights_only=True))
    _, palette, mean, std = DATASETS["cityscapes"]
    palette = np.asarray(palette, np.uint8)[:, ::-1]
    mean_t, std_t = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)

    def run():
        im = cv2.imread(str(image))[:, :, ::-1]
        x = (torch.from_numpy(im.copy()).permute(2, 0, 1).unsqueeze(0).float() / 255.0 - mean_t) / std_t
        org = x.shape[2:]
        new = [math.ceil(s / 32) * 32 for s in org]
        with torch.no_grad():
            x = F.interpolate(x, size=new, mode="bilinear", align_corners=False)
            logits = F.interpolate(net(x), size=org, mode="bilinear", align_corners=False)
            pred = logits.argmax(dim=1).squeeze(0).numpy()
        cv2.imwrite(str(out), palette[pred])

    return timed(run, iterations, warmup=1)


def measure(engines: Path, name: str, image: np.ndarray, data: bytes, args) -> tuple:
    """(a), (b), (c) for one model of ``engines``: latencies, 4-client throughput, server memory."""
    path = engines / f"{name}.onnx"
    model = load_model(path)
    x = preprocess(image, model, input_size(model, *image.shape[:2], 4096))
    a = raw_onnxruntime(path, x, args.iterations)
    b = timed(lambda: model.infer(x), args.iterations)
    model.close()
    server = Server(engines, model=name, env=dict(kv.split("=", 1) for kv in args.server_env))
    try:
        idle_kib = server.rss_kib()
        c1 = http_latency(server.url, data, args.iterations)
        c4 = http_throughput(server.url, data, clients=4, per_client=max(4, args.iterations))
        status = Path(f"/proc/{server.proc.pid}/status").read_text().splitlines()
        peak_kib = int(next(line.split()[1] for line in status if line.startswith("VmHWM:")))
    finally:
        server.stop()
    return a, b, c1, c4, idle_kib, peak_kib


def stats(ms: list[float]) -> str:
    return f"{statistics.fmean(ms):8.1f} ms (p50 {statistics.median(ms):7.1f})"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iterations", type=int, default=8)
    p.add_argument("--sizes", default="1024x2048,512x1024")
    p.add_argument("--server-env", action="append", default=[], metavar="SEGMENT_X=V",
                   help="extra settings for the server under test, e.g. SEGMENT_ORT_SPINNING=false")
    args = p.parse_args()
    import torch

    from app.bisenet import build_model
    from app.bisenet.export import export
    from app.builds.compiler import compile_model
    from app.builds.options import BuildOptions

    data = IMAGE.read_bytes()
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    print(f"machine: {cpu_name()}, {len(__import__('os').sched_getaffinity(0))} cores; image {IMAGE.name} "
          f"{image.shape[1]}x{image.shape[0]}; {args.iterations} timed iterations each")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        engines, calib = tmp / "engines", tmp / "calib"
        calib.mkdir()
        (calib / IMAGE.name).write_bytes(data)
        torch.manual_seed(0)
        weights = tmp / "v2.pth"
        torch.save(build_model("bisenetv2", 19).state_dict(), weights)
        for size in args.sizes.split(","):
            h, w = map(int, size.split("x"))
            name = f"v2_{h}x{w}"
            export("bisenetv2", engines / f"{name}.onnx", weights=weights, classes=19, dataset="cityscapes",
                   height=h, width=w)
            compile_model(engines / f"{name}.onnx", engines / f"{name}_int8.onnx",
                          BuildOptions(target="onnxruntime", precision="int8", calib_dir=calib), progress=lambda line: None)
            d = pytorch_eager(weights, IMAGE, tmp / "torch_mask.png", max(3, args.iterations // 2)) \
                if h == image.shape[0] else None
            for precision, model_name in (("fp32", name), ("int8", f"{name}_int8")):
                rows.append((size, precision, *measure(engines, model_name, image, data, args), d))

    print()
    for size, precision, a, b, c1, c4, idle_kib, peak_kib, d in rows:
        ta = 1000.0 / statistics.fmean(a)
        print(f"== BiSeNetV2 exported at {size}, {precision}")
        print(f"(a) raw onnxruntime session.run     {stats(a)}   {ta:6.2f} img/s")
        print(f"(b) our runner                      {stats(b)}   ratio to (a) {statistics.fmean(b) / statistics.fmean(a):.3f}")
        print(f"(c) POST /segment, 1 client         {stats(c1)}   ratio to (a) {statistics.fmean(c1) / statistics.fmean(a):.3f}"
              f"  [target <= 1.10]")
        print(f"(c) POST /segment, 4 clients        {c4:6.2f} img/s             ratio to (a) {c4 / ta:.3f}  [target >= 0.90]")
        if d is not None:
            print(f"(d) PyTorch eager fp32, upstream demo {stats(d)} (d)/(c) {statistics.fmean(d) / statistics.fmean(c1):.2f}x"
                  f"  [target >= 2]")
        print(f"    server memory: {idle_kib / 1024:.0f} MiB resident idle with the model loaded, "
              f"{peak_kib / 1024:.0f} MiB peak under the 4-client load")
    return 0


if __name__ == "__main__":
    sys.exit(main())
