# Two commands after cloning:
#   make quickstart   install into .venv, then train the embedded CPU quickstart (offline, ~15 s once installed)
#   make test         install into .venv, then run the test suite
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
# A CPU build of torch lying on this machine's disk, if there is one; otherwise pip's usual torch.
TORCH ?= $(or $(firstword $(wildcard /opt/wheels/torch-*+cpu-*.whl)),torch)

# Every install takes the exact versions the suite passed with (constraints.txt, written by `make lock`).
LOCK := constraints.txt
LATEST ?= .venv-latest

.PHONY: install install-export quickstart test test-all test-fast test-latest lock docs clean
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet -c $(LOCK) "$(TORCH)"
	$(BIN)/python -m pip install --quiet -c $(LOCK) -e ".[dev,deepspeed]"
	touch $@

# The export extra (llama-cpp-python) compiles llama.cpp from source, once: minutes on 2 cores; pip keeps the
# built wheel, so later installs take seconds. The tests need it; the quickstart does not.
install-export: $(VENV)/.installed-export

$(VENV)/.installed-export: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -c $(LOCK) -e ".[dev,deepspeed,export]"
	touch $@

quickstart: install
	$(BIN)/gemma2-tune sft --recipe recipes/quickstart-cpu.yaml --overwrite

# Everything but the tests marked `real` (the real Gemma 3 270M with its llama.cpp export: 19.5 minutes here, on
# shared cores), `bench` (the CPU benchmark scripts end to end, a second memory measurement: ~6 minutes) and
# `heavy` (a second, slower angle on what a faster test holds: ~4 minutes); `make test-all` runs those too.
test: install-export
	$(BIN)/python -m pytest -q -m "not real and not bench and not heavy" --durations=15

test-all: install-export
	$(BIN)/python -m pytest -q

# The unit tests that train nothing (a few minutes at most on 2 cores): for the edit-test loop.
test-fast: install
	$(BIN)/python -m pytest -q tests/unit -m "not slow"

# The newest versions pyproject.toml's ranges allow (torch stays the installed one), in $(LATEST), then the suite:
# how a moved upper bound becomes a tested decision. After it passes, `make lock` takes that set as the lock.
test-latest:
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install --quiet --upgrade pip
	$(LATEST)/bin/python -c "import torch" 2>/dev/null || $(LATEST)/bin/python -m pip install --quiet -c $(LOCK) "$(TORCH)"
	$(LATEST)/bin/python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(LATEST)/torch.txt
	$(LATEST)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager -c $(LATEST)/torch.txt \
		-e ".[dev,deepspeed,export]"
	$(LATEST)/bin/python tools/lock.py newer $(LATEST)
	$(LATEST)/bin/python -m pytest -q -m "not real and not bench and not heavy" --durations=15

lock:
	$(PYTHON) tools/lock.py write $(LATEST)

clean:
	rm -rf $(VENV) $(LATEST) runs .pytest_cache

.PHONY: docs-generate
# The generated pages: the CLI and config references (from the Typer app and the schemas) and the benchmark tables
# (from bench/*.json). tests/unit/test_docs.py fails when a committed page differs from what this writes.
docs-generate: install
	$(BIN)/python -m gemma2_tune.cli.reference docs
	$(BIN)/python bench/report.py docs/guides/benchmarks.md

# The documentation site, built into site/ (mkdocs serve shows it while you write).
docs: docs-generate
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict
