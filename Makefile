# saelect: every target bootstraps .venv on its own.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# A second venv for the timm/torchvision tests: torch's CUDA build with its matching torchvision.
VISION_VENV := .venv-vision
VISION_STAMP := $(VISION_VENV)/.installed
FMNIST_DIR := /usr/share/datasets/fashion-mnist

export RAY_USAGE_STATS_ENABLED ?= 0
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER ?= 0
export RAY_TRAIN_HEALTH_CHECK_INTERVAL_S ?= 0.2
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv venv-vision data test test-unit demo bench lint clean

# pyproject.toml declares version ranges; constraints.txt holds the exact versions installed here.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt torch
	$(BIN)/pip install -q -c constraints.txt -e ".[service,dev,text]"
	touch $(STAMP)

venv: $(STAMP)

# constraints-vision.txt pins torch, torchvision and timm; every other version comes from
# constraints.txt without its torch pin (a CPU-only torch, which PyPI's torchvision cannot load).
$(VISION_STAMP): pyproject.toml constraints.txt constraints-vision.txt
	test -x $(VISION_VENV)/bin/python || $(PY) -m venv $(VISION_VENV)
	$(VISION_VENV)/bin/pip install -q --upgrade pip
	grep -v '^torch==' constraints.txt > $(VISION_VENV)/constraints-base.txt
	$(VISION_VENV)/bin/pip install -q -c $(VISION_VENV)/constraints-base.txt \
	  -c constraints-vision.txt -e ".[service,vision]"
	touch $(VISION_STAMP)

venv-vision: $(VISION_STAMP)

# Fashion-MNIST comes from Debian's dataset-fashion-mnist package (installed when missing and root).
data:
	@if [ ! -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ] && [ ! -f $(FMNIST_DIR)/train-images-idx3-ubyte ]; then \
	  if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null; then \
	    (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	     (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null)); \
	  else echo "Fashion-MNIST missing: install the Debian package dataset-fashion-mnist"; fi; \
	fi

# The timm/torchvision tests run in $(VISION_VENV), named here: they fail, not skip, without it.
test test-unit: export SAELECT_VISION_PYTHON := $(CURDIR)/$(VISION_VENV)/bin/python

test: venv venv-vision data
	$(BIN)/python -m pytest -q tests

test-unit: venv venv-vision
	$(BIN)/python -m pytest -q tests/unit

demo: venv data
	$(BIN)/saelect demo

bench: venv data
	$(BIN)/python benchmarks/run_all.py

lint: venv
	$(BIN)/ruff check saelect service workers client tests benchmarks
	$(BIN)/ruff format --check saelect service workers client tests benchmarks
	$(BIN)/mypy service workers client

clean:
	rm -rf $(VENV) $(VISION_VENV) .pytest_cache .mypy_cache .ruff_cache
