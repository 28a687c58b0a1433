"""The ``segment`` command line: serve, export, train, eval (and the seed's compile, run, test)."""

import argparse
import json
import logging
import sys
from pathlib import Path

EPILOG = """examples:
  segment serve                                   # the bundled CamVid model on http://127.0.0.1:8000
  segment export --arch bisenetv2 --weights model_final_v2_city.pth --classes 19 --dataset cityscapes \\
                 --height 1024 --width 2048 --output labels --out engines/city_v2.onnx
  segment eval engines/camvid_bisenetv2.onnx --data ../shared/datasets/camvid --void-id 11
"""


def cmd_serve(args) -> int:
    import uvicorn

    from .core.config import get_settings

    settings = get_settings()
    uvicorn.run("app.main:create_app", factory=True, host=args.host, port=args.port, workers=1,
                log_level=settings.log_level, timeout_graceful_shutdown=30)
    return 0


def cmd_export(args) -> int:
    try:
        from .bisenet.export import export
    except ImportError as exc:
        print(f"error: export needs PyTorch: pip install '.[export]' ({exc})", file=sys.stderr)
        return 2
    if args.weights is None and not args.random_init:
        print("error: give --weights PATH.pth, or --random-init for untrained weights", file=sys.stderr)
        return 2
    if args.weights is not None and not args.weights.is_file():
        print(f"error: no such checkpoint: {args.weights}", file=sys.stderr)
        return 2
    result = export(args.arch, args.out, weights=None if args.random_init else args.weights, classes=args.classes,
                    dataset=args.dataset, height=args.height, width=args.width, output=args.output,
                    dynamic_hw=args.dynamic_hw, opset=args.opset, seed=args.seed)
    print(f"wrote {result['onnx']} and {result['metadata']}")
    print(f"ONNX Runtime vs PyTorch: max |logit difference| {result['max_abs_diff']:.3g}, "
          f"label agreement {result['label_agreement']:.4%}")
    return 0


def cmd_train(args) -> int:
    from .bisenet.train import main

    main(args)
    return 0


def _load(path: Path):
    from .runner import load_model

    if not path.is_file():
        raise SystemExit(f"error: no such model file: {path}")
    return load_model(path)


def cmd_eval(args) -> int:
    from .evaluate import evaluate

    result = evaluate(_load(args.model), args.data, args.split, void_id=args.void_id)
    print(f"mIoU {result['miou']:.4f}  pixel accuracy {result['pixel_accuracy']:.4f}  ({result['images']} images)")
    for name, iou in result["per_class_iou"].items():
        print(f"  {name:<16} {'-' if iou is None else f'{iou:.4f}'}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``segment train`` (kept here so that building the parser never imports torch)."""
    p.add_argument("--data", required=True, help="data set root with images/{train,val} and labels/{train,val}")
    p.add_argument("--out", required=True, help="folder for weights.pth and train_log.json")
    p.add_argument("--arch", default="bisenetv2", choices=["bisenetv1", "bisenetv2"])
    p.add_argument("--classes", type=int, default=11)
    p.add_argument("--iters", type=int, default=12000)
    p.add_argument("--minutes", type=float, default=0, help="stop (and finish the schedule) after this long")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--crop", type=int, nargs=2, default=(352, 480), metavar=("H", "W"))
    p.add_argument("--scale", type=float, nargs=2, default=(0.75, 1.75), metavar=("MIN", "MAX"))
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=500, help="warm-up iterations")
    p.add_argument("--aux-weight", type=float, default=1.0)
    p.add_argument("--aux-loss", default="ce", choices=["ce", "ohem"], help="loss of the auxiliary heads (main: OHEM)")
    p.add_argument("--eval-sizes", default="352x480,384x480,448x608", help="val sizes for the final PyTorch eval")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segment", description="BiSeNet segmentation: serve, export, evaluate.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="start the web service (settings from SEGMENT_* variables)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("export", help="export a BiSeNet checkpoint to ONNX with its metadata (needs the export extra)",
                       epilog="example: segment export --arch bisenetv2 --weights v2_city.pth --classes 19 "
                              "--dataset cityscapes --height 1024 --width 2048 --out engines/city.onnx")
    p.add_argument("--arch", required=True, choices=["bisenetv1", "bisenetv2"])
    p.add_argument("--weights", type=Path, help="upstream-style state_dict (.pth)")
    p.add_argument("--random-init", action="store_true", help="export untrained weights (for tests and benchmarks)")
    p.add_argument("--seed", type=int, default=0, help="seed of --random-init weights and the verification input")
    p.add_argument("--classes", type=int, required=True)
    p.add_argument("--dataset", required=True, choices=["cityscapes", "coco", "ade20k", "camvid"])
    p.add_argument("--height", type=int, required=True)
    p.add_argument("--width", type=int, required=True)
    p.add_argument("--output", default="labels", choices=["labels", "logits"],
                   help="labels: argmax inside the graph (default); logits: [N,C,H,W]")
    p.add_argument("--dynamic-hw", action="store_true", help="leave height and width dynamic")
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--out", type=Path, required=True, help="the .onnx to write (metadata goes beside it)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("train", help="train a BiSeNet on a CamVid-layout data set (GPU; needs the export extra)")
    add_train_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="mIoU of a model through the service's pipeline",
                       epilog="example: segment eval engines/camvid_bisenetv2.onnx --data ../shared/datasets/camvid "
                              "--void-id 11")
    p.add_argument("model", type=Path)
    p.add_argument("--data", type=Path, required=True, help="root with images/SPLIT and labels/SPLIT")
    p.add_argument("--split", default="val")
    p.add_argument("--void-id", type=int, help="label id left out of the metrics (CamVid: 11)")
    p.add_argument("--json", type=Path, help="also write the result as JSON")
    p.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
