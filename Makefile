# Two commands matter: `make demo` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
NPROC ?= 2

.PHONY: setup test test-fast demo clean

setup: $(STAMP)

# Reinstall only when the pins or the package metadata change.
$(STAMP): constraints.txt setup.cfg setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, alone: pip must take the pinned CPU build before anything asks for torch.
	$(PIP) install --quiet -c constraints.txt torch
	$(PIP) install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

test: setup
	$(PY) -m pytest tests

test-fast: setup
	$(PY) -m pytest tests -m "not slow"

demo: setup
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --nproc-per-node $(NPROC) --master-addr 127.0.0.1 --master-port 29517 examples/custom_model_pipeline.py

clean:
	rm -rf $(VENV) build *.egg-info
