# The two commands of README.md: `make run` (set up + main job) and `make test` (set up + tests).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

FMNIST := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup system run test test-slow bench bundle bundle-recalibrate evaluate device-pack clean
setup: $(VENV)/.installed system

# Debian packages: real Fashion-MNIST (the pipeline and its tests read $(FMNIST)), prometheus (promtool lints the
# metrics exposition in the tests; only the binary is needed) and python3-venv (a stock Debian python3 lacks ensurepip).
system:
	@test -f $(FMNIST)/t10k-labels-idx1-ubyte.gz && command -v promtool >/dev/null && \
	  $(PYTHON) -c 'import ensurepip' 2>/dev/null || \
	  ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist prometheus python3-venv >/dev/null)

$(VENV)/.installed: pyproject.toml | system
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch pinned: the CPU build (+cpu) where the index offers it (as the development machines' does); from plain
	# PyPI this is the default build with CUDA libraries (several GB): set PIP_EXTRA_INDEX_URL to PyTorch's CPU index
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	$(PIP) install -q --no-deps 'onnx2torch>=1.5.15'  # torch GPU backend's converter; no torchvision (models/torch_backend.py)
	touch $@

run: setup
	$(VENV)/bin/certserve serve

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

bench: setup
	$(VENV)/bin/certserve bench smoothing --full

# Rebuild the embedded default bundle with the recipe of the shipped one (README, "Bundles and the calibration
# pipeline"; its manifest records both steps): `calibrate all` (base, surrogate, meta prior; --cal-samples 1000 as the
# manifest's config records: the calibration it makes is replaced below, so 10,000 would only add hours), then
# 10,000-sample counts of the calibration split (seed 103) and `calibrate conformal --tune-size 1024` on them.
# DEVICE=auto takes the GPU when present; on a 2-core CPU this takes hours (the counts alone ~95 min).
# `make bundle-recalibrate` runs only the last two steps on the bundle's current base model; its counts resume after
# an interruption, and counts of another base model (an older `make bundle`) are deleted first.
BUNDLE := models/bundles/fmnist-sigma0.25
BUNDLE_WORK := runs/fmnist-sigma0.25
BUNDLE_COUNTS := $(BUNDLE_WORK)/counts-calibration-10k-8000
DEVICE ?= auto

bundle: setup
	$(VENV)/bin/certserve calibrate all --device $(DEVICE) --cal-samples 1000 --out $(BUNDLE) --work $(BUNDLE_WORK) \
	  --overwrite
	$(MAKE) bundle-recalibrate

bundle-recalibrate: setup
	@if [ -f $(BUNDLE_COUNTS)/meta.json ] && \
	  ! grep -q "$$(sha256sum $(BUNDLE)/base.onnx | cut -d' ' -f1)" $(BUNDLE_COUNTS)/meta.json; then \
	  echo "removing $(BUNDLE_COUNTS): counts of another base model"; rm -rf $(BUNDLE_COUNTS); fi
	$(VENV)/bin/certserve calibrate counts --model $(BUNDLE)/base.onnx --split calibration --n 10000 --sigma 0.25 \
	  --seed 103 --device $(DEVICE) --out $(BUNDLE_COUNTS)
	$(VENV)/bin/certserve calibrate conformal $(BUNDLE) --counts $(BUNDLE_COUNTS) --tune-size 1024 --tuning-cut first \
	  --out $(BUNDLE) --overwrite

evaluate: setup
	$(VENV)/bin/certserve calibrate evaluate models/bundles/fmnist-sigma0.25 --images 1000 --out docs/results.md --json docs/results.json

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis

# Issue 11's device checks (bench/device_run.sh) on a lent GPU machine, which has PyTorch, numpy, scipy, numba, onnxruntime
# (CPU) and no network: `make device-pack` puts what it lacks in .devicerun/ (ignored, ~15 MB), which the device call
# carries: wheels of the server's other packages for its Python 3.12, at the versions this venv runs, and the
# Fashion-MNIST test set. Then one call: run `bash bench/device_run.sh` with carry [".devicerun"] (see that script).
DEVICE_PACKAGES := fastapi starlette pydantic pydantic_core pydantic-settings python-dotenv annotated-types \
  annotated-doc typing-inspection typing_extensions opentelemetry-api uvicorn httptools python-multipart joserfc \
  cryptography cffi pycparser simplejpeg onnx2torch
DEVICE_PLATFORMS := $(foreach p,manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 \
  manylinux2014_x86_64 manylinux_2_34_x86_64 manylinux_2_31_x86_64,--platform $(p))

device-pack: setup
	rm -rf .devicerun && mkdir -p .devicerun/wheels .devicerun/fashion-mnist
	$(PIP) download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $(DEVICE_PLATFORMS) \
	  -d .devicerun/wheels $$($(PY) -c 'import importlib.metadata as m, sys; \
	  print(" ".join(f"{n}=={m.version(n)}" for n in sys.argv[1:]))' $(DEVICE_PACKAGES))
	cp $(FMNIST)/t10k-images-idx3-ubyte.gz $(FMNIST)/t10k-labels-idx1-ubyte.gz .devicerun/fashion-mnist/
	du -sh .devicerun
