# lorapipe — the two commands a user needs are `make run` and `make test`.
SHELL := /bin/bash
VENV  := .venv
BIN   := $(abspath $(VENV))/bin
CORES ?= 2
# The MindSpore/MindFormers pair (README "MindSpore and MindFormers versions"): the one a cluster's CANN
# dictates. 2.9.0 (default) with MindFormers 1.9.0, 2.7.2 with 1.8.0, 2.7.1 with 1.7.0.
MINDSPORE ?= 2.9.0
REQUIREMENTS := $(if $(filter 2.9.0,$(MINDSPORE)),envs/requirements.txt,envs/requirements-ms$(MINDSPORE).txt)
ifneq ($(filter 2.10%,$(MINDSPORE)),)
$(error MINDSPORE=$(MINDSPORE): its MindFormers 2.0.0 requires hyper-parallel~=1.0.0, which is not on PyPI, and `import mindformers` fails without it; use 2.9.0, 2.7.2 or 2.7.1)
endif
ifneq ($(filter 2.8%,$(MINDSPORE)),)
$(error MINDSPORE=$(MINDSPORE): no MindFormers release accepts it (1.8.0 needs ~=2.7.2, 1.9.0 needs ~=2.9.0); use 2.9.0, 2.7.2 or 2.7.1)
endif
ifeq ($(wildcard $(REQUIREMENTS)),)
$(error MINDSPORE=$(MINDSPORE): not a supported pair (no $(REQUIREMENTS)); use 2.9.0, 2.7.2 or 2.7.1)
endif
STAMP := $(VENV)/.lorapipe-installed-ms$(MINDSPORE)
# torch from PyTorch's CPU wheel index first: PyPI's default torch is the CUDA build, gigabytes more. Where
# that index cannot be reached, pip's other sources (PyPI, a local wheel) give the pinned version.
TORCH := $(shell grep -oE '^torch==[^ ]+' envs/common.txt)
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
# Where `make test-matrix` builds its venvs (about 4.4 GB each) and runs the tiny default per pair.
MATRIX_DIR ?= $(HOME)/.cache/lorapipe/matrix
DEPLOY_STAMP := $(VENV)/.llama-cpp-installed
# lm-evaluation-harness, in a venv of its own (envs/lmeval-requirements.txt): `make test-lmeval`.
LMEVAL_VENV := .venv-lmeval
LMEVAL_STAMP := $(LMEVAL_VENV)/.lorapipe-installed
# llama.cpp's CPU backend only: no BLAS, no multimodal library (llama-cpp-python builds libllama, ggml and
# llama.cpp's common library, which it forces on).
LLAMA_CPP_CMAKE_ARGS := -DLLAVA_BUILD=OFF -DGGML_BLAS=OFF
# Snakemake's shell steps find the venv's tools (msrun, python) first.
export PATH := $(BIN):$(PATH)

.PHONY: setup run test test-slow test-deploy test-lmeval test-slurm test-matrix dag clean clean-all

## setup: create .venv with the pinned stack from envs/ (quick when already done)
setup: $(STAMP)

$(STAMP): $(REQUIREMENTS) envs/common.txt pyproject.toml
	@python3 -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "make setup: Python 3.11 is needed (MindSpore 2.9 and MindFormers 1.9 ship wheels for it), but python3 is " + sys.version.split()[0])'
	test -x $(BIN)/python || python3 -m venv $(VENV)
	rm -f $(VENV)/.lorapipe-installed*
	@echo "make setup: installing MindSpore $(MINDSPORE), its MindFormers, torch (CPU), transformers, Snakemake and the rest of $(REQUIREMENTS) into $(VENV) (about 5 GB; several quiet minutes the first time)"
	$(BIN)/pip install --disable-pip-version-check -q --retries 0 --timeout 30 --index-url $(TORCH_CPU_INDEX) $(TORCH) \
		|| $(BIN)/pip install --disable-pip-version-check -q $(TORCH)
	$(BIN)/pip install --disable-pip-version-check -q -r $(REQUIREMENTS)
	$(BIN)/pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	@echo "make setup: done ($(VENV))"
	touch $@

