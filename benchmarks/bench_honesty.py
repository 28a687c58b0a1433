"""Is `segment test` honest? Time the same runner loop independently and compare the means (within 10%).

    python benchmarks/bench_honesty.py [MODEL] [--iterations N]

The independent loop calls the Polygraphy runner directly (no project code between the timer and
``runner.infer``) on the same prepared input; `segment test` runs as a separate process, as a user runs it.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.serving.pipeline import input_size, preprocess  # noqa: E402
from app.core.resources import bundled_models  # noqa: E402
from app.engines import load_model  # noqa: E402


def independent_mean_ms(model_path: Path, image: Path, iterations: int, warmup: int) -> float:
    model = load_model(model_path)
    try:
        img = cv2.imread(str(image), cv2.IMREAD_COLOR)
        x = preprocess(img, model, input_size(model, *img.shape[:2], 2048))
        feed = {model.input_name: x}
        for _ in range(warmup):
            model.runner.infer(feed, check_inputs=False)
        times = []
        for _ in range(iterations):
            t = time.perf_counter()
            model.runner.infer(feed, check_inputs=False)
            times.append((time.perf_counter() - t) * 1000.0)
        return statistics.fmean(times)
    finally:
        model.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", type=Path, default=bundled_models() / "camvid_bisenetv2.onnx")
    p.add_argument("--image", type=Path, default=ROOT / "benchmarks" / "data" / "cityscapes_example.png")
    p.add_argument("--iterations", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        report_path = Path(tmp) / "report.json"
        subprocess.run([sys.executable, "-m", "app.cli", "test", str(args.model), "--image", str(args.image),
                        "--iterations", str(args.iterations), "--warmup", str(args.warmup), "--json",
                        str(report_path)], cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        report = json.loads(report_path.read_text())
    ours = report["latency_ms"]["mean"]
    independent = independent_mean_ms(args.model, args.image, args.iterations, args.warmup)
    ratio = ours / independent
    print(f"model            {args.model.name} ({report['backend']} on {report['device']}), input {report['input_shape']}")
    print(f"segment test     mean {ours:8.2f} ms  ({report['iterations']} iterations)")
    print(f"independent loop mean {independent:8.2f} ms  ({args.iterations} iterations, runner.infer only)")
    print(f"ratio            {ratio:.3f}  ({'within' if abs(ratio - 1) <= 0.10 else 'OUTSIDE'} 10%)")
    return 0 if abs(ratio - 1) <= 0.10 else 1


if __name__ == "__main__":
    sys.exit(main())
