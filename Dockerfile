# GPU service: TensorRT engines through Polygraphy's TrtRunner, ONNX models through ONNX Runtime.
#   docker build -t bisenet-serve:gpu .
#   docker run --gpus all -p 8000:8000 -v "$PWD/engines:/srv/app/engines" bisenet-serve:gpu
# The base image ships TensorRT, CUDA and cuDNN matching each other; 26.10 is its October 2026 release.
FROM nvcr.io/nvidia/tensorrt:26.10-py3

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    SEGMENT_ENGINES_DIR=/srv/app/engines

WORKDIR /srv/app
# Dependencies first (a layer that only changes with pyproject.toml), then the code.
COPY pyproject.toml README.md ./
COPY app/__init__.py app/__init__.py
RUN pip install --no-cache-dir -e '.[tensorrt]'
COPY app app
COPY templates templates
COPY static static
COPY engines engines
# the sample photo of GET /bench and of the builds' parity check
COPY benchmarks/data/cityscapes_example.png benchmarks/data/cityscapes_example.png

RUN useradd --create-home --uid 10001 segment && chown -R segment:segment /srv/app/engines
USER 10001

VOLUME ["/srv/app/engines"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4).status != 200)"]
ENTRYPOINT ["segment", "serve", "--host", "0.0.0.0", "--port", "8000"]
