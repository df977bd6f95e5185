# Two commands matter: `make demo` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
NPROC ?= 2

.PHONY: setup test test-fast demo docs clean

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

# 1) a small base model, fully trained over 2 pipeline stages and saved as a Hugging Face directory;
# 2) a LoRA fine-tune of it over 2 stages, adapter saved, reloaded in one process, generating.
demo: setup
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --standalone --nproc-per-node $(NPROC) examples/train_pp.py \
		--output_dir outputs/base --max_steps 150 --disable_tqdm true
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --standalone --nproc-per-node $(NPROC) examples/finetune_lora.py \
		--base_model outputs/base/final --output_dir outputs/lora

# Regenerate docs/architectures.md and docs/vlm-architectures.md from the architecture sweeps.
docs: setup
	HF_PP_WRITE_DOCS=1 $(PY) -m pytest tests/test_architectures.py -k every_planned -q
	HF_PP_WRITE_DOCS=1 $(PY) -m pytest tests/test_vlm_pipeline.py -k every_vlm -q

clean:
	rm -rf $(VENV) build *.egg-info
