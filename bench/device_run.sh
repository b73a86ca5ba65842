#!/usr/bin/env bash
# Issue 11's GPU checks in ONE call of a lent device machine (about 4 minutes on an H100; a task has 15 minutes of
# device time in all). Prepare here, where pip has an index, then call the device tool once:
#
#   make device-pack                 # .devicerun/: wheels the device lacks (its Python 3.12) + Fashion-MNIST test set
#   device run: command "bash bench/device_run.sh", carry [".devicerun"], timeout_s 540
#
# Steps, each logged with its time; a failed step is reported and the next ones still run:
#   1. environment: install the carried wheels in /tmp/certserve-site, nvidia-smi, versions, imports;
#   2. backend agreement (bench/backend_agreement.py): the GPU backend vs onnxruntime on the CPU, clean logits and
#      an exact per-image test of the noisy miss rates;
#   3. worker efficiency at 1/8/64/256/512 jobs and certificates/s, sequential and Cohen-10k
#      (`certserve bench server --only worker,certs --device cuda`), into $OUT/benchmarks.md: a copy of
#      docs/benchmarks.md whose torch-cuda sections (and summary rows) the run replaces; copy it over
#      docs/benchmarks.md to keep them (the sections name the GPU and the host);
#   4. the engine's own ceiling on the device host's CPU (null sampler, 512 live jobs): $OUT/engine-host.md, a
#      separate report, since section (i) of docs/benchmarks.md is the 2-core machine's;
#   5. `certserve serve --device cuda` smoke (bench/serve_smoke.py): one image by auto, sequential and Cohen, the
#      sampler it logged, the server's GPU memory.
# Everything comes back under $OUT (at most 8 files): device_run.log, nvidia-smi.txt, backend-agreement.json,
# benchmarks.md, engine-host.md, serve-smoke.json. The exit status is the number of failed steps.
#
# On a machine without a GPU, `DEVICE=cpu JOBS=1,8 bash bench/device_run.sh` runs the same steps on the CPU
# (a check of this script; its figures are the CPU's).
set -uo pipefail
OUT=${OUT:-/tmp/certserve-device-run}
PACK=${PACK:-.devicerun}
DEVICE=${DEVICE:-cuda}
JOBS=${JOBS:-1,8,64,256,512}
PY=${PY:-python3}
mkdir -p "$OUT"
exec > >(tee "$OUT/device_run.log") 2>&1
failed=0
step() { echo; echo "== $(date -u +%H:%M:%S) $*"; }
check() { "$@" || { echo "!! step failed (exit $?): $*"; failed=$((failed + 1)); }; }

step "1. environment"
if [ -d "$PACK/wheels" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/certserve-site \
    "$PACK"/wheels/*.whl || { echo "!! the carried wheels did not install"; exit 99; }
  export PYTHONPATH=/tmp/certserve-site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ -d "$PACK/fashion-mnist" ]; then export CERTSERVE_FASHION_MNIST_DIR="$(cd "$PACK/fashion-mnist" && pwd)"; fi
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || echo "(no nvidia-smi)"
head -15 "$OUT/nvidia-smi.txt" 2>/dev/null
$PY -c "import fastapi, uvicorn, pydantic_settings, joserfc, simplejpeg, multipart, onnxruntime, scipy, numba, torch, sys
print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.cuda.is_available(),
      '| onnxruntime', onnxruntime.__version__, onnxruntime.get_available_providers())" \
  || { echo "!! a package is missing: run make device-pack here and carry .devicerun"; exit 98; }

step "2. backend agreement ($DEVICE vs onnxruntime-cpu)"
check $PY -m bench.backend_agreement --device "$DEVICE" --images 100 --samples 10000 --out "$OUT"

step "3. worker efficiency and certificates/s ($DEVICE; jobs $JOBS)"
cp docs/benchmarks.md "$OUT/benchmarks.md"
check $PY -m bench.server_bench --only worker,certs --device "$DEVICE" --jobs "$JOBS" --out "$OUT/benchmarks.md"

step "4. engine ceiling on this host's CPU (null sampler)"
check $PY -m bench.server_bench --only engine --out "$OUT/engine-host.md"

step "5. certserve serve --device $DEVICE smoke"
check $PY -m bench.serve_smoke --device "$DEVICE" --out "$OUT"

step "done: $failed failed step(s)"
exit "$failed"
