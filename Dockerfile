# certserve serving image: the FastAPI/uvicorn server, onnxruntime and the embedded Fashion-MNIST bundle.
# torch (the offline calibration pipeline) is NOT installed: serving needs only the main dependencies.
#
# CPU image (default base is the public python:3.11-slim):
#   docker build -t certserve .
#   docker run --rm --network host certserve            # listens on 0.0.0.0:8000
#   docker run --rm --network host -v /path/bundle:/bundle:ro -e CERTSERVE_BUNDLE=/bundle certserve
#
# GPU image: a CUDA + cuDNN runtime base that has python3 + venv (installed below when INSTALL_PYTHON=1) and
# onnxruntime-gpu in place of onnxruntime (CERTSERVE_DEVICE=cuda then runs the sampler on onnxruntime's CUDA provider,
# noise drawn in the graph). Pin ORT_PACKAGE to a release built for the base's CUDA major version: an unpinned
# onnxruntime-gpu resolves by the base's Python (3.10 gets 1.23.2, built for CUDA 12; 3.11+ gets the newest, built for
# CUDA 13 since 1.27), and its CUDA provider then fails to load at run time. Matching pairs (the CUDA libraries each
# release's libonnxruntime_providers_cuda.so links against):
#   CUDA 12.x + cuDNN 9 base (e.g. nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04, Python 3.10): onnxruntime-gpu
#     1.19-1.26, e.g. ORT_PACKAGE='onnxruntime-gpu==1.23.*' (1.23.2 is the last release for Python 3.10)
#   CUDA 13.x base (+ cuDNN 9 for 1.27): onnxruntime-gpu>=1.27 (Python >= 3.11, e.g. an ubuntu24.04 base: Python 3.12)
#   docker build -t certserve:gpu \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04 \
#     --build-arg INSTALL_PYTHON=1 --build-arg ORT_PACKAGE='onnxruntime-gpu==1.23.*' .
#   docker run --rm --gpus all --network host -e CERTSERVE_DEVICE=cuda certserve:gpu
# The build checks the result: onnxruntime imports, the GPU distribution is installed (and the CPU one is not), its
# providers include CUDAExecutionProvider and, on a base that has a CUDA runtime, `ldd` resolves every library of the
# CUDA provider except the driver's libcuda.so.1 (mounted by the NVIDIA container runtime), so a mismatched pair fails
# the build instead of the first request. Add --build-arg EXTRAS=gpu for the PyTorch backend as well (torch +
# onnx2torch, several GB: models/torch_backend.py; used when onnxruntime has no CUDA provider).
#
# Ray image (deploy/kuberay/rayservice.yaml): the same image with EXTRAS=ray holds certserve[ray] with Ray pinned to
# RAY_VERSION (= the manifest's rayVersion) and what KubeRay's probes call (bash, wget, grep); KubeRay replaces the
# command with its `ray start`:
#   docker build -t certserve:ray \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04 --build-arg INSTALL_PYTHON=1 \
#     --build-arg ORT_PACKAGE='onnxruntime-gpu==1.23.*' --build-arg EXTRAS=ray .
#
# docker/smoke-test.sh builds the CPU image and runs it, builds the onnxruntime-gpu variant on its local Debian base
# (no CUDA base can be pulled there, so it cannot load or run the CUDA provider) and the Ray variant (starts a Ray
# head in it and runs KubeRay's probe commands).
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
ARG RAY_VERSION=2.60.0
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

# The versions are those of pyproject.toml (or of the wheelhouse); with `ray` in EXTRAS, Ray is pinned to RAY_VERSION.
# A non-default ORT_PACKAGE (onnxruntime-gpu==...) replaces the CPU onnxruntime that the project's metadata requires
# (both provide the `onnxruntime` module; with both installed the CPU one would win). Every step but the removal of
# pip itself must succeed.
RUN python3 -m venv /opt/venv && \
    if ls /wheels/*.whl >/dev/null 2>&1; then \
        set -- --no-index --find-links /wheels; \
    else \
        set --; \
    fi && \
    case ",$EXTRAS," in \
        *,ray,*) ray_pin="ray[serve]==$RAY_VERSION";; \
        *) ray_pin="";; \
    esac && \
    /opt/venv/bin/pip install --no-cache-dir "$@" ".${EXTRAS:+[$EXTRAS]}" ${ray_pin:+"$ray_pin"} && \
    if [ "$ORT_PACKAGE" != onnxruntime ]; then \
        /opt/venv/bin/pip uninstall -y onnxruntime && \
        /opt/venv/bin/pip install --no-cache-dir --no-deps "$@" "$ORT_PACKAGE"; \
    fi && \
    { /opt/venv/bin/pip uninstall -y pip setuptools wheel >/dev/null 2>&1 || true; }

# Check what was installed: the embedded bundle; onnxruntime imports from exactly one distribution, the one ORT_PACKAGE
# names; a GPU build has the CUDA provider, and on a base with a CUDA runtime every library of that provider resolves
# (a release built for another CUDA major version fails here, not at the first request). Run from /: in /src,
# `python -c` imports the copied sources (the current directory comes first on sys.path), not the installed package.
WORKDIR /
RUN /opt/venv/bin/python -c "import importlib.metadata as md, os, re, onnxruntime as ort, models.bundle as b; \
assert (b.DEFAULT_BUNDLE_DIR / 'manifest.json').is_file(), 'the embedded bundle is missing'; \
norm = lambda name: name.lower().replace('_', '-'); \
want = norm(re.split(r'[^A-Za-z0-9._-]', os.environ['ORT_PACKAGE'].strip())[0]); \
dists = sorted({norm(d) for d in md.packages_distributions().get('onnxruntime', [])}); \
print('onnxruntime', ort.__version__, 'from', dists, 'providers', ort.get_available_providers()); \
assert len(dists) == 1, 'the onnxruntime module comes from %s' % dists; \
assert not want or dists == [want], '%s was asked for, onnxruntime comes from %s' % (want, dists); \
assert dists == ['onnxruntime'] or 'CUDAExecutionProvider' in ort.get_available_providers(), \
    '%s has no CUDA provider' % dists[0]" && \
    provider=$(echo /opt/venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime_providers_cuda.so) && \
    if [ -f "$provider" ]; then \
        missing=$(ldd "$provider" | grep 'not found' | sed 's/^[[:space:]]*//; s/[[:space:]].*//' \
                  | grep -vx 'libcuda\.so\.1' | tr '\n' ' ') && \
        if [ -z "$missing" ]; then \
            echo "CUDA provider: every library resolves (libcuda.so.1 comes with the driver at run time)"; \
        elif ls /usr/local/cuda*/lib64/libcudart.so.* >/dev/null 2>&1 || ldconfig -p | grep -q 'libcudart\.so'; then \
            echo "ERROR: $ORT_PACKAGE's CUDA provider cannot load on this base, missing: $missing-" \
                 "pin an onnxruntime-gpu built for the base's CUDA major version (see the top of this file)" >&2; \
            exit 1; \
        else \
            echo "WARNING: no CUDA runtime in this base image: the CUDA provider's libraries were not checked" \
                 "(missing here: $missing)" >&2; \
        fi; \
    fi

