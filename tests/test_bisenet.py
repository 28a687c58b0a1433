"""Our BiSeNet family: checkpoint layout, upstream equivalence, export, and refusal paths."""

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the export extra (torch) is not installed")

from app.bisenet import CheckpointError, build_model, load_checkpoint  # noqa: E402
from app.core.errors import ModelError
from app.engines import load_model  # noqa: E402

from .models import make_client, png_bytes  # noqa: E402
from .upstream_weights import deterministic_input, deterministic_state  # noqa: E402

DATA = Path(__file__).parent / "data"  # holds copies of ../shared/contract/bisenetv{1,2}_state_dict.txt


def contract_listing(arch: str) -> dict[str, tuple[tuple[int, ...], str]]:
    out = {}
    for line in (DATA / f"{arch}_state_dict.txt").read_text().splitlines():
        key, rest = line.split(" ", 1)
        shape, dtype = rest.rsplit(" ", 1)
        out[key] = (tuple(int(d) for d in shape.strip("()").split(",") if d.strip()), dtype)
    return out


def tiny_camvid(root: Path, n: int) -> None:
    """A CamVid-layout data set of ``n`` random 64x96 images (labels 0-11, 11 = void) per split."""
    import cv2

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(n):
            cv2.imwrite(str(root / "images" / split / f"{i}.jpg"), rng.integers(0, 255, (64, 96, 3), np.uint8))
            cv2.imwrite(str(root / "labels" / split / f"{i}.png"), rng.integers(0, 12, (64, 96), np.uint8))


def layout(model) -> dict[str, tuple[tuple[int, ...], str]]:
    return {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch", ["bisenetv1", "bisenetv2"])
@pytest.mark.parametrize("classes", [19, 171, 150])
def test_state_dict_layout_matches_contract(arch, classes):
    ref = contract_listing(arch)
    mine = layout(build_model(arch, classes, aux=True))
    assert list(mine) == list(ref)  # same keys, same order
    for key, (shape, dtype) in ref.items():
        if shape and shape[0] == 19 and key.endswith(("conv_out.1.weight", "conv_out.1.bias", "conv_out.weight",
                                                        "conv_out.bias")):
            shape = (classes, *shape[1:])  # only the classifiers depend on the class count
        assert mine[key] == (shape, dtype), key


@pytest.mark.parametrize("arch,tensors,params", [("bisenetv1", 206, 13_275_539), ("bisenetv2", 327, 3_358_627)])
def test_inference_model_drops_aux_heads(arch, tensors, params):
    model = build_model(arch, 19)
    assert len(model.state_dict()) == tensors
    assert sum(p.numel() for p in model.parameters()) == params


@pytest.mark.parametrize("arch", ["bisenetv1", "bisenetv2"])
def test_same_weights_same_logits_as_upstream(arch):
    """Logits computed once by upstream's own code with these deterministic weights (tests/data)."""
    ref = np.load(DATA / "upstream_logits.npz")[arch]
    model = build_model(arch, 19).eval()
    model.load_state_dict(deterministic_state(model.state_dict()))
    with torch.no_grad():
        ours = model(deterministic_input()).numpy()
    assert np.abs(ours - ref).max() <= 1e-3
    assert (ours.argmax(1) == ref.argmax(1)).mean() >= 0.999


def test_training_checkpoint_loads_ignoring_aux_heads(tmp_path):
    train = build_model("bisenetv2", 19, aux=True)
    torch.save(train.state_dict(), tmp_path / "ckpt.pth")
    model = build_model("bisenetv2", 19)
    load_checkpoint(model, tmp_path / "ckpt.pth")
    assert torch.equal(model.state_dict()["head.conv_out.1.weight"], train.state_dict()["head.conv_out.1.weight"])


def test_bad_checkpoints_fail_naming_keys(tmp_path):
    state = build_model("bisenetv2", 19).state_dict()
    missing = {k: v for k, v in state.items() if k != "bga.conv.0.weight"}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): bga.conv.0.weight"):
        load_checkpoint(build_model("bisenetv2", 19), tmp_path / "missing.pth")
    torch.save({**state, "extra.weight": torch.zeros(1)}, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match="unexpected keys.*extra.weight"):
        load_checkpoint(build_model("bisenetv2", 19), tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"mis-shaped keys.*head.conv_out.1.weight.*\(19, 1024, 1, 1\)"):
        load_checkpoint(build_model("bisenetv2", 11), tmp_path / "extra.pth")
    torch.save(build_model("bisenetv1", 19).state_dict(), tmp_path / "v1.pth")
    with pytest.raises(CheckpointError, match="does not fit BiSeNetV2"):
        load_checkpoint(build_model("bisenetv2", 19), tmp_path / "v1.pth")


