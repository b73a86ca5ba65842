#!/usr/bin/env bash
# Build the certserve image on this machine and smoke-test it end to end:
#   dockerd (started here when not running: --bridge=none, no iptables) -> local Debian bookworm base image with
#   python3 (debootstrap + docker import; no registry pulls) -> wheelhouse downloaded on the host (pip inside the
#   build cannot verify TLS here) -> docker build -> docker run --network host on a free loopback port -> /readyz ->
#   POST /certify a real Fashion-MNIST PNG -> /metrics moved -> non-root (uid and gid 10001, both named) ->
#   HEALTHCHECK healthy -> a plain `docker stop` answers a request in flight and exits 0 ->
#   the CUDA variant (ORT_PACKAGE=$ORT_GPU_PACKAGE, the README's pin for a CUDA 12 base, on the same local base: no
#   CUDA base image can be pulled here) builds, imports its GPU backend and its CUDA provider is linked against CUDA
#   $CUDA_MAJOR. NOT checked (no CUDA base, no GPU): that the CUDA libraries load (ldd lists them as missing here; the
#   Dockerfile's build check fails on them on a CUDA base) and that anything runs on a GPU ->
#   the Ray variant of deploy/kuberay/rayservice.yaml (EXTRAS=ray + the GPU package) builds, holds Ray $RAY_VERSION
#   (the Dockerfile's RAY_VERSION), finds `ray` from a login shell, and a Ray head started as KubeRay starts it
#   (`bash -lc 'ulimit -n 65536; ray start --head --block ...'`) passes KubeRay's readiness probe command and the
#   workers' `ray health-check` -> cleanup. SMOKE_GPU=0 / SMOKE_RAY=0 skip the CUDA / Ray variants.
# The base rootfs and the wheelhouses are cached in $CERTSERVE_DOCKER_CACHE (default /var/tmp/certserve-docker), so a
# second run skips them. Needs root (debootstrap, dockerd). Exits non-zero on any failure.
#
#   docker/smoke-test.sh                 # KEEP_IMAGE=0 also removes the built images at the end
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${CERTSERVE_DOCKER_CACHE:-/var/tmp/certserve-docker}
BASE_IMAGE_GIVEN=${BASE_IMAGE:+1}
BASE_IMAGE=${BASE_IMAGE:-local/debian-python:bookworm}
IMAGE=${IMAGE:-certserve:smoke}
GPU_IMAGE=${GPU_IMAGE:-certserve:smoke-gpu}
RAY_IMAGE=${RAY_IMAGE:-certserve:smoke-ray}
SMOKE_GPU=${SMOKE_GPU:-1}
SMOKE_RAY=${SMOKE_RAY:-1}
# The GPU variant's package and the CUDA major version its CUDA provider must link against: the README's pair for
# the documented nvidia/cuda:12.4.1 base.
ORT_GPU_PACKAGE=${ORT_GPU_PACKAGE:-onnxruntime-gpu==1.23.*}
CUDA_MAJOR=${CUDA_MAJOR:-12}
RAY_VERSION=$(sed -n 's/^ARG RAY_VERSION=//p' "$REPO/Dockerfile" | head -1)
KEEP_IMAGE=${KEEP_IMAGE:-1}
FMNIST=/usr/share/datasets/fashion-mnist
# The Debian client matches Debian's dockerd 20.10 (a newer client would want the missing buildx plugin).
if [ -z "${DOCKER:-}" ]; then
    if [ -x /usr/bin/docker ]; then DOCKER=/usr/bin/docker; else DOCKER=docker; fi
fi
export DOCKER_BUILDKIT=0
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo
mkdir -p "$CACHE"

T_START=$(date +%s.%N)
T_PHASE=$T_START
TIMINGS=()
phase_done() {  # phase_done NAME: record the seconds since the previous phase
    local now
    now=$(date +%s.%N)
    TIMINGS+=("$(printf '%-22s %7.1f s' "$1" "$(echo "$now - $T_PHASE" | bc)")")
    echo "== $1: $(echo "$now - $T_PHASE" | bc | xargs printf '%.1f') s"
    T_PHASE=$now
}
log() { echo "-- $*"; }
die() { echo "FAIL: $*" >&2; exit 1; }

