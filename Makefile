# Two commands after cloning:
#   make quickstart   install into .venv, then train the embedded CPU quickstart (offline, ~15 s once installed)
#   make test         install into .venv, then run the test suite
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
# A CPU build of torch lying on this machine's disk, if there is one; otherwise pip's usual torch.
TORCH ?= $(or $(firstword $(wildcard /opt/wheels/torch-*+cpu-*.whl)),torch)

.PHONY: install quickstart test docs clean
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev,deepspeed,export]"  # export compiles llama.cpp once (pip keeps the wheel)
	touch $@

quickstart: install
	$(BIN)/gemma2-tune sft --recipe recipes/quickstart-cpu.yaml --overwrite

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache

docs: install
	$(BIN)/python -m gemma2_tune.config.reference README.md