@pytest.mark.parametrize("output", ["labels", "logits"])
def test_export_matches_pytorch_and_serves(tmp_path, output):
    from app.bisenet.export import export
    from app.core.metadata import load_meta

    torch.manual_seed(3)
    ckpt = tmp_path / "w.pth"
    torch.save(build_model("bisenetv2", 19).state_dict(), ckpt)
    onnx_path = tmp_path / "engines" / "city.onnx"
    result = export("bisenetv2", onnx_path, weights=ckpt, classes=19, dataset="cityscapes", height=64,
                    width=128, output=output)
    assert result["max_abs_diff"] < 1e-3 and result["label_agreement"] >= 0.999
    meta = load_meta(onnx_path)
    assert meta.trained and meta.source_sha256 and meta.input_size == (64, 128) and meta.arch == "bisenetv2"

    # ONNX Runtime through our runner gives the labels PyTorch gives, on real pre-processing.
    model = load_model(onnx_path)
    try:
        from app.serving.pipeline import preprocess

        image = np.random.default_rng(1).integers(0, 255, (64, 128, 3), np.uint8)
        x = preprocess(image, model, (64, 128))
        ref = build_model("bisenetv2", 19).eval()
        load_checkpoint(ref, ckpt)
        with torch.no_grad():
            expected = ref(torch.from_numpy(x)).argmax(1).numpy()
        assert (model.infer(x) == expected).mean() >= 0.999
        assert model.output_kind == output
    finally:
        model.close()
    with make_client(onnx_path.parent, "city") as c:
        r = c.post("/segment", files={"image": ("x.png", png_bytes(image), "image/png")})
        assert r.status_code == 200


def test_random_init_export_is_marked_untrained(tmp_path):
    from app.cli import main

    out = tmp_path / "e" / "rand.onnx"
    assert main(["export", "--arch", "bisenetv1", "--random-init", "--seed", "7", "--classes", "19",
                 "--dataset", "cityscapes", "--height", "64", "--width", "64", "--dynamic-hw", "--out", str(out)]) == 0
    with make_client(out.parent, "rand") as c:
        info = c.get("/models/active").json()
        assert info["metadata"]["trained"] is False and info["input"]["dynamic_hw"] is True
        assert "untrained weights" in c.get("/").text


