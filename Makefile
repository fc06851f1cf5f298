# The two entry points named in the README: `make demo` (set up, then the main job: `reuse demo`)
# and `make test` (set up, then the whole test suite); `make bench` runs the kernel benchmarks. The first run creates .venv and builds the
# extension; later runs reuse both and recompile only the kernels that changed.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CUDA 13.0 builds that match this machine's nvcc; pip takes them from the local disk.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
EXT_SOURCES := $(shell find csrc -type f) setup.py

.PHONY: setup demo bench device-wheels test clean

setup: $(VENV)/.ext-stamp

$(VENV)/.deps-stamp: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_PINS) setuptools wheel ninja
	REUSE_CORE_SKIP_EXT=1 $(PY) -m pip install -q --no-build-isolation -e ".[test]"
	touch $@

$(VENV)/.ext-stamp: $(VENV)/.deps-stamp $(EXT_SOURCES)
	$(PY) setup.py -q build_ext --inplace
	touch $@

demo: setup
	$(VENV)/bin/reuse demo

bench: setup
	# liger-kernel is a contender of fused_linear_distill; its chunked losses are plain PyTorch, so
	# no triton (its GPU dependency) is needed on the CPU
	$(PY) -m pip install -q --no-deps "liger-kernel==0.8.5"
	$(VENV)/bin/reuse bench

# wheels for benchmarks/device_check.sh (the GPU machine has no package registry): run with carry .whl
device-wheels:
	$(PY) -m pip download -q --no-deps -d .whl "liger-kernel==0.8.5"

test: setup
	$(VENV)/bin/reuse doctor
	$(PY) -m pytest -q tests
	REUSE_BENCH_QUICK=1 $(PY) -m pytest -q benchmarks --benchmark-disable

clean:
	rm -rf build reuse_core/_C*.so $(VENV)/.ext-stamp
