"""The same GPU serving work in a plain process and in a Ray actor: does a Ray worker run it slower, and why?

Each place loads the model as a server's worker does (ONNX Runtime's CUDA provider, nvImageCodec decode,
batching off) and runs ``--threads`` loops of what one request costs (decode and infer on the GPU, then the PNG
encode) for ``--seconds``; it prints images/s, CPU ms per image (the whole process), the stages' means, how the
process's waits for the GPU behave (the CUDA device flags in effect), and what differs between the places:
environment variables, nice value, CPU affinity.

Usage (on the GPU machine, from the repository root)::

    python benchmarks/gpu_waits.py --model DIR/camvid_fp16.onnx --photo photo.jpg \\
        --where local,ray --ort-threads 0,1 --blocking 1 --threads 2

Why: on the H200 one fused Ray replica served 0.79x what one embedded worker did, with the same code, and its
ONNX Runtime run took twice the CPU (docs/ray.md).
"""

import argparse
import itertools
import json
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# What may make the same code run differently in a Ray worker
ENV_SHOWN = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "LD_PRELOAD",
             "LD_LIBRARY_PATH", "MALLOC_ARENA_MAX", "PYTHONMALLOC", "CUDA_MPS_PIPE_DIRECTORY",
             "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "RAY_worker_niceness")


def measure(model_path: str, photo: bytes, seconds: float, threads: int, ort_threads: int, blocking: bool) -> dict:
    """Load the model here and run ``threads`` request loops for ``seconds``: the figures of this process."""
    from app.core.config import Settings
    from app.engines import OrtOptions, load_model
    from app.engines.onnxrt import cuda_wait_mode
    from app.serving.pipeline import render, segment_bytes
    from app.serving.served import ServedModel

    model = load_model(Path(model_path), backend="onnxruntime",
                       ort=OrtOptions(threads=ort_threads, cuda_blocking_sync=blocking))
    served = ServedModel.serve(model, gpu_decode_on=True)
    s = Settings()

    def one() -> dict:
        seg = segment_bytes(served, photo, s.max_pixels, s.max_dynamic_side, s.min_side,
                            gpu_decode=served.decodes_on_gpu)
        render(seg, served, "mask", 0.5, s.png_compression)
        return seg.timings

    for _ in range(20):  # warm: first decodes and runs allocate
        one()
    stop = time.perf_counter() + seconds
    done: list[dict] = []

    def loop():
        while time.perf_counter() < stop:
            done.append(one())

    cpu, wall = time.process_time(), time.perf_counter()
    workers = [threading.Thread(target=loop) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    stages = {k: round(sum(t.get(k, 0) for t in done) / len(done), 2) for k in ("decode", "inference", "encode")}
    result = {"img_s": round(len(done) / wall, 1), "cpu_ms": round(1000 * cpu / len(done), 2), "stages": stages,
            "gpu_decode": served.decodes_on_gpu, "device": model.device, "waits": cuda_wait_mode(),
            "nice": os.nice(0), "cpus": len(os.sched_getaffinity(0)),
            "env": {k: os.environ[k][:60] for k in ENV_SHOWN if k in os.environ}}
    served.retire()
    return result


def in_ray(gpus: float, cpus: float):
    """``measure`` as a Ray task with the resources of a fused replica."""
    import ray

    # max_calls=1: a new worker process each time, since the CUDA flags are set once per process
    task = ray.remote(num_gpus=gpus, num_cpus=cpus, max_calls=1)(measure)
    return lambda *args: ray.get(task.remote(*args))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="an .onnx file at the photo's size, uint8 input")
    ap.add_argument("--photo", required=True, help="a JPEG of the model's size")
    ap.add_argument("--where", default="local,ray", help="local, ray, or both")
    ap.add_argument("--ort-threads", default="0,1", help="ONNX Runtime intra-op threads to try (0: one per core)")
    ap.add_argument("--blocking", default="1", help="SEGMENT_CUDA_BLOCKING_SYNC values to try (0,1)")
    ap.add_argument("--threads", type=int, default=2, help="request loops in each process")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--ray-gpus", type=float, default=0.0625)
    ap.add_argument("--ray-cpus", type=float, default=1.0)
    args = ap.parse_args()
    photo = Path(args.photo).read_bytes()
    places = args.where.split(",")
    if "ray" in places:
        import ray

        ray.init(include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", str(ROOT))}})
    try:
        runs = itertools.product(places, [int(t) for t in args.ort_threads.split(",")],
                                 [b == "1" for b in args.blocking.split(",")])
        print(f"{'where':>6} {'ort':>4} {'block':>5}   img/s  CPU ms/img   decode  infer  encode   waits")
        for where, ort_threads, blocking in runs:
            run = in_ray(args.ray_gpus, args.ray_cpus) if where == "ray" else local_process
            r = run(str(Path(args.model).resolve()), photo, args.seconds, args.threads, ort_threads, blocking)
            st = r["stages"]
            print(f"{where:>6} {ort_threads:>4} {blocking:>5} {r['img_s']:>7} {r['cpu_ms']:>11}   "
                  f"{st['decode']:>6} {st['inference']:>6} {st['encode']:>7}   {r['waits']}  (gpu decode "
                  f"{r['gpu_decode']}, {r['device']}, nice {r['nice']}, {r['cpus']} CPUs)", flush=True)
            print(f"        env: {json.dumps(r['env'])}", flush=True)
    finally:
        if "ray" in places:
            import ray

            ray.shutdown()
    return 0


def local_process(*args) -> dict:
    """``measure`` in a new process (multiprocessing's spawn), as an embedded server's worker is, and for the
    same reason as ``in_ray``'s new worker."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(measure, args)


if __name__ == "__main__":
    sys.exit(main())