def test_custom_argmax_graph_is_refused(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("input_image", TensorProto.FLOAT, ["N", 3, 64, 64])
    y = helper.make_tensor_value_info("preds", TensorProto.INT32, ["N", 64, 64])
    graph = helper.make_graph([helper.make_node("CustomArgMax", ["input_image"], ["preds"], dim=1)], "g", [x], [y])
    onnx.save(helper.make_model(graph), str(tmp_path / "pred.onnx"))
    with pytest.raises(ModelError, match="CustomArgMax.*--aux-mode eval.*segment export"):
        load_model(tmp_path / "pred.onnx")


def test_training_tool_runs_checkpoints_and_resumes(tmp_path):
    """Two iterations on CPU over a tiny CamVid-layout set: weights, log, checkpoint, resume, mIoU report."""
    import json

    from app.cli import build_parser

    tiny_camvid(tmp_path / "data", 3)
    argv = ["train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--iters", "2", "--batch", "2",
            "--crop", "64", "96", "--warmup", "1", "--eval-sizes", "64x96", "--checkpoint-every", "1"]
    args = build_parser().parse_args(argv)
    summary = args.func(args)
    assert summary == 0
    log = json.loads((tmp_path / "run" / "train_log.json").read_text())
    assert log["iterations"] == 2 and 0.0 <= log["val_torch"]["64x96"]["miou"] <= 1.0
    assert set(log["val_torch"]["64x96"]["per_class_iou"]) == {"sky", "building", "pole", "road", "sidewalk", "tree",
                                                                 "sign", "fence", "car", "pedestrian", "bicyclist"}
    model = build_model("bisenetv2", 11)
    load_checkpoint(model, tmp_path / "run" / "weights.pth")  # inference weights, upstream layout
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)
    assert ckpt["iteration"] == 2
    resumed = build_parser().parse_args(argv[:-2] + ["--iters", "3", "--resume", str(tmp_path / "run" / "checkpoint.pth")])
    resumed.func(resumed)
    assert json.loads((tmp_path / "run" / "train_log.json").read_text())["iterations"] == 3


def test_uint8_input_export_serves_raw_pixels_with_the_same_labels(tmp_path):
    """`--input uint8`: the service feeds raw RGB pixels and gets what the float model gives."""
    from app.bisenet.export import export
    from app.serving.pipeline import segment_image

    torch.manual_seed(5)
    ckpt = tmp_path / "w.pth"
    torch.save(build_model("bisenetv2", 19).state_dict(), ckpt)
    engines = tmp_path / "engines"
    common = dict(weights=ckpt, classes=19, dataset="cityscapes", height=64, width=128)
    r = export("bisenetv2", engines / "raw.onnx", input_kind="uint8", **common)
    assert r["max_abs_diff"] < 1e-3 and r["label_agreement"] >= 0.999
    export("bisenetv2", engines / "float.onnx", **common)
    raw, flt = load_model(engines / "raw.onnx"), load_model(engines / "float.onnx")
    try:
        assert raw.uint8_input and raw.input_hw == (64, 128) and raw.meta.input_format == "uint8_nhwc"
        assert not flt.uint8_input
        image = np.random.default_rng(2).integers(0, 255, (100, 180, 3), np.uint8)
        a, b = segment_image(raw, image).labels, segment_image(flt, image).labels
        assert a.shape == (100, 180) and (a == b).mean() >= 0.999
    finally:
        raw.close()
        flt.close()


def test_fp16_build_of_raw_pixel_bisenet_for_onnxruntime(tmp_path, caplog):
    """`segment compile raw.onnx raw_fp16.onnx --fp16` on a real BiSeNetV2 with uint8 NHWC input: weights and
    arithmetic in fp16, raw pixels in and class ids out as before, labels as the fp32 model's."""
    import onnx

    from app.bisenet.export import export
    from app.builds.compiler import compile_model
    from app.builds.options import BuildOptions
    from app.serving.pipeline import segment_image

    engines = tmp_path / "engines"
    export("bisenetv2", engines / "raw.onnx", weights=None, classes=19, dataset="cityscapes", height=64, width=128,
           input_kind="uint8", seed=3)
    meta = compile_model(engines / "raw.onnx", engines / "raw_fp16.onnx",
                         BuildOptions(target="onnxruntime", precision="fp16"))
    build = meta.build.model_dump()
    assert meta.precision == "fp16" and build["target"] == "onnxruntime"
    assert build["parity"]["label_agreement"] >= 0.99 and not build["parity"]["flagged"]
    graph = onnx.load(str(engines / "raw_fp16.onnx")).graph
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert graph.output[0].type.tensor_type.elem_type == onnx.load(str(engines / "raw.onnx")).graph.output[0].type.tensor_type.elem_type
    weights = [t for t in graph.initializer if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]
    assert sum(t.data_type == onnx.TensorProto.FLOAT16 for t in weights) > 0.9 * len(weights)
    assert (engines / "raw_fp16.onnx").stat().st_size < 0.6 * (engines / "raw.onnx").stat().st_size
    with caplog.at_level("WARNING", logger="segment.runner"):
        fp16, fp32 = load_model(engines / "raw_fp16.onnx"), load_model(engines / "raw.onnx")
    # Warned about only where it runs on the CPU (CI); on a GPU host it is what the build is for.
    assert ("fp16 build for ONNX Runtime's CUDA provider" in caplog.text) == (fp16.device != "cuda")
    try:
        image = np.random.default_rng(4).integers(0, 255, (90, 160, 3), np.uint8)
        a, b = segment_image(fp16, image).labels, segment_image(fp32, image).labels
        assert fp16.uint8_input and a.shape == (90, 160) and (a == b).mean() >= 0.99
    finally:
        fp16.close()
        fp32.close()
    assert not any(p.name.startswith(".raw_fp16") for p in engines.iterdir())


