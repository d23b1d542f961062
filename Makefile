# zaya-repro: every target sets the project up first if .venv is missing.
#   make reproduce   run the notebook pipeline on params/tiny.yaml (CPU, offline) -> outputs/tiny/
#   make test        the test suite (CPU; GPU tests run too where CUDA is present)
#   make bench       model/engine/SFT-document-mask benchmarks -> outputs/bench/*.json
#   make bench-kernels  kernel benchmarks (GPU; interpreter on CPU) -> outputs/bench/kernels*.json
#   make lab         JupyterLab with the project's kernel
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROFILE ?= tiny
# pyproject.toml holds ranges; constraints.txt the exact tested set, which setup installs with -c (reproducible and
# fast). It pins torch==2.13.0: on a CPU-only machine that resolves the local CPU wheel; on a CUDA machine PyPI's
# default Linux wheel is the CUDA build. To choose another build of it, e.g.
#   make setup TORCH_INDEX=https://download.pytorch.org/whl/cu128
# To keep a torch you installed into $(VENV) yourself (any torch >= 2.13; install it before setup):
#   make setup OWN_TORCH=1
# CONSTRAINTS= (empty) installs from the ranges alone (newest releases; pin torch yourself, see README).
TORCH_INDEX ?=
OWN_TORCH ?=
CONSTRAINTS ?= constraints.txt
PIP_EXTRA := $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX),)
# A CUDA build of torch pins its own triton (torch 2.13.0: triton==3.7.1); the constraints' triton (3.9.0, for the CPU
# interpreter; torch's CPU wheel needs none) is dropped when a CUDA torch is expected (TORCH_INDEX or nvidia-smi).
CUDA_TORCH := $(if $(TORCH_INDEX),1,$(shell command -v nvidia-smi >/dev/null 2>&1 && echo 1))
UNPINNED := $(if $(OWN_TORCH),torch triton,$(if $(CUDA_TORCH),triton,))
empty :=
space := $(empty) $(empty)
TEST_ENV := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=2 MPLBACKEND=Agg

.PHONY: setup test reproduce bench bench-kernels lab clean-outputs

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	@test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(if $(CONSTRAINTS),@grep -v -E '^($(subst $(space),|,$(strip $(UNPINNED) _none_)))==' $(CONSTRAINTS) > $(VENV)/constraints.txt)
	$(VENV)/bin/pip install $(PIP_EXTRA) $(if $(CONSTRAINTS),-c $(VENV)/constraints.txt) -e .
	@touch $@

test: setup
	$(TEST_ENV) $(PY) -m pytest -q $(PYTEST_ARGS)

reproduce: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(PY) -m zaya_lib run --params params/$(PROFILE).yaml

bench: setup
	$(TEST_ENV) $(PY) benchmarks/bench_model.py
	$(TEST_ENV) $(PY) benchmarks/bench_engine.py
	$(TEST_ENV) $(PY) benchmarks/bench_sft.py

bench-kernels: setup
	$(TEST_ENV) $(PY) benchmarks/bench_kernels.py

lab: setup
	$(VENV)/bin/jupyter lab --notebook-dir=. notebooks/

clean-outputs:
	rm -rf outputs/*/ 