# The compiled loops (numba): the sequential path's kernels (smoothing.kernels) and the engine's job-table loops
# (models.table_kernels), compiled here into numba's cache, which the runtime stage copies for its user, so that a
# container loads them at start (~0.2 s) instead of compiling them (~12 s). On a CPU other than the build machine's,
# numba compiles them once more, into the same cache.
ENV NUMBA_CACHE_DIR=/opt/numba-cache
RUN /opt/venv/bin/python -c "import smoothing.kernels as k, models.table_kernels as t; k.warm_up(); t.warm_up()"

# ---------------------------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime
ARG INSTALL_PYTHON=0
ARG EXTRAS=""
SHELL ["/bin/sh", "-eu", "-c"]
# DL3008 ignored: see the build stage (GPU base, or wget for the Ray image).
# The Ray image (EXTRAS=ray) also needs wget, which KubeRay's readiness/liveness probes call (bash and grep are in
# every Debian/Ubuntu base).
# The user's group is created with gid 10001 (useradd --user-group would pick a system gid such as 999, leaving
# `USER 10001:10001` with a gid that has no group entry). Login shells get the venv on their PATH too: KubeRay starts
# Ray with `bash -lc`, and Debian's /etc/profile resets PATH.
# hadolint ignore=DL3008
RUN pkgs=""; \
    if [ "$INSTALL_PYTHON" = 1 ]; then pkgs="python3 ca-certificates"; fi; \
    case ",$EXTRAS," in \
        *,ray,*) command -v wget >/dev/null || pkgs="$pkgs wget";; \
    esac; \
    if [ -n "$pkgs" ]; then \
        apt-get update && \
        apt-get install -y --no-install-recommends $pkgs && \
        rm -rf /var/lib/apt/lists/*; \
    fi && \
    groupadd --system --gid 10001 certserve && \
    useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin \
        certserve && \
    echo 'PATH=/opt/venv/bin:$PATH' >/etc/profile.d/certserve-venv.sh

COPY --from=build /opt/venv /opt/venv
COPY --from=build --chown=10001:10001 /opt/numba-cache /opt/numba-cache

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CERTSERVE_HOST=0.0.0.0 \
    CERTSERVE_PORT=8000 \
    CERTSERVE_DRAIN_SECONDS=5 \
    NUMBA_CACHE_DIR=/opt/numba-cache \
    HOME=/tmp
# HOME: the user has no home directory; what caches under ~ (Ray in the Ray image: ~/.ray) writes to /tmp instead.
# NUMBA_CACHE_DIR: the compiled loops from the build stage (written to by the user; on a read-only file system they
# are compiled in each process instead, see smoothing.kernels and models.table_kernels).
# CERTSERVE_DRAIN_SECONDS: `docker stop` sends SIGKILL 10 s after SIGTERM unless given -t; the server's default drain
# (20 s, + 3 s to write the answers) would be cut there, and every request still in flight would lose its answer
# (the connection dropped, exit 137). 5 s (+ 3) fits: in-flight requests get their certificate so far (stopped_by:
# shutdown) and the process exits 0. With a longer stop timeout (`docker stop -t`, compose's stop_grace_period,
# Kubernetes' terminationGracePeriodSeconds, 30 s by default) raise it, to at most that timeout - 4.

# Mount another bundle at run time: -v /path/bundle:/bundle:ro -e CERTSERVE_BUNDLE=/bundle
WORKDIR /tmp
USER 10001:10001
EXPOSE 8000
# The health check connects where the server listens: CERTSERVE_HOST (127.0.0.1 for the wildcard 0.0.0.0, ::1 for ::)
# and CERTSERVE_PORT.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request as u; e = os.environ.get; h = e('CERTSERVE_HOST') or '127.0.0.1'; h = {'0.0.0.0': '127.0.0.1', '::': '::1'}.get(h, h); u.urlopen('http://%s:%s/healthz' % ('[%s]' % h if ':' in h else h, e('CERTSERVE_PORT', '8000')), timeout=4)"]
CMD ["certserve", "serve"]
