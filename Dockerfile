# syntax=docker/dockerfile:1
# The worker image (also the operator's and the EPLB controller's) on a machine with Docker:
#   docker build -t k2-operator/worker:dev .
# It is the image `make image` builds without Docker (hack/image/build.py): the same Debian packages
# (hack/image/packages.txt), the same venv with the project's dependencies and `workers` extra from pyproject.toml
# (hack/image/requirements.py), then the project, in the same three cached layers and with the same config.
# The shell commands are hack/image/spec.py's, word for word; tests/cluster/test_image.py checks that they agree.

FROM debian:bookworm-slim AS base
RUN --mount=type=bind,source=hack/image/packages.txt,target=/tmp/k2-build/packages.txt \
    apt-get update \
    && sed -e 's/#.*//' /tmp/k2-build/packages.txt | xargs apt-get install -y --no-install-recommends \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --gid 65532 k2 && useradd --uid 65532 --gid 65532 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin k2 && mkdir -p /opt/k2

FROM base AS deps
RUN --mount=type=bind,source=hack/image/requirements.py,target=/tmp/k2-build/requirements.py \
    --mount=type=bind,source=pyproject.toml,target=/tmp/k2-build/pyproject.toml \
    --mount=type=cache,target=/root/.cache/pip \
    python3 -m venv /opt/k2/venv && /opt/k2/venv/bin/pip install --quiet pip==26.3 && python3 /tmp/k2-build/requirements.py /tmp/k2-build/pyproject.toml workers > /tmp/requirements.txt && /opt/k2/venv/bin/pip install --quiet -r /tmp/requirements.txt && rm /tmp/requirements.txt

FROM deps
RUN --mount=type=bind,target=/tmp/k2-build/src,rw \
    /opt/k2/venv/bin/pip install --quiet --no-cache-dir --no-deps /tmp/k2-build/src
ENV PATH=/opt/k2/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    VIRTUAL_ENV=/opt/k2/venv \
    HOME=/tmp \
    TMPDIR=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
WORKDIR /opt/k2
USER 65532:65532
ENTRYPOINT ["/opt/k2/venv/bin/k2"]
CMD ["--help"]
