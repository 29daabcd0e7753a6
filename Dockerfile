# syntax=docker/dockerfile:1
# Image of the stream-dec service (`stream-dec run` by default; `train`, `produce` and the
# compose demo's helpers are in it too). Slim, non-root (uid 10001), CPU torch by default:
#   docker build -t stream-dec .
#   docker build --build-arg TORCH_VARIANT=cu128 -t stream-dec:cuda .   # CUDA build of torch
# The CUDA variant needs the NVIDIA container toolkit on the host (`--gpus all`, or a
# compose `deploy.resources.reservations.devices` entry) and STREAM_DEC_MODEL__DEVICE=auto|cuda.

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim-bookworm AS build
ARG TORCH_VERSION=2.13.0
# cpu, or a CUDA wheel channel of the PyTorch index such as cu126 / cu128.
ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
# torch first, from its own index: a plain `pip install torch` pulls the multi-GB CUDA build.
RUN python -m venv /opt/venv \
    && pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY stream_dec ./stream_dec
# The package and its other dependencies; torch is already satisfied and stays as installed.
RUN pip install . \
    && python -c "import stream_dec, torch; print('stream_dec', stream_dec.__name__, 'torch', torch.__version__)"

FROM python:${PYTHON_VERSION}-slim-bookworm AS runtime
LABEL org.opencontainers.image.title="stream-dec" \
      org.opencontainers.image.description="Streaming Deep Embedded Clustering of embeddings from Kafka" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 streamdec \
    && useradd --system --uid 10001 --gid streamdec --home-dir /var/lib/stream-dec --shell /usr/sbin/nologin streamdec \
    && mkdir -p /var/lib/stream-dec/checkpoints \
    && chown -R streamdec:streamdec /var/lib/stream-dec
COPY --from=build /opt/venv /opt/venv
COPY --chmod=0755 deploy/docker/train-if-missing.sh /usr/local/bin/stream-dec-train-if-missing
COPY --chmod=0755 deploy/docker/demo_producer.py /usr/local/bin/stream-dec-demo-producer
# Metrics on every interface of the container (the service's own default is loopback),
# reachable from outside only where the port is published.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/var/lib/stream-dec \
    STREAM_DEC_CHECKPOINT__DIR=/var/lib/stream-dec/checkpoints \
    STREAM_DEC_METRICS__PORT=9400 \
    STREAM_DEC_METRICS__HOST=0.0.0.0
WORKDIR /var/lib/stream-dec
# A named volume mounted here starts with this directory's owner (the service user).
VOLUME ["/var/lib/stream-dec/checkpoints"]
USER 10001:10001
EXPOSE 9400
# /healthz answers 200 while the poll loop is alive and 503 when it has stalled.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('STREAM_DEC_METRICS__PORT', '9400'), timeout=4)"]
ENTRYPOINT ["stream-dec"]
CMD ["run"]