DOCKERD_PID=""
CONTAINER=""
RAY_CONTAINER=""
CONTEXT="$CACHE/context"
cleanup() {
    local rc=$?
    set +e
    for c in $CONTAINER $RAY_CONTAINER; do
        if [ "$rc" != 0 ]; then
            echo "--- $c logs (last 40 lines)"
            "$DOCKER" logs --tail 40 "$c" 2>&1
        fi
        "$DOCKER" rm -f "$c" >/dev/null 2>&1
    done
    [ "$KEEP_IMAGE" = 1 ] || "$DOCKER" rmi -f "$IMAGE" "$GPU_IMAGE" "$RAY_IMAGE" >/dev/null 2>&1
    rm -rf "$CONTEXT" "$CONTEXT-gpu" "$CONTEXT-ray"
    if [ -n "$DOCKERD_PID" ]; then
        log "stopping the dockerd this script started (pid $DOCKERD_PID)"
        kill "$DOCKERD_PID" 2>/dev/null
        for _ in $(seq 1 30); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
    fi
    echo "--- timings"
    printf '%s\n' "${TIMINGS[@]}"
    printf '%-22s %7.1f s\n' total "$(echo "$(date +%s.%N) - $T_START" | bc)"
    if [ "$rc" = 0 ]; then echo "SMOKE TEST PASSED"; else echo "SMOKE TEST FAILED (exit $rc)"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

command -v bc >/dev/null || { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq bc >/dev/null; }

# ---------------------------------------------------------------- 1. docker daemon
# Exit 77 = "no Docker engine can run on this machine" (not a failure of the image): .ci/run reports it as skipped.
skip() { echo "SKIPPED: $*" >&2; trap - EXIT; exit 77; }
if ! command -v dockerd >/dev/null; then
    log "installing docker.io"
    { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq docker.io >/dev/null; } || skip "docker.io cannot be installed"
    [ -x /usr/bin/docker ] && DOCKER=/usr/bin/docker
fi
if ! "$DOCKER" info >/dev/null 2>&1; then
    log "starting dockerd --bridge=none --iptables=false --ip6tables=false (log: $CACHE/dockerd.log)"
    dockerd --bridge=none --iptables=false --ip6tables=false >"$CACHE/dockerd.log" 2>&1 &
    DOCKERD_PID=$!
    for _ in $(seq 1 60); do "$DOCKER" info >/dev/null 2>&1 && break; sleep 1; done
    "$DOCKER" info >/dev/null 2>&1 || { tail -20 "$CACHE/dockerd.log"; kill "$DOCKERD_PID" 2>/dev/null
                                       skip "dockerd did not come up in 60 s (no Docker engine can run here)"; }
fi
phase_done docker-daemon

# ---------------------------------------------------------------- 2. local base image (no registry pulls)
# wget: KubeRay's probes call it in the Ray variant (the build installs it from apt when the base lacks it, which
# needs network access in the build). The image is labelled with its package set: an older local base is rebuilt
# (unless BASE_IMAGE was given, which is used as it is).
BASE_PACKAGES=python3,python3-venv,ca-certificates,wget
BASE_KEY=$(echo "bookworm minbase $BASE_PACKAGES" | sha256sum | cut -c1-12)
ROOTFS="$CACHE/rootfs-$BASE_KEY.tar"
if ! "$DOCKER" image inspect "$BASE_IMAGE" >/dev/null 2>&1 || { [ -z "$BASE_IMAGE_GIVEN" ] && \
        [ "$("$DOCKER" image inspect -f '{{index .Config.Labels "certserve.rootfs"}}' "$BASE_IMAGE")" != "$BASE_KEY" ]; }; then
    if [ ! -s "$ROOTFS" ]; then
        command -v debootstrap >/dev/null || { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq debootstrap >/dev/null; }
        log "debootstrap bookworm (minbase + $BASE_PACKAGES) into $CACHE/rootfs"
        $SUDO rm -rf "$CACHE/rootfs"
        $SUDO debootstrap --variant=minbase --include="$BASE_PACKAGES" \
            bookworm "$CACHE/rootfs" http://deb.debian.org/debian >"$CACHE/debootstrap.log" 2>&1 \
            || { tail -20 "$CACHE/debootstrap.log"; die "debootstrap failed"; }
        $SUDO rm -rf "$CACHE"/rootfs/var/cache/apt/archives/*.deb "$CACHE"/rootfs/var/lib/apt/lists/*
        $SUDO tar -C "$CACHE/rootfs" -cf "$ROOTFS.part" . && mv "$ROOTFS.part" "$ROOTFS"
        $SUDO rm -rf "$CACHE/rootfs"
    fi
    log "docker import $ROOTFS -> $BASE_IMAGE"
    "$DOCKER" import --change "LABEL certserve.rootfs=$BASE_KEY" "$ROOTFS" "$BASE_IMAGE" >/dev/null
fi
"$DOCKER" run --rm --network host "$BASE_IMAGE" python3 -c 'import sys, venv; print("base python", sys.version.split()[0])'
phase_done base-image

# ---------------------------------------------------------------- 3. wheelhouse (host pip; base is bookworm/cp311)
WHEELS="$CACHE/wheels"
pip_download() {  # pip_download DIR REQUIREMENT...: wheels for the base (Debian bookworm: CPython 3.11, glibc 2.36)
    local dir=$1
    shift
    "${PYTHON:-python3}" -m pip download -q --only-binary=:all: --python-version 3.11 --implementation cp --abi cp311 \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux_2_36_x86_64 \
        -d "$dir" "$@"
}
make_context() {  # make_context DIR WHEELDIR...: the repository's tracked and untracked-but-not-ignored files + wheels/
    local dir=$1 w
    shift
    rm -rf "$dir" && mkdir -p "$dir/wheels"
    (cd "$REPO" && git ls-files -co --exclude-standard -z | tar --null --ignore-failed-read -T - -cf -) | tar -C "$dir" -xf -
    for w in "$@"; do
        cp -al "$w"/*.whl "$dir/wheels/" 2>/dev/null || cp -a "$w"/*.whl "$dir/wheels/"
    done
}
STAMP=$(sha256sum "$REPO/pyproject.toml" | cut -c1-16)
if [ "$(cat "$WHEELS/.stamp" 2>/dev/null)" != "$STAMP" ]; then
    PYTHON=${PYTHON:-python3}
    mapfile -t REQS < <("$PYTHON" - "$REPO/pyproject.toml" <<'EOF'
import sys, tomllib
for dep in tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]:
    print(dep.split(";")[0].strip())
print("setuptools>=68")
print("wheel")
EOF
)
    log "pip download ${#REQS[@]} requirements into $WHEELS"
    rm -rf "$WHEELS" && mkdir -p "$WHEELS"
    pip_download "$WHEELS" "${REQS[@]}" >"$CACHE/pip-download.log" 2>&1 \
        || { tail -20 "$CACHE/pip-download.log"; die "pip download failed"; }
    echo "$STAMP" >"$WHEELS/.stamp"
fi
log "$(find "$WHEELS" -name '*.whl' | wc -l) wheels, $(du -sh "$WHEELS" | cut -f1)"
phase_done wheelhouse

# ---------------------------------------------------------------- 4. build context + docker build
# The context is the repository's tracked and untracked-but-not-ignored files (no .venv, runs, ...) plus wheels/.
make_context "$CONTEXT" "$WHEELS"
log "docker build -t $IMAGE --build-arg BASE_IMAGE=$BASE_IMAGE"
"$DOCKER" build -t "$IMAGE" --build-arg BASE_IMAGE="$BASE_IMAGE" "$CONTEXT" >"$CACHE/build.log" 2>&1 \
    || { tail -40 "$CACHE/build.log"; die "docker build failed (log: $CACHE/build.log)"; }
log "$(grep -c 'Using cache' "$CACHE/build.log") steps from the layer cache; size $("$DOCKER" image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}')"
phase_done docker-build

# ---------------------------------------------------------------- 5. image hygiene: non-root, no wheels/build tools
USER_CFG=$("$DOCKER" image inspect -f '{{.Config.User}}' "$IMAGE")
[ -n "$USER_CFG" ] && [ "${USER_CFG%%:*}" != 0 ] && [ "${USER_CFG%%:*}" != root ] || die "image user is '$USER_CFG'"
"$DOCKER" run --rm --network host --entrypoint /bin/sh "$IMAGE" -c '
    set -e
    test "$(id -u)" != 0 || { echo "runs as root"; exit 1; }
    test "$(id -u):$(id -g)" = 10001:10001 || { echo "runs as $(id -u):$(id -g), not 10001:10001"; exit 1; }
    test "$(id -un):$(id -gn)" = certserve:certserve || { echo "user/group entries: $(id)"; exit 1; }
    test ! -e /wheels || { echo "/wheels shipped"; exit 1; }
    for tool in gcc cc make pip; do ! command -v $tool >/dev/null || { echo "$tool shipped"; exit 1; }; done
    ! ls /opt/venv/lib/python3*/site-packages | grep -qi "^torch" || { echo "torch shipped"; exit 1; }
    python3 -c "import models.bundle as b; print(\"uid\", __import__(\"os\").getuid(), \"bundle\", b.DEFAULT_BUNDLE_DIR)"
' || die "image hygiene check failed"
phase_done image-checks

# ---------------------------------------------------------------- 6. run on a free loopback port
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
CONTAINER=certserve-smoke-$$
"$DOCKER" run -d --name "$CONTAINER" --network host \
    -e CERTSERVE_HOST=127.0.0.1 -e CERTSERVE_PORT="$PORT" -e CERTSERVE_THREADS=2 -e CERTSERVE_MAX_SAMPLES=100000000 \
    --health-interval 2s --health-start-period 60s "$IMAGE" >/dev/null
log "container $CONTAINER on 127.0.0.1:$PORT"
BASE_URL="http://127.0.0.1:$PORT"
python3 - "$BASE_URL" <<'EOF' || die "/readyz did not turn ready in 120 s"
import json, sys, time, urllib.request
deadline = time.monotonic() + 120
while time.monotonic() < deadline:
    try:
        with urllib.request.urlopen(sys.argv[1] + "/readyz", timeout=2) as r:
            if r.status == 200:
                print("ready:", r.read().decode()[:200]); sys.exit(0)
    except Exception:
        pass
    time.sleep(0.5)
sys.exit(1)
EOF
phase_done start-to-ready

# ---------------------------------------------------------------- 7. certify a real Fashion-MNIST image, metrics
if [ ! -f "$FMNIST/t10k-images-idx3-ubyte.gz" ]; then
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi
python3 - "$BASE_URL" "$FMNIST" <<'EOF' || die "certify / metrics check failed"
import gzip, json, re, struct, sys, urllib.request, uuid, zlib

base, fmnist = sys.argv[1], sys.argv[2]

def png_gray(pixels: bytes, w: int, h: int) -> bytes:  # a minimal 8-bit grayscale PNG writer (no numpy/PIL on host)
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    raw = b"".join(b"\0" + pixels[y * w:(y + 1) * w] for y in range(h))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))