def test_int8_build_of_raw_pixel_bisenet_for_onnxruntime(tmp_path):
    """`segment compile raw.onnx raw_int8.onnx --int8 DIR` on a real BiSeNetV2 with uint8 NHWC input: the
    calibration feeds raw pixels, the result is a Q/DQ graph with the same input, and it serves."""
    import onnx

    from app.bisenet.export import export
    from app.builds.compiler import compile_model
    from app.builds.options import BuildOptions
    from app.serving.pipeline import segment_image

    from .models import SAMPLE

    engines, calib = tmp_path / "engines", tmp_path / "calib"
    calib.mkdir()
    (calib / "street.png").write_bytes(SAMPLE.read_bytes())
    export("bisenetv2", engines / "raw.onnx", weights=None, classes=19, dataset="cityscapes", height=64, width=128,
           input_kind="uint8", seed=3)
    lines = []
    meta = compile_model(engines / "raw.onnx", engines / "raw_int8.onnx",
                         BuildOptions(target="onnxruntime", precision="int8", calib_dir=calib), progress=lines.append)
    assert any(line.startswith("parity: label agreement") for line in lines)
    build = meta.build.model_dump()
    assert build["target"] == "onnxruntime" and build["calibration_size"] == [64, 128]
    assert 0.5 < build["parity"]["label_agreement"] <= 1.0 and build["parity"]["images"] == 1
    graph = onnx.load(str(engines / "raw_int8.onnx")).graph
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert sum(n.op_type == "QuantizeLinear" for n in graph.node) > 10
    model = load_model(engines / "raw_int8.onnx")
    try:
        assert model.uint8_input and model.meta.precision == "int8"
        labels = segment_image(model, np.random.default_rng(4).integers(0, 255, (90, 160, 3), np.uint8)).labels
        assert labels.shape == (90, 160) and labels.max() < 19
    finally:
        model.close()
    assert not any(p.name.startswith(".raw_int8") for p in engines.iterdir())  # no work files left behind


def test_augmentation_keeps_labels_aligned_and_pads_with_ignore():
    """Scale, aspect, flip and blur move image and labels together; areas outside the source become IGNORE."""
    from app.bisenet.data import IGNORE, GpuAugment

    # Left half class 1 and dark, right half class 2 and bright: each output pixel's label must match its colour.
    img = np.zeros((2, 64, 96, 3), np.uint8)
    img[:, :, 48:] = 255
    lab = np.ones((2, 64, 96), np.uint8)
    lab[:, :, 48:] = 2
    torch.manual_seed(0)
    aug = GpuAugment(img, lab, [0.5] * 3, [0.25] * 3, crop=(64, 96), scale=(0.5, 2.0), jitter=0.0,
                     aspect=(0.75, 1.33), blur=1.0, device="cpu")
    x, y = aug(8)
    assert x.shape == (8, 3, 64, 96) and y.shape == (8, 64, 96)
    assert set(torch.unique(y).tolist()) <= {1, 2, IGNORE} and (y == IGNORE).any()  # scale 0.5 leaves padding
    bright = x.mean(1) > 0  # normalised: above the mean grey
    far = torch.nn.functional.max_pool2d((y[:, None] == 2).float() - (y[:, None] == 1).float(), 9, 1, 4)[:, 0]
    interior = (y != IGNORE) & (far.abs() == 1)  # away from the class edge, which blur softens
    assert torch.equal(bright[interior], (y == 2)[interior])


