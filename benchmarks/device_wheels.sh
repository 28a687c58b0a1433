#!/usr/bin/env bash
# Wheels for a GPU benchmark on the lent H200 (Python 3.12, CUDA 13 PyTorch, OpenCV; no onnxruntime-gpu, Ray or
# the service's web stack), in parts that each fit one device call beside the checkout (docs/development.md).
#   benchmarks/device_wheels.sh [--ray] [PART_MB=56]
# writes .devparts1 .. .devpartsN (ignored by git). Then, one device `run` per part, back to back:
#   run carry=[".devpartsK"]  command: mkdir -p /tmp/parts && cp .devpartsK/* /tmp/parts/
# and a last run that carries the models it needs and starts with `. benchmarks/device_run.sh`.
set -euo pipefail
ray=""; [ "${1:-}" = "--ray" ] && { ray='ray[serve]==2.60.0'; shift; }
mb=${1:-56}
top=$(git rev-parse --show-toplevel)
tmp=$(mktemp -d)
pip download -q --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform linux_x86_64 --platform any \
  -d "$tmp/w" onnxruntime-gpu nvidia-ml-py "fastapi>=0.133" "uvicorn>=0.30" "polygraphy>=0.49" "onnx>=1.16" \
  python-multipart pydantic-settings prometheus-client tqdm httpx "av>=14,<20" websockets fsspec pytest \
  "nvidia-nvimgcodec-cu13[nvjpeg]>=0.9" $ray
rm -f "$tmp"/w/numpy-* "$tmp"/w/opencv* "$tmp"/w/torch-*  # the machine has these
tar cf "$tmp/wheels.tar" -C "$tmp/w" .
rm -rf "$top"/.devparts*
split -b "${mb}M" -d -a 1 "$tmp/wheels.tar" "$tmp/part"
i=0
for p in "$tmp"/part*; do i=$((i + 1)); mkdir -p "$top/.devparts$i"; mv "$p" "$top/.devparts$i/"; done
echo "$(ls "$tmp/w" | wc -l) wheels, $(du -m "$tmp/wheels.tar" | cut -f1) MB, in $i parts: .devparts1 .. .devparts$i"
rm -rf "$tmp"
