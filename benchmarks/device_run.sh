# Sourced on the lent GPU machine after the parts of benchmarks/device_wheels.sh were copied to /tmp/parts:
#   . benchmarks/device_run.sh && python3 benchmarks/video_speed.py ...
cp .devparts*/part* /tmp/parts/ 2>/dev/null || true
if [ ! -d /tmp/site ]; then
  # A part that never arrived (a device call refused) leaves a tar that does not unpack: say so, install nothing.
  cat /tmp/parts/part* > /tmp/wheels.tar && mkdir -p /tmp/w && tar xf /tmp/wheels.tar -C /tmp/w \
    || { echo "device_run.sh: the wheel parts in /tmp/parts ($(ls /tmp/parts | tr '\n' ' ')) do not make a whole tar;" \
              "copy every .devpartsK first" >&2; rm -rf /tmp/w; return 1; }
  python3 -m pip install -q --no-index --no-deps --target /tmp/site /tmp/w/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
