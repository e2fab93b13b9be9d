# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch/torchvision are chosen here, not in pyproject.toml (pip takes them from this machine's disk).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
FMNIST_DIR := /usr/share/datasets/fashion-mnist
DEMO_DIR ?= runs/demo
DEMO_STORE ?= data/fashion-mnist

.PHONY: setup cxx demo test test-fast lint format bench clean

setup: $(VENV)/.installed $(FMNIST_DIR)/train-images-idx3-ubyte.gz cxx

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PINS)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

# The embedded default dataset: Debian's dataset-fashion-mnist (MIT licence).
$(FMNIST_DIR)/train-images-idx3-ubyte.gz:
	@if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q dataset-fashion-mnist

# A C++ compiler: alexnet builds its fused ReLU-LRN-pool CPU kernel with it on first use, and
# torch.compile (the LRN's other kernels) needs one too. Without it both fall back to slower
# eager code, with a warning.
cxx:
	@command -v $${CXX:-g++} >/dev/null || { if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q g++; }

demo: setup
	$(BIN)/alexnet demo --out $(DEMO_DIR) --store $(DEMO_STORE)

lint: $(VENV)/.installed
	$(BIN)/ruff format --check src tests bench
	$(BIN)/ruff check src tests bench

format: $(VENV)/.installed
	$(BIN)/ruff format src tests bench
	$(BIN)/ruff check --fix src tests bench

test: setup lint
	$(BIN)/python -m pytest -q

# The suite without the tests marked slow (a quick loop while developing).
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

bench: setup
	$(BIN)/alexnet bench model
	$(BIN)/alexnet bench data

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
