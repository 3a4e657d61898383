# make demo: create .venv, install the tested versions, train the embedded default (tiny InternVL, demo data).
# make test: install the dev extras too and run the test suite (what CI runs).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt
# A CPU-only machine gets the CPU build of torch, never the multi-GB CUDA one.
TORCH := $(if $(shell command -v nvidia-smi 2>/dev/null),torch==2.13.0,torch==2.13.0+cpu)

.PHONY: demo test install clean

$(VENV)/.stamp-torch: constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) "$(TORCH)"
	touch $@

$(VENV)/.stamp-base: $(VENV)/.stamp-torch pyproject.toml
	$(PIP) -e .
	touch $@

$(VENV)/.stamp-dev: $(VENV)/.stamp-base
	$(PIP) -e ".[dev]"
	touch $@

install: $(VENV)/.stamp-base

demo: $(VENV)/.stamp-base
	$(PY) -m vltrain

test: $(VENV)/.stamp-dev
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) outputs multirun
