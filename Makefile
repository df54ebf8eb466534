# make run: set up .venv and run the whole pipeline on the built-in shapes dataset.
# make test: set up .venv and run the test suite.   make bench: the side-by-side benchmarks.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= pipelines/configs/quickstart.yaml

.PHONY: run test test-slow bench gpu-check setup clean cluster-demo

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

run: setup
	$(BIN)/visionflow run --config $(CONFIG)

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

bench: setup
	$(BIN)/python -m benchmarks.run_all

# A real multi-node Ray cluster on this machine (a head and two worker nodes, token auth) until Ctrl-C.
cluster-demo: setup
	$(BIN)/python tests/multinode.py

# The GPU paths (NCCL, AMP, two-tower AlexNet, Faster R-CNN steps, the Serve NMS stage on the GPU) in a few
# minutes; on a machine without a GPU it says what it skipped and exits 0.
gpu-check: setup
	$(BIN)/python -m benchmarks.gpu_check

clean:
	rm -rf runs outputs .pytest_cache
