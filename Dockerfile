# bisenet-serve in a container. CPU (ONNX Runtime), the default:
#   docker build -t bisenet-serve:cpu .
# GPU (TensorRT engines through Polygraphy's TrtRunner; its base image ships TensorRT, CUDA and cuDNN matching each
# other, 26.10 being its October 2026 release):
#   docker build --build-arg BASE=nvcr.io/nvidia/tensorrt:26.10-py3 --build-arg EXTRAS='[tensorrt]' -t bisenet-serve:gpu .
# Run either with a volume for the model repository (an empty one is filled with the bundled models at start):
#   docker run -p 8000:8000 -v "$PWD/engines:/srv/engines" bisenet-serve:cpu
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}
ARG EXTRAS=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    SEGMENT_ENGINES_DIR=/srv/engines

WORKDIR /srv
# A regular (not editable) install: the page, the sample photo and the bundled models are package data. The
# project's own dependency bounds are in pyproject.toml (hence no pins here: DL3013 is ignored for this line).
COPY pyproject.toml README.md ./
COPY app app
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".${EXTRAS}" && rm -rf app pyproject.toml README.md

RUN useradd --create-home --uid 10001 segment && mkdir -p /srv/engines /srv/results \
    && chown segment:segment /srv/engines /srv/results
USER 10001

# Video job results (SEGMENT_RESULTS_DIR, relative to /srv) kept across container restarts with the models.
VOLUME ["/srv/engines", "/srv/results"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4).status != 200)"]
ENTRYPOINT ["segment", "serve", "--host", "0.0.0.0", "--port", "8000"]
