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

.PHONY: install test test-fast lint format bench-memory clean

install: $(STAMP)

$(STAMP): setup.py requirements/constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@$(PY) -c "import torch" 2>/dev/null \
		&& echo "keeping installed torch $$($(PY) -c 'import torch; print(torch.__version__)')" \
		|| $(PY) -m pip install -q "$(TORCH_SPEC)" $(TORCH_INDEX)
	@$(PY) -m pip install -q -c requirements/constraints.txt -e ".[dev]"
	@rm -f $(VENV)/.titans-installed-*
	@touch $@

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
