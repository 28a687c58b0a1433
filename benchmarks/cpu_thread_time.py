"""CPU time per image of ONNX models, ONNX Runtime on one thread: the calling thread's CPU time, which a
busy shared host inflates far less than wall-clock time. Median of N runs after warm-up.

    python benchmarks/cpu_thread_time.py N MODEL.onnx [MODEL.onnx ...]
"""
import json
import sys
import time

import numpy as np
import onnxruntime as ort

res = {}
for path in sys.argv[2:]:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    x = np.random.default_rng(0).standard_normal([1, *inp.shape[1:]]).astype(np.float32)
    for _ in range(3):
        sess.run(None, {inp.name: x})
    cpu, wall = [], []
    for _ in range(int(sys.argv[1])):
        t, w = time.thread_time(), time.perf_counter()
        sess.run(None, {inp.name: x})
        cpu.append(time.thread_time() - t)
        wall.append(time.perf_counter() - w)
    res[path.rsplit("/", 1)[-1]] = {"cpu_ms_p50": round(1000 * float(np.median(cpu)), 1),
                                    "cpu_ms_min": round(1000 * min(cpu), 1),
                                    "wall_ms_p50": round(1000 * float(np.median(wall)), 1)}
    print(path, res[path.rsplit("/", 1)[-1]], flush=True)
print(json.dumps(res))
