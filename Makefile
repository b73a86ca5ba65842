# The two commands of README.md: `make run` (set up + main job) and `make test` (set up + tests).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

FMNIST := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup system run test test-slow bench bundle evaluate clean
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

# Rebuild the embedded default bundle and its evaluation report (GPU when present; see README for timings).
bundle: setup
	$(VENV)/bin/certserve calibrate all --out models/bundles/fmnist-sigma0.25 --work runs/fmnist-sigma0.25 --overwrite

evaluate: setup
	$(VENV)/bin/certserve calibrate evaluate models/bundles/fmnist-sigma0.25 --images 1000 --out docs/results.md --json docs/results.json

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
