# Two entry points: `make test` and (with the trainer) `make train`. Both create or reuse
# a virtualenv and install what they need. Reuse your own environment (for example one
# with a CUDA torch) with `make test VENV=/path/to/env`: an existing torch is never replaced.
# GPUs: `make install-gpu` adds flash-attn (docs/gpus.md).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU wheel by default. Elsewhere pass e.g. TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu".
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
STAMP := $(VENV)/.titans-installed-$(shell cat setup.py requirements/constraints.txt | cksum | cut -d' ' -f1)
# flash-attn (`make install-gpu`): compiled from source; MAX_JOBS bounds the parallel compiles.
MAX_JOBS ?= 4

# The venv's own tools win in every recipe (its ninja builds DeepSpeed's C++ ops, the same one
# an activated venv uses). TORCH_EXTENSIONS_DIR (one cache per environment) is set by
# titans_train itself on import (titans_train/jit_build.py), so `make` and an activated venv agree.
export PATH := $(abspath $(VENV))/bin:$(PATH)

# DS_ACCELERATOR is left to titans_train, which sets it from torch's device when unset
# (distributed.default_ds_accelerator): `make train` on a GPU host trains on its GPUs.
export WANDB_MODE ?= offline
export PYTHONUNBUFFERED := 1

# `make train`: the embedded demo corpus -> shards -> a tiny MAC on NPROC CPU processes (ZeRO-2).
DEMO_DIR ?= runs/data/demo
# 2 CPU processes; on a GPU host 1, 2 or 4 GPUs (the demo's global batch of 8 must divide).
# Recursively expanded: evaluated in the recipe, after `install` made the venv.
NPROC ?= $(shell n=$$($(PY) launch/visible_gpus.py 2>/dev/null || echo 0); \
	if [ "$$n" -ge 4 ]; then echo 4; elif [ "$$n" -ge 1 ]; then echo $$(( n >= 2 ? 2 : 1 )); else echo 2; fi)
EXPERIMENT ?= configs/experiments/tiny_mac.yaml
TRAIN_ARGS ?=

.PHONY: install install-gpu check-build-tools train test test-fast lint format clean

ifeq ($(SKIP_INSTALL),1)
install:
else
install: $(STAMP)
endif

$(STAMP): setup.py requirements/constraints.txt
	@test -x $(PY) || { echo "make: creating the virtualenv $(VENV)"; $(PYTHON) -m venv $(VENV); }
	@echo "make: installing into $(VENV) (about 2 minutes the first time; later runs skip this)"
	@$(PY) -m pip install -q --upgrade pip
	@$(PY) -c "import torch" 2>/dev/null \
		&& echo "make: keeping installed torch $$($(PY) -c 'import torch; print(torch.__version__)')" \
		|| { echo "make: installing $(TORCH_SPEC) (~1 minute)"; \
		     $(PY) -m pip install -q "$(TORCH_SPEC)" $(TORCH_INDEX); }
	@echo "make: installing titans-train and its requirements (~1 minute)"
	@$(PY) -m pip install -q -c requirements/constraints.txt -e ".[dev]"
	@rm -f $(VENV)/.titans-installed-*
	@touch $@
	@echo "make: $(VENV) is ready"

# flash-attn for CUDA machines (docs/gpus.md): no wheel on PyPI, so pip compiles it against the
# installed CUDA torch, which its setup.py imports (hence --no-build-isolation).
install-gpu: install
	@$(PY) -c "import torch, sys; sys.exit(torch.version.cuda is None)" || { echo \
		"make install-gpu: torch $$($(PY) -c 'import torch; print(torch.__version__)') in $(VENV) is not a CUDA build; install one first (docs/gpus.md)" >&2; exit 1; }
	@test -n "$$CUDA_HOME" || command -v nvcc >/dev/null || { echo \
		"make install-gpu: flash-attn compiles CUDA code: put the CUDA toolkit's nvcc on PATH or set CUDA_HOME (docs/gpus.md)" >&2; exit 1; }
	@echo "make: compiling flash-attn ($$(grep -v '^#' requirements/gpu.txt)) with MAX_JOBS=$(MAX_JOBS): 10-60 minutes, several GB of RAM per job"
	$(PY) -m pip install -q setuptools wheel packaging psutil ninja
	MAX_JOBS=$(MAX_JOBS) $(PY) -m pip install --no-build-isolation -r requirements/gpu.txt
	@$(PY) -c "import flash_attn; print('make: flash-attn', flash_attn.__version__, 'installed')"

# DeepSpeed JIT-compiles C++ at start-up on CPU: it needs a compiler (torch runs $$CXX, else c++)
# and ninja (DeepSpeed installs it into the venv).
check-build-tools:
	@command -v "$${CXX:-c++}" >/dev/null || { echo \
		"make: no C++ compiler ('$${CXX:-c++}' is not on PATH): DeepSpeed compiles C++ at start-up on CPU. Install g++ (Debian/Ubuntu: apt-get install g++; Fedora/RHEL: dnf install gcc-c++) or set CXX" >&2; exit 1; }
	@command -v ninja >/dev/null || { echo \
		"make: no ninja in $(VENV)/bin or on PATH: DeepSpeed builds its C++ ops with it. Run $(PY) -m pip install ninja" >&2; exit 1; }

train: install check-build-tools
	$(PY) -m data_pipelines.demo --out $(DEMO_DIR) --seq-len 256
	OMP_NUM_THREADS=1 $(PY) -m torch.distributed.run --standalone --nproc_per_node=$(NPROC) \
		-m titans_train.cli --config $(EXPERIMENT) "data.train=[$(DEMO_DIR)]" $(TRAIN_ARGS)

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# pytest-xdist: TEST_WORKERS processes (0: none). Tests sharing an expensive session fixture run
# on one worker (tests/conftest.py); many tests start 2 ranks of their own, so 2 suit 2 cores.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

test: install lint check-build-tools
	$(PYTEST)

test-fast: install check-build-tools
	$(PYTEST) -m "not slow"

format: install
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
