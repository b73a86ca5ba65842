# certserve serving image: the FastAPI/uvicorn server, onnxruntime and the embedded Fashion-MNIST bundle.
# torch (the offline calibration pipeline) is NOT installed: serving needs only the main dependencies.
#
# CPU image (default base is the public python:3.11-slim):
#   docker build -t certserve .
#   docker run --rm --network host certserve            # listens on 0.0.0.0:8000
#   docker run --rm --network host -v /path/bundle:/bundle:ro -e CERTSERVE_BUNDLE=/bundle certserve
#
# GPU image: a CUDA runtime base that has python3 + venv (installed below when INSTALL_PYTHON=1) and onnxruntime-gpu
# (CERTSERVE_DEVICE=cuda then runs the sampler on onnxruntime's CUDA provider, noise drawn in the graph):
#   docker build -t certserve:gpu \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04 \
#     --build-arg INSTALL_PYTHON=1 --build-arg ORT_PACKAGE=onnxruntime-gpu .
#   docker run --rm --gpus all --network host -e CERTSERVE_DEVICE=cuda certserve:gpu
# Add --build-arg EXTRAS=gpu for the PyTorch backend as well (torch + onnx2torch, several GB: models/torch_backend.py;
# used when onnxruntime has no CUDA provider). docker/smoke-test.sh builds the onnxruntime-gpu variant on its local
# Debian base (no CUDA base can be pulled there) and checks that it imports its GPU backend; it cannot run it.
#
# Offline builds: put wheels in a `wheels/` directory of the build context (e.g. `pip download -d wheels ...` on a
# host with the base image's Python); they are then installed with `pip install --no-index --find-links`, otherwise
# from PyPI. The wheels only live in the build stage; the final stage copies the virtual environment alone.
# docker/smoke-test.sh builds on a local debootstrap base with such a wheelhouse.

ARG BASE_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS build
ARG INSTALL_PYTHON=0
ARG ORT_PACKAGE=onnxruntime
ARG EXTRAS=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1

SHELL ["/bin/sh", "-eu", "-c"]
# DL3008 ignored: the GPU base only needs the distribution's python3 of the day; pinning apt versions would break on
# every Ubuntu point release. This branch does not run for the default (python:3.11-slim) base.
# hadolint ignore=DL3008
RUN if [ "$INSTALL_PYTHON" = 1 ]; then \
        apt-get update && \
        apt-get install -y --no-install-recommends python3 python3-venv ca-certificates && \
        rm -rf /var/lib/apt/lists/*; \
    fi

WORKDIR /src
# `wheel[s]` matches the optional wheelhouse directory; pyproject.toml keeps the COPY valid when it is absent.
COPY pyproject.toml wheel[s] /wheels/
COPY pyproject.toml README.md ./
COPY smoothing ./smoothing
COPY models ./models
COPY calibration ./calibration
COPY certification ./certification
COPY server ./server
COPY cli ./cli
COPY bench ./bench

# The versions are those of pyproject.toml (or of the wheelhouse); a non-default ORT_PACKAGE (onnxruntime-gpu)
# replaces the CPU onnxruntime that the project's metadata requires (both provide the `onnxruntime` module).
RUN python3 -m venv /opt/venv && \
    if ls /wheels/*.whl >/dev/null 2>&1; then \
        set -- --no-index --find-links /wheels; \
    else \
        set --; \
    fi && \
    /opt/venv/bin/pip install --no-cache-dir "$@" ".${EXTRAS:+[$EXTRAS]}" && \
    if [ "$ORT_PACKAGE" != onnxruntime ]; then \
        /opt/venv/bin/pip uninstall -y onnxruntime && \
        /opt/venv/bin/pip install --no-cache-dir --no-deps "$@" "$ORT_PACKAGE"; \
    fi && \
    /opt/venv/bin/pip uninstall -y pip setuptools wheel >/dev/null 2>&1 || true && \
    /opt/venv/bin/python -c "import models.bundle as b; assert (b.DEFAULT_BUNDLE_DIR / 'manifest.json').is_file()"

# ---------------------------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime
ARG INSTALL_PYTHON=0
SHELL ["/bin/sh", "-eu", "-c"]
# DL3008 ignored: see the build stage (GPU base only).
# hadolint ignore=DL3008
RUN if [ "$INSTALL_PYTHON" = 1 ]; then \
        apt-get update && \
        apt-get install -y --no-install-recommends python3 ca-certificates && \
        rm -rf /var/lib/apt/lists/*; \
    fi && \
    useradd --system --uid 10001 --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin \
        certserve

COPY --from=build /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CERTSERVE_HOST=0.0.0.0 \
    CERTSERVE_PORT=8000

# Mount another bundle at run time: -v /path/bundle:/bundle:ro -e CERTSERVE_BUNDLE=/bundle
WORKDIR /tmp
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import os,urllib.request as u; u.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('CERTSERVE_PORT', '8000'), timeout=4)"]
CMD ["certserve", "serve"]