## run: the whole recipe on the embedded tiny default (config/config.yaml), on CPU
run: setup
	$(BIN)/snakemake --cores $(CORES)

## test: the test suite (unit, parity, workflow, one end-to-end run of the tiny default)
test: setup
	$(BIN)/python -m pytest -q

## test-slow: the tests marked slow (kill points of a whole run, every deterministic step rerun elsewhere, the
## packed tiny 13B end to end, networks at Baichuan2-7B/13B widths; ~8 min)
test-slow: setup
	$(BIN)/python -m pytest -q -m slow

## test-deploy: build llama-cpp-python from source for the CPU (envs/deploy-requirements.txt; the first time
## only: 20 CPU-minutes, so ~11 min on 2 idle cores) and prove the GGUF export in llama.cpp itself (tests/deploy)
test-deploy: setup $(DEPLOY_STAMP)
	$(BIN)/python -m pytest -q -s tests/deploy

$(DEPLOY_STAMP): envs/deploy-requirements.txt $(STAMP)
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$(CORES) $(BIN)/pip install \
		--disable-pip-version-check -q --no-binary llama-cpp-python -r envs/deploy-requirements.txt
	touch $@

## test-lmeval: lm-evaluation-harness 0.4.x in .venv-lmeval (envs/lmeval-requirements.txt; built once, ~1 min),
## then prove that `snakemake eval_tasks` gives its prompts, log-likelihoods and picks on the tiny default
## (tests/lmeval; C-Eval, CMMLU and MMLU from ../shared/eval, or LORAPIPE_EVAL_DIR; ~6 min)
test-lmeval: setup $(LMEVAL_STAMP)
	LORAPIPE_LMEVAL_PYTHON=$(abspath $(LMEVAL_VENV))/bin/python $(BIN)/python -m pytest -q -s tests/lmeval

$(LMEVAL_STAMP): envs/lmeval-requirements.txt envs/common.txt
	test -x $(LMEVAL_VENV)/bin/python || python3 -m venv $(LMEVAL_VENV)
	$(LMEVAL_VENV)/bin/pip install --disable-pip-version-check -q --retries 0 --timeout 30 --index-url $(TORCH_CPU_INDEX) $(TORCH) \
		|| $(LMEVAL_VENV)/bin/pip install --disable-pip-version-check -q $(TORCH)
	$(LMEVAL_VENV)/bin/pip install --disable-pip-version-check -q -r envs/lmeval-requirements.txt
	touch $@

## test-slurm: bring up the two-node test Slurm cluster on this machine (root; tests/slurm/cluster.sh
## installs and starts munge, MariaDB, slurmdbd, slurmctld, slurmd n1 and n2) and run the workflow on it
test-slurm: setup
	bash tests/slurm/cluster.sh up
	USER=$${USER:-$$(id -un)} LORAPIPE_TEST_SLURM=1 $(BIN)/python -m pytest -q -s tests/slurm

## test-matrix: for each supported MindSpore/MindFormers pair, a venv in $(MATRIX_DIR) (built once), the tiny
## default end to end and the fast tests; prints pair, setup time, run time, pass or fail (tests/matrix/run_matrix.py);
## PAIRS="2.7.1 2.7.2" runs some pairs only
test-matrix:
	python3 tests/matrix/run_matrix.py --matrix_dir $(MATRIX_DIR) --cores $(CORES) $(if $(PAIRS),--pairs $(PAIRS))

## dag: the rule graph and the job DAG of the default config as mermaid (docs/*.mmd), SVG if dot exists
dag: setup
	mkdir -p docs
	$(BIN)/snakemake --rulegraph mermaid-js > docs/rulegraph.mmd
	$(BIN)/snakemake --dag mermaid-js > docs/dag.mmd
	if command -v dot >/dev/null; then $(BIN)/snakemake --rulegraph dot | dot -Tsvg > docs/rulegraph.svg; fi
	@echo "wrote docs/rulegraph.mmd and docs/dag.mmd"

## clean: remove the tiny default's run (results/tiny) and MindFormers' output/ folder; other runs stay
clean:
	rm -rf results/tiny output

## clean-all: remove every run under results/ (a 7B one included) and Snakemake's state (keeps .venv)
clean-all:
	rm -rf results .snakemake output
