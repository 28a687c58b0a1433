"""GPU forward latency of BiSeNetV1/V2 (random weights: speed does not depend on them), batch 1, eager PyTorch.

Usage (on a CUDA machine, from the repository root): python -m benchmarks.gpu_forward OUT.json
"""
import json
import sys

import torch

from app.bisenet import build_model

res = {}
torch.backends.cudnn.benchmark = True
for arch in ("bisenetv2", "bisenetv1"):
    for hw in ((1024, 2048), (448, 608)):
        for prec in ("fp32", "fp16"):
            m = build_model(arch, 11).cuda().eval().to(memory_format=torch.channels_last)
            x = torch.randn(1, 3, *hw, device="cuda").contiguous(memory_format=torch.channels_last)
            times = []
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16, enabled=prec == "fp16"):
                for i in range(80):
                    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    s.record()
                    m(x).argmax(1)
                    e.record()
                    torch.cuda.synchronize()
                    if i >= 20:
                        times.append(s.elapsed_time(e))
            times.sort()
            key = f"{arch} {hw[0]}x{hw[1]} {prec}"
            res[key] = {"median_ms": round(times[len(times) // 2], 3), "p90_ms": round(times[int(len(times) * 0.9)], 3)}
            print(key, res[key], flush=True)
res["device"] = torch.cuda.get_device_name()
res["torch"] = torch.__version__
json.dump(res, open(sys.argv[1], "w"), indent=1)
