# syntax=docker/dockerfile:1
# extproc scheduler image: ghcr.io/extproc/extproc:<version>
#   docker build -t ghcr.io/extproc/extproc:0.1.0 .
# Stage 1 builds wheels for extproc and its runtime dependencies (no test/dev/bench extras);
# stage 2 installs only those wheels on python:3.11-slim and runs as an unprivileged user.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY extproc ./extproc
RUN pip wheel --wheel-dir /wheels .

FROM ${PYTHON_IMAGE} AS runtime
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="extproc" \
      org.opencontainers.image.description="Envoy ext_proc scheduler for LLM inference" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="https://github.com/extproc/extproc" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MALLOC_ARENA_MAX=2
# lightgbm needs the OpenMP runtime; unpinned on purpose so rebuilds pick up Debian security fixes.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/*
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels "extproc==${VERSION}"
RUN groupadd --system --gid 10001 extproc \
    && useradd --system --uid 10001 --gid extproc --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin extproc
USER 10001:10001
WORKDIR /tmp
# ext_proc gRPC, gRPC health (services liveness/readiness/ext_proc), Prometheus metrics
EXPOSE 9002 9003 9090
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; r = g.HealthStub(grpc.insecure_channel('127.0.0.1:9003')).Check(h.HealthCheckRequest(service='liveness'), timeout=2); sys.exit(0 if r.status == h.HealthCheckResponse.SERVING else 1)"]
ENTRYPOINT ["extproc"]
CMD ["serve"]
