# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP_BASE := $(VENV)/.installed-base
STAMP_TEST := $(VENV)/.installed-test

.PHONY: demo test lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# TensorFlow is an extra (gradprobe runs on JAX or PyTorch without it); `make demo`
# runs on Keras' default backend, TensorFlow, so the base install includes it.
$(STAMP_BASE): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".[tensorflow]"
	touch $@

# PyTorch first, pinned to the CPU build that lies on this project's machines (a bare
# "torch" would pull a CUDA build of several GB); the test extras then find it installed.
$(STAMP_TEST): pyproject.toml $(STAMP_BASE)
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[test,tensorflow,jax,torch]"
	touch $@

demo: $(STAMP_BASE)
	TF_CPP_MIN_LOG_LEVEL=2 $(VENV)/bin/gradprobe demo --out gradprobe-demo --force

test: $(STAMP_TEST)
	sh scripts/install-browser.sh
	$(PY) -m ruff check src tests benchmarks
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) -m pytest -q
	KERAS_BACKEND=jax TF_CPP_MIN_LOG_LEVEL=2 $(PY) -m pytest -q tests/backends
	KERAS_BACKEND=torch TF_CPP_MIN_LOG_LEVEL=2 $(PY) -m pytest -q tests/backends

lint: $(STAMP_TEST)
	$(PY) -m ruff check src tests benchmarks

bench: $(STAMP_BASE)
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) benchmarks/bench_core.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
