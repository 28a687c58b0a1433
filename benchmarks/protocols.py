"""The same photo through each protocol, one client at a time, on loopback (the bundled CamVid BiSeNetV2 on ONNX
Runtime, or SEGMENT_MODEL):

    python benchmarks/protocols.py [--iterations N] [--image PATH]

  (a) POST /segment, labels view (a PNG of class ids back)
  (b) POST /v2/models/NAME/infer with Triton's client, binary tensor data both ways (encoded image in, uint8 out)
  (c) the same call in the JSON tensor encoding (base64 image in, a list of numbers out)
  (d) POST /v2 with decoded RGB `pixels` (binary)
  (e) (a) again with SEGMENT_TRACING=true (spans to OTEL_TRACES_EXPORTER=none): the cost of tracing on
Prints the median and p90 milliseconds per request.
"""

import argparse
import base64
import os
import statistics
import sys
import tempfile
from pathlib import Path

import cv2
import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.core.resources import sample_image  # noqa: E402
from benchmarks.cpu_speed import timed  # noqa: E402
from tests.server import Server  # noqa: E402


def row(name: str, times: list[float]) -> None:
    p90 = sorted(times)[int(0.9 * (len(times) - 1))]
    print(f"{name:<44} {statistics.median(times):9.1f} {p90:8.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--image", type=Path, default=sample_image())
    args = parser.parse_args()
    import tritonclient.http as httpclient

    data = args.image.read_bytes()
    rgb = cv2.cvtColor(cv2.imread(str(args.image)), cv2.COLOR_BGR2RGB)
    model = os.environ.get("SEGMENT_MODEL", "camvid_bisenetv2")
    engines = Path(tempfile.mkdtemp()) / "engines"  # seeded with the bundled models at start-up
    print(f"{model}, {rgb.shape[1]}x{rgb.shape[0]} photo ({len(data):,} bytes), {args.iterations} requests each, "
          f"1 client, {os.cpu_count()} CPUs")
    print(f"{'':<44} {'median ms':>9} {'p90 ms':>8}")
    for tracing in ("false", "true"):
        server = Server(engines, model, env={"SEGMENT_TRACING": tracing, "OTEL_TRACES_EXPORTER": "none"})
        try:
            http = httpx.Client(base_url=server.url, timeout=120)

            def segment() -> None:
                http.post("/segment", params={"view": "labels"}, files={"image": ("p", data)}).raise_for_status()

            if tracing == "true":
                row("(e) POST /segment, tracing on", timed(segment, args.iterations))
                continue
            row("(a) POST /segment, labels PNG", timed(segment, args.iterations))
            triton = httpclient.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=120)

            def v2(binary: bool, pixels: bool = False):
                def call() -> None:
                    tensor = httpclient.InferInput("pixels" if pixels else "image",
                                                   list(rgb.shape) if pixels else [1], "UINT8" if pixels else "BYTES")
                    if pixels:
                        tensor.set_data_from_numpy(rgb, binary_data=binary)
                    elif binary:
                        tensor.set_data_from_numpy(np.array([data], dtype=object))
                    else:
                        tensor.set_data_from_numpy(np.array([base64.b64encode(data)], dtype=object),
                                                   binary_data=False)
                    out = httpclient.InferRequestedOutput("labels", binary_data=binary)
                    result = triton.infer(model, [tensor], outputs=[out])
                    assert result.as_numpy("labels").shape[1:] == rgb.shape[:2]
                return call

            row("(b) /v2 infer, tritonclient, binary", timed(v2(True), args.iterations))
            row("(c) /v2 infer, tritonclient, JSON", timed(v2(False), args.iterations))
            row("(d) /v2 infer, RGB pixels, binary", timed(v2(True, pixels=True), args.iterations))
        finally:
            server.stop()


if __name__ == "__main__":
    main()
