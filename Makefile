# Two commands do all the set-up on a machine with only Python 3.10+:
#   make run    install into .venv and run the embedded default job (conf/default.yaml -> out/default)
#   make test   install into .venv (with test extras) and run the default test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The CPU build of torch: an unpinned torch with none installed pulls several GB of CUDA wheels.
TORCH  ?= torch==2.13.0
export HF_HUB_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: run test test-faults test-walkthrough test-slow bench-tokenize bench-embed clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

run: $(VENV)/.installed
	$(BIN)/embedpipe run conf/default.yaml

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

test-faults: $(VENV)/.installed
	$(BIN)/python -m pytest -q -m faults

test-walkthrough: $(VENV)/.installed
	$(BIN)/python -m pytest -q -m walkthrough

test-slow: $(VENV)/.installed
	$(BIN)/python -m pytest -q -m slow

bench-tokenize: $(VENV)/.installed
	$(BIN)/python benchmarks/tokenize_stage.py --mb 300

bench-embed: $(VENV)/.installed
	$(BIN)/python benchmarks/embed_stage.py

clean:
	rm -rf out bench-work
