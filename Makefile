# Two entry points: `make test` and (with the trainer) `make train`. Both create or reuse
# a virtualenv and install what they need. Reuse your own environment (for example one
# with a CUDA torch) with `make test VENV=/path/to/env`: an existing torch is never replaced.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU wheel by default. Elsewhere pass e.g. TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu".
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
STAMP := $(VENV)/.titans-installed-$(shell cat setup.py requirements/constraints.txt | cksum | cut -d' ' -f1)

export DS_ACCELERATOR ?= cpu
export WANDB_MODE ?= offline
export PYTHONUNBUFFERED := 1

# `make train`: the embedded demo corpus -> shards -> a tiny MAC on NPROC CPU processes (ZeRO-2).
DEMO_DIR ?= runs/data/demo
NPROC ?= 2
EXPERIMENT ?= configs/experiments/tiny_mac.yaml
TRAIN_ARGS ?=

.PHONY: install train test test-fast lint format clean

ifeq ($(SKIP_INSTALL),1)
install:
else
install: $(STAMP)
endif

$(STAMP): setup.py requirements/constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@$(PY) -c "import torch" 2>/dev/null \
		&& echo "keeping installed torch $$($(PY) -c 'import torch; print(torch.__version__)')" \
		|| $(PY) -m pip install -q "$(TORCH_SPEC)" $(TORCH_INDEX)
	@$(PY) -m pip install -q -c requirements/constraints.txt -e ".[dev]"
	@rm -f $(VENV)/.titans-installed-*
	@touch $@

train: install
	$(PY) -m data_pipelines.demo --out $(DEMO_DIR) --seq-len 256
	OMP_NUM_THREADS=1 $(PY) -m torch.distributed.run --standalone --nproc_per_node=$(NPROC) \
		-m titans_train.cli --config $(EXPERIMENT) "data.train=[$(DEMO_DIR)]" $(TRAIN_ARGS)

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: install lint
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

format: install
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
