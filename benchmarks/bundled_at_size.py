"""The bundled camvid_bisenetv2 weights exported again at another size (and input kind), for GPU benchmarks.

    python benchmarks/bundled_at_size.py --height 1024 --width 2048 --input uint8 --out DIR/camvid.onnx
    segment compile DIR/camvid.onnx DIR/camvid_fp16.onnx --fp16

The project ships its trained model as ONNX only (448x608, float input), so `segment export --weights` has no
checkpoint to start from. This exports the same network with ``--random-init`` at the size asked for, then copies
every convolution and batch-norm weight of the bundled ONNX into it, node by node (both come from the same
exporter, so their weighted nodes line up; any difference in count or shape stops it). It checks the result by
exporting the same way at the bundled size and comparing labels with the bundled model on the sample photo, which
must agree on every pixel. Needs the export extra (PyTorch).
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.core.resources import bundled_models, sample_image  # noqa: E402

SOURCE = bundled_models() / "camvid_bisenetv2.onnx"


def export(height: int, width: int, input_kind: str, out: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "app.cli", "export", "--arch", "bisenetv2", "--random-init",
                           "--classes", "11", "--dataset", "camvid", "--height", str(height), "--width", str(width),
                           "--input", input_kind, "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"segment export failed:\n{done.stderr[-2000:]}")


def transplant(source: Path, target: Path) -> int:
    """Copy ``source``'s convolution and batch-norm weights into ``target``, node by node; the count copied."""
    src, dst = onnx.load(source), onnx.load(target)
    src_init = {i.name: i for i in src.graph.initializer}
    dst_init = {i.name: i for i in dst.graph.initializer}
    # The exporter shares identical random tensors through Identity nodes: give every node its own weights.
    alias = {n.output[0]: n.input[0] for n in dst.graph.node if n.op_type == "Identity" and n.input[0] in dst_init}
    for node in dst.graph.node:
        node.input[:] = [alias.get(i, i) for i in node.input]
    for node in [n for n in dst.graph.node if n.op_type == "Identity" and n.output[0] in alias]:
        dst.graph.node.remove(node)
    weighted = ("Conv", "BatchNormalization")
    src_nodes = [n for n in src.graph.node if n.op_type in weighted]
    dst_nodes = [n for n in dst.graph.node if n.op_type in weighted]
    if [n.op_type for n in src_nodes] != [n.op_type for n in dst_nodes]:
        raise SystemExit(f"the networks differ: {len(src_nodes)} and {len(dst_nodes)} weighted nodes")
    copied = []
    for a, b in zip(src_nodes, dst_nodes):
        for k, (x, y) in enumerate(zip(a.input, b.input)):
            if (x in src_init) != (y in dst_init):
                raise SystemExit(f"the networks differ at {a.name} / {b.name}")
            if x in src_init:
                value = numpy_helper.to_array(src_init[x])
                if value.shape != numpy_helper.to_array(dst_init[y]).shape:
                    raise SystemExit(f"{a.name}: shape {value.shape} against {dst_init[y].dims}")
                copied.append(numpy_helper.from_array(value, f"bundled_{len(copied)}"))
                b.input[k] = copied[-1].name
    used = {i for n in dst.graph.node for i in n.input}
    kept = [i for i in dst.graph.initializer if i.name in used]
    del dst.graph.initializer[:]
    dst.graph.initializer.extend(kept + copied)
    onnx.checker.check_model(dst)
    onnx.save(dst, target)
    return len(copied)


def labels(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def check(input_kind: str, tmp: Path) -> float:
    """Label agreement with the bundled model on the sample photo, both at the bundled size."""
    meta = json.loads(SOURCE.with_suffix(".json").read_text())
    height, width = meta["input_size"]
    probe = tmp / "probe.onnx"
    export(height, width, input_kind, probe)
    transplant(SOURCE, probe)
    rgb = cv2.cvtColor(cv2.resize(cv2.imread(str(sample_image())), (width, height)), cv2.COLOR_BGR2RGB)
    normalised = ((rgb / 255.0 - meta["mean"]) / meta["std"]).astype(np.float32).transpose(2, 0, 1)[None]
    ours = labels(probe, rgb[None] if input_kind == "uint8" else normalised)
    return float((ours == labels(SOURCE, normalised)).mean())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--height", type=int, required=True)
    ap.add_argument("--width", type=int, required=True)
    ap.add_argument("--input", default="uint8", choices=["float", "uint8"])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        agreement = check(args.input, Path(tmp))
    print(f"at the bundled size, label agreement with {SOURCE.name}: {agreement:.4%}")
    if agreement < 1.0:
        raise SystemExit("the weights did not carry over exactly")
    export(args.height, args.width, args.input, args.out)
    copied = transplant(SOURCE, args.out)
    meta_path = args.out.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    source_meta = json.loads(SOURCE.with_suffix(".json").read_text())
    meta.update(trained=True, source_sha256=source_meta["sha256"],
                description=f"{SOURCE.stem}'s weights exported at {args.height}x{args.width}, {args.input} input "
                            "(benchmarks/bundled_at_size.py)")
    meta["extra"].pop("check", None)  # it compared the random weights with PyTorch, not these
    meta.pop("sha256", None)  # of the random-weight file: the repository stamps the real one
    meta_path.write_text(json.dumps(meta, indent=1))
    print(f"wrote {args.out} ({copied} weight tensors from {SOURCE.name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
