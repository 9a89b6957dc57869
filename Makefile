# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# `make demo` installs the backend it runs on: KERAS_BACKEND (tensorflow, jax or torch;
# TensorFlow when unset, as Keras).
BACKEND := $(or $(KERAS_BACKEND),tensorflow)
STAMP_BASE := $(VENV)/.installed-$(BACKEND)
STAMP_TEST := $(VENV)/.installed-test

.PHONY: demo test lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Every backend is an extra (gradprobe runs on any one of them without the others).
# PyTorch is pinned first to the CPU build that lies on this project's machines (a bare
# "torch" would pull a CUDA build of several GB); the extras then find it installed.
TORCH_CPU := "torch==2.13.0"
$(STAMP_BASE): pyproject.toml | $(PY)
	$(if $(filter torch,$(BACKEND)),$(PY) -m pip install --quiet $(TORCH_CPU))
	$(PY) -m pip install --quiet -e ".[$(BACKEND)]"
	touch $@

$(STAMP_TEST): pyproject.toml $(STAMP_BASE)
	$(PY) -m pip install --quiet $(TORCH_CPU)
	$(PY) -m pip install --quiet -e ".[test,tensorflow,jax,torch]"
	touch $@

demo: $(STAMP_BASE)
	TF_CPP_MIN_LOG_LEVEL=2 $(VENV)/bin/gradprobe demo --out gradprobe-demo --force

test: $(STAMP_TEST)
	sh scripts/install-browser.sh
	$(PY) -m ruff check src tests benchmarks
	KERAS_BACKEND=tensorflow TF_CPP_MIN_LOG_LEVEL=2 $(PY) -m pytest -q
	KERAS_BACKEND=jax TF_CPP_MIN_LOG_LEVEL=2 $(PY) -m pytest -q tests/backends tests/test_request.py
	KERAS_BACKEND=torch TF_CPP_MIN_LOG_LEVEL=2 $(PY) -m pytest -q tests/backends tests/test_request.py

lint: $(STAMP_TEST)
	$(PY) -m ruff check src tests benchmarks

bench: $(STAMP_BASE)
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) benchmarks/bench_core.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