def test_class_weights_lift_rare_classes_and_ohem_uses_them():
    from app.bisenet.data import class_weights
    from app.bisenet.loss import OhemCrossEntropy

    lab = np.zeros((1, 10, 10), np.uint8)
    lab[0, 0, :2] = 1  # 2% of the pixels
    lab[0, 9, :] = 255
    w = class_weights(lab, 2, power=0.5)
    assert w[1] > 1 > w[0]
    logits = torch.zeros(1, 2, 10, 10)
    labels = torch.from_numpy(lab.astype(np.int64))
    plain = OhemCrossEntropy(thresh=0.99)(logits, labels)
    weighted = OhemCrossEntropy(thresh=0.99, weight=torch.tensor(w))(logits, labels)
    # Uniform logits: every valid pixel has loss log 2, whatever its weight.
    assert torch.isclose(plain, torch.tensor(np.log(2.0), dtype=torch.float32))
    assert torch.isclose(weighted, plain)
    logits[0, 1] = 2.0  # now class-0 pixels are wrong (high loss), class-1 pixels right (low loss)
    reweighted = OhemCrossEntropy(thresh=0.99, weight=torch.tensor(w))(logits, labels)
    assert reweighted < OhemCrossEntropy(thresh=0.99)(logits, labels)


def test_training_on_train_and_val_with_weight_average_resumes(tmp_path):
    """--splits train,val flags val as not held out; --ema ships the average and keeps the last weights too."""
    import json

    from app.cli import build_parser

    tiny_camvid(tmp_path / "data", 2)
    argv = ["train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--iters", "3", "--batch", "2",
            "--crop", "64", "96", "--warmup", "1", "--eval-sizes", "64x96", "--checkpoint-every", "1",
            "--splits", "train,val", "--ema", "0.5", "--ema-every", "1", "--ema-start", "0", "--log-every", "1",
            "--class-weights", "0.5", "--scale", "0.5", "2.0", "--aspect", "0.8", "1.25", "--blur", "0.5",
            "--cast", "0.1"]
    args = build_parser().parse_args(argv)
    assert args.func(args) == 0
    log = json.loads((tmp_path / "run" / "train_log.json").read_text())
    assert log["val_held_out"] is False and log["shipped_weights"] == "ema" and log["ema_updates"] == 2
    assert {"64x96", "last:64x96"} <= set(log["val_torch"])
    assert [e["iter"] for e in log["log"]] == [1, 2, 3] and all("eta_s" in e and "it_per_s" in e for e in log["log"])
    shipped = torch.load(tmp_path / "run" / "weights.pth", weights_only=True)
    last = torch.load(tmp_path / "run" / "weights_last.pth", weights_only=True)
    assert shipped.keys() == last.keys() and any(not torch.equal(shipped[k], last[k]) for k in shipped)
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)
    assert ckpt["iteration"] == 3 and ckpt["ema"] is not None
    at = argv.index("--iters")
    resumed = build_parser().parse_args(argv[:at] + ["--iters", "4"] + argv[at + 2:]
                                        + ["--resume", str(tmp_path / "run" / "checkpoint.pth")])
    resumed.func(resumed)
    log = json.loads((tmp_path / "run" / "train_log.json").read_text())
    assert log["iterations"] == 4 and log["ema_updates"] == 3
