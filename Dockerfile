# The serving image: code + champion model and its card, the immutable unit that gets deployed.
# No torch: the service runs the exported ONNX model with ONNX Runtime.
#   make image                      # docker build, tagged $(IMAGE):$(TAG)
#   docker run --read-only -p 8000:8000 <image>
# python:3.11-slim-bookworm, pinned by digest: a rebuild gets the same base until the pin is
# changed on purpose. Dependabot cannot move a digest held in an ARG, and podman 4.3 cannot take a
# stage name from one, so refresh it by hand for security fixes:
#   docker buildx imagetools inspect python:3.11-slim-bookworm   (the "Digest:" line)
# Without Docker Hub, name a local copy: --build-arg BASE_IMAGE=python:3.11-slim-bookworm.
ARG BASE_IMAGE=python:3.11-slim-bookworm@sha256:a36c24f9cbdf4fd0f52d67f0823eeac19c2028c637cecc392d97f980d4fec56b

# ---------------------------------------------------------------- builder: a venv with the serving deps
FROM ${BASE_IMAGE} AS builder
# e.g. "--index-url https://pypi.example/simple" behind a mirror
ARG PIP_OPTS=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
COPY requirements-serve.txt /tmp/
# --require-hashes: every file must match the sha256 requirements-serve.txt holds for it.
# The runtime never installs anything, so pip and setuptools go, and so do the packages'
# own test suites (~30 MB of the image).
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --require-hashes $PIP_OPTS -r /tmp/requirements-serve.txt \
 && /opt/venv/bin/pip uninstall --yes --quiet pip setuptools \
 && find /opt/venv -depth -type d -name tests -exec rm -rf {} +

# ---------------------------------------------------------------- runtime
FROM ${BASE_IMAGE}
ARG REVISION=unknown
ARG MODEL_VERSION=unknown
# Where the model files come from: models/ (make all), or build/model/ (make image
# MODEL_URI=models:/catdog@champion: from the MLflow registry, with its version and run).
ARG MODEL_DIR=models
ARG REGISTRY_VERSION=none
ARG RUN_ID=none
ARG SOURCE=https://github.com/catdog/catdog
LABEL org.opencontainers.image.title="catdog" \
      org.opencontainers.image.description="Cat or dog? Photo classifier API (ONNX Runtime, Flask, waitress)" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.version="${MODEL_VERSION}" \
      org.catdog.model.version="${MODEL_VERSION}" \
      org.catdog.model.registry_version="${REGISTRY_VERSION}" \
      org.catdog.model.run_id="${RUN_ID}"

# A fixed numeric uid so Kubernetes can check runAsNonRoot; the feedback DB is the only
# thing the service writes (with the kept photos, KEEP_PHOTOS), into volumes (the root file system stays read-only).
RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin catdog \
 && install -d -o catdog -g catdog -m 0750 /var/lib/catdog /var/lib/catdog-photos

COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PORT=8000 \
    MODEL_PATH=/app/models/model.onnx \
    DB_PATH=/var/lib/catdog/catdog.db

WORKDIR /app
# Owned by root and read-only to the service: code and model cannot change at run time.
COPY catdog.py serve.py upload.py monitor.py store.py kept.py openapi.yaml ./
COPY static/ static/
# MODEL_CARD.md (GET /model-card) is written by training beside the model; the build fails without
# it, as without the model (make smoke-model's tiny model writes one too).
COPY ${MODEL_DIR}/model.onnx ${MODEL_DIR}/model.json ${MODEL_DIR}/reference_profile.json ${MODEL_DIR}/MODEL_CARD.md models/
# Byte-code compiled now, since nothing can be written at run time.
RUN python3 -m compileall -q /app

USER 10001:10001
VOLUME ["/var/lib/catdog"]
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
  CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8000'), timeout=2)"]
# python is PID 1: serve.py drains in-flight requests on SIGTERM.
CMD ["python3", "serve.py"]