idx = 0
images = gzip.open(f"{fmnist}/t10k-images-idx3-ubyte.gz").read()
labels = gzip.open(f"{fmnist}/t10k-labels-idx1-ubyte.gz").read()
png = png_gray(images[16 + idx * 784:16 + (idx + 1) * 784], 28, 28)
label = labels[8 + idx]

def requests_total() -> float:
    text = urllib.request.urlopen(base + "/metrics", timeout=5).read().decode()
    return sum(float(m.group(1)) for m in re.finditer(r"^certserve_requests_total\{[^}]*\} (\S+)$", text, re.M))

before = requests_total()
boundary = uuid.uuid4().hex
body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"fmnist-{idx}.png\"\r\n"
        f"Content-Type: image/png\r\n\r\n").encode() + png + f"\r\n--{boundary}--\r\n".encode()
req = urllib.request.Request(base + "/certify", data=body, method="POST",
                             headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
with urllib.request.urlopen(req, timeout=60) as r:
    cert = json.loads(r.read())
print("certify:", json.dumps({k: cert.get(k) for k in ("class_index", "class_name", "certified", "radius", "method", "samples")}),
      "true label", label)
assert "certified" in cert and "method" in cert, cert
after = requests_total()
print(f"certserve_requests_total {before:g} -> {after:g}")
assert after >= before + 1, "certserve_requests_total did not move"
EOF
phase_done certify+metrics

# ---------------------------------------------------------------- 8. HEALTHCHECK turns healthy
for _ in $(seq 1 60); do
    HEALTH=$("$DOCKER" inspect -f '{{.State.Health.Status}}' "$CONTAINER")
    [ "$HEALTH" = healthy ] && break
    [ "$HEALTH" = unhealthy ] && die "container is unhealthy"
    sleep 1
done
[ "$HEALTH" = healthy ] || die "HEALTHCHECK status '$HEALTH' after 60 s"
log "health: $HEALTH; user in container: $("$DOCKER" exec "$CONTAINER" id -u):$("$DOCKER" exec "$CONTAINER" id -g)"
[ "$("$DOCKER" exec "$CONTAINER" id -u)" != 0 ] || die "container runs as root"
phase_done healthcheck

# ---------------------------------------------------------------- 9. graceful stop (SIGTERM -> drain -> exit 0)
# A plain `docker stop` (Docker's default: SIGKILL 10 s after SIGTERM) while a request that cannot finish in time
# (cohen, 10^8 samples) is in flight: it must get its certificate so far (stopped_by: shutdown) and the process exit 0
# before the kill (the image's CERTSERVE_DRAIN_SECONDS=5; the server's default 20 s lost the answer and exited 137).
python3 - "$BASE_URL" >"$CACHE/inflight.log" 2>&1 <<'EOF' &
import json, sys, urllib.request
body = json.dumps({"image": [[0.5] * 28] * 28, "mode": "cohen", "max_samples": 10**8, "deadline_ms": 120000}).encode()
req = urllib.request.Request(sys.argv[1] + "/certify", data=body, headers={"Content-Type": "application/json"})
with urllib.request.urlopen(req, timeout=60) as r:
    cert = json.loads(r.read())
print("in-flight request at SIGTERM:", json.dumps({k: cert.get(k) for k in ("stopped_by", "samples", "certified")}))
assert cert["stopped_by"] == "shutdown", cert
EOF
INFLIGHT=$!
# stop once the request is a live job (not after a fixed sleep: on a slow machine the client may not have sent it)
python3 - "$BASE_URL" "$INFLIGHT" <<'EOF' || { cat "$CACHE/inflight.log"; die "the long request never became a live job"; }
import os, re, sys, time, urllib.request
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    os.kill(int(sys.argv[2]), 0)  # the client still waits for its answer (ProcessLookupError: it ended early)
    text = urllib.request.urlopen(sys.argv[1] + "/metrics", timeout=10).read().decode()
    if any(float(v) >= 1 for v in re.findall(r"^certserve_live_jobs (\S+)$", text, re.M)):
        sys.exit(0)
    time.sleep(0.2)
sys.exit("no live job after 60 s")
EOF
T_STOP=$(date +%s.%N)
"$DOCKER" stop "$CONTAINER" >/dev/null
STOP_S=$(python3 -c "import sys; print(float(sys.argv[2]) - float(sys.argv[1]))" "$T_STOP" "$(date +%s.%N)")
EXIT=$("$DOCKER" inspect -f '{{.State.ExitCode}}' "$CONTAINER")
wait "$INFLIGHT" || { cat "$CACHE/inflight.log"; die "the request in flight at SIGTERM got no certificate"; }
cat "$CACHE/inflight.log"
[ "$EXIT" = 0 ] || die "container exited $EXIT after SIGTERM (137: killed before its drain ended)"
log "docker stop (default timeout) -> exit $EXIT in $(printf '%.1f' "$STOP_S") s"
phase_done graceful-stop

# ---------------------------------------------------------------- 10. the CUDA variant builds and imports its GPU backend
# Checked: the pinned GPU package replaced the CPU onnxruntime, its providers include CUDA, the backend chooser sees
# it, and its CUDA provider links against CUDA $CUDA_MAJOR (the base the README pairs it with).
# NOT checked here: that those CUDA libraries load (this Debian base has none, so ldd lists them as missing; on a CUDA
# base the Dockerfile's build check fails when one is missing), nor anything on a GPU.
GPU_WHEELS="$CACHE/wheels-gpu-$(echo "$ORT_GPU_PACKAGE" | sha256sum | cut -c1-12)"
if [ "$SMOKE_GPU" = 1 ] || [ "$SMOKE_RAY" = 1 ]; then
    if ! ls "$GPU_WHEELS"/onnxruntime_gpu-*.whl >/dev/null 2>&1; then
        log "pip download $ORT_GPU_PACKAGE into $GPU_WHEELS"
        rm -rf "$GPU_WHEELS" && mkdir -p "$GPU_WHEELS"
        pip_download "$GPU_WHEELS" --no-deps "$ORT_GPU_PACKAGE" >"$CACHE/pip-download-gpu.log" 2>&1 \
            || { tail -20 "$CACHE/pip-download-gpu.log"; die "pip download $ORT_GPU_PACKAGE failed"; }
    fi
fi
check_gpu_image() {  # check_gpu_image IMAGE
    "$DOCKER" run --rm --network none --entrypoint /bin/sh -e CUDA_MAJOR="$CUDA_MAJOR" "$1" -c '
set -e
python3 -c "
import importlib.metadata as md, onnxruntime as ort
from models.backends import _ort_has_cuda, onnx_backend  # the backend chooser CERTSERVE_DEVICE=cuda uses
dists = md.packages_distributions().get(\"onnxruntime\")
assert dists == [\"onnxruntime-gpu\"], \"onnxruntime comes from %s\" % dists
assert \"CUDAExecutionProvider\" in ort.get_available_providers(), ort.get_available_providers()
assert _ort_has_cuda(), \"the backend chooser does not see the CUDA provider\"
print(\"GPU image: onnxruntime-gpu\", md.version(\"onnxruntime-gpu\"), \"providers\", ort.get_available_providers())
"
provider=$(echo /opt/venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime_providers_cuda.so)
deps=$(ldd "$provider")
cudart=$(echo "$deps" | grep -o "libcudart\.so\.[0-9]*" | head -1)
echo "CUDA provider links against: $(echo "$deps" | grep -o "lib\(cu[a-z]*\|nvrtc\)[A-Za-z]*\.so\.[0-9]*" | sort -u | tr "\n" " ")"
test "$cudart" = "libcudart.so.$CUDA_MAJOR" || { echo "it needs $cudart, not libcudart.so.$CUDA_MAJOR"; exit 1; }
missing=$(echo "$deps" | grep "not found" | sed "s/^[[:space:]]*//; s/[[:space:]].*//" | grep -vx "libcuda\.so\.1" | tr "\n" " ")
if [ -z "$missing" ]; then
    echo "every CUDA library resolves in this image (libcuda.so.1 comes with the driver)"
else
    echo "NOT CHECKED (no CUDA runtime in this base): whether these load on a CUDA $CUDA_MAJOR base: $missing"
fi
'
}
if [ "$SMOKE_GPU" = 1 ]; then
    make_context "$CONTEXT-gpu" "$WHEELS" "$GPU_WHEELS"
    log "docker build -t $GPU_IMAGE --build-arg BASE_IMAGE=$BASE_IMAGE --build-arg ORT_PACKAGE='$ORT_GPU_PACKAGE'"
    "$DOCKER" build -t "$GPU_IMAGE" --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg ORT_PACKAGE="$ORT_GPU_PACKAGE" \
        "$CONTEXT-gpu" >"$CACHE/build-gpu.log" 2>&1 || { tail -40 "$CACHE/build-gpu.log"; die "GPU docker build failed"; }
    log "size $("$DOCKER" image inspect -f '{{.Size}}' "$GPU_IMAGE" | awk '{printf "%.0f MB", $1/1e6}')"
    check_gpu_image "$GPU_IMAGE" || die "the CUDA image does not import its GPU backend"
    phase_done gpu-variant
fi

# ---------------------------------------------------------------- 11. the Ray variant (deploy/kuberay/rayservice.yaml)
if [ "$SMOKE_RAY" = 1 ]; then
    [ -n "$RAY_VERSION" ] || die "no ARG RAY_VERSION in the Dockerfile"
    RAY_WHEELS="$CACHE/wheels-ray-$RAY_VERSION"
    if [ ! -f "$RAY_WHEELS/.complete" ]; then
        log "pip download ray[serve]==$RAY_VERSION into $RAY_WHEELS"
        rm -rf "$RAY_WHEELS" && mkdir -p "$RAY_WHEELS"
        pip_download "$RAY_WHEELS" "ray[serve]==$RAY_VERSION" >"$CACHE/pip-download-ray.log" 2>&1 \
            || { tail -20 "$CACHE/pip-download-ray.log"; die "pip download ray[serve]==$RAY_VERSION failed"; }
        touch "$RAY_WHEELS/.complete"
    fi
    make_context "$CONTEXT-ray" "$WHEELS" "$GPU_WHEELS" "$RAY_WHEELS"
    log "docker build -t $RAY_IMAGE --build-arg BASE_IMAGE=$BASE_IMAGE --build-arg ORT_PACKAGE='$ORT_GPU_PACKAGE' --build-arg EXTRAS=ray"
    "$DOCKER" build -t "$RAY_IMAGE" --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg ORT_PACKAGE="$ORT_GPU_PACKAGE" \
        --build-arg EXTRAS=ray "$CONTEXT-ray" >"$CACHE/build-ray.log" 2>&1 \
        || { tail -40 "$CACHE/build-ray.log"; die "Ray docker build failed"; }
    log "size $("$DOCKER" image inspect -f '{{.Size}}' "$RAY_IMAGE" | awk '{printf "%.0f MB", $1/1e6}')"
    check_gpu_image "$RAY_IMAGE" || die "the Ray image does not import its GPU backend"
    "$DOCKER" run --rm --network none --entrypoint /bin/bash -e RAY_VERSION="$RAY_VERSION" "$RAY_IMAGE" -c '
set -e
for tool in bash wget grep; do command -v $tool >/dev/null || { echo "no $tool (KubeRay probes need it)"; exit 1; }; done
test "$(bash -lc "command -v ray")" = /opt/venv/bin/ray || { echo "a login shell does not find the venv ray"; exit 1; }
python3 -c "import os, ray, server.ray_serve; assert ray.__version__ == os.environ[\"RAY_VERSION\"], ray.__version__"
echo "Ray image: ray $RAY_VERSION, uid $(id -u), login-shell ray $(bash -lc "command -v ray")"
' || die "the Ray image lacks what KubeRay needs"
    # KubeRay's head container command (rayStartParams of the manifest's head group; no network: loopback only)
    RAY_CONTAINER=certserve-smoke-ray-$$
    "$DOCKER" run -d --name "$RAY_CONTAINER" --network none --shm-size 256m --entrypoint /bin/bash "$RAY_IMAGE" -lc -- \
        'ulimit -n 65536; ray start --head --block --node-ip-address=127.0.0.1 --num-cpus=0 --dashboard-host=0.0.0.0 --metrics-export-port=8080 --object-store-memory=100000000 --disable-usage-stats' >/dev/null
    # KubeRay's readiness/liveness probe of a head pod (exec, `bash -c`)
    PROBE='wget -T 2 -q -O- http://localhost:52365/api/local_raylet_healthz | grep success && wget -T 10 -q -O- http://localhost:8265/api/gcs_healthz | grep success'
    for _ in $(seq 1 120); do
        "$DOCKER" exec "$RAY_CONTAINER" bash -c "$PROBE" >/dev/null 2>&1 && break
        [ "$("$DOCKER" inspect -f '{{.State.Running}}' "$RAY_CONTAINER")" = true ] || die "the Ray head exited"
        sleep 1
    done
    "$DOCKER" exec "$RAY_CONTAINER" bash -c "$PROBE" >/dev/null || die "KubeRay's probe command failed after 120 s"
    # the workers' wait-gcs-ready init container (`bash -lc`)
    HEALTH_OUT=$("$DOCKER" exec "$RAY_CONTAINER" bash -lc 'ray health-check --address 127.0.0.1:6379' 2>&1) \
        || { echo "$HEALTH_OUT"; die "ray health-check against the head failed"; }
    log "Ray head up: KubeRay's probe command and ray health-check pass"
    "$DOCKER" rm -f "$RAY_CONTAINER" >/dev/null
    RAY_CONTAINER=""
    phase_done ray-variant
fi
