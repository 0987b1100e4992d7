# lorapipe — the two commands a user needs are `make run` and `make test`.
SHELL := /bin/bash
VENV  := .venv
BIN   := $(abspath $(VENV))/bin
STAMP := $(VENV)/.lorapipe-installed
CORES ?= 2
DEPLOY_STAMP := $(VENV)/.llama-cpp-installed
# llama.cpp's CPU backend only: no BLAS, no multimodal library (llama-cpp-python builds libllama, ggml and
# llama.cpp's common library, which it forces on).
LLAMA_CPP_CMAKE_ARGS := -DLLAVA_BUILD=OFF -DGGML_BLAS=OFF
# Snakemake's shell steps find the venv's tools (msrun, python) first.
export PATH := $(BIN):$(PATH)

.PHONY: setup run test test-deploy test-slurm dag clean

## setup: create .venv with the pinned stack from envs/ (quick when already done)
setup: $(STAMP)

$(STAMP): envs/requirements.txt pyproject.toml
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -r envs/requirements.txt
	$(BIN)/pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	touch $@

## run: the whole recipe on the embedded tiny default (config/config.yaml), on CPU
run: setup
	$(BIN)/snakemake --cores $(CORES)

## test: the test suite (unit, parity, workflow, one end-to-end run of the tiny default)
test: setup
	$(BIN)/python -m pytest -q

## test-deploy: build llama-cpp-python from source for the CPU (envs/deploy-requirements.txt; the first time
## only: 20 CPU-minutes, so ~11 min on 2 idle cores) and prove the GGUF export in llama.cpp itself (tests/deploy)
test-deploy: setup $(DEPLOY_STAMP)
	$(BIN)/python -m pytest -q -s tests/deploy

$(DEPLOY_STAMP): envs/deploy-requirements.txt $(STAMP)
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$(CORES) $(BIN)/pip install \
		--disable-pip-version-check -q --no-binary llama-cpp-python -r envs/deploy-requirements.txt
	touch $@

## test-slurm: bring up the two-node test Slurm cluster on this machine (root; tests/slurm/cluster.sh
## installs and starts munge, MariaDB, slurmdbd, slurmctld, slurmd n1 and n2) and run the workflow on it
test-slurm: setup
	bash tests/slurm/cluster.sh up
	USER=$${USER:-$$(id -un)} LORAPIPE_TEST_SLURM=1 $(BIN)/python -m pytest -q -s tests/slurm

## dag: the rule graph and the job DAG of the default config as mermaid (docs/*.mmd), SVG if dot exists
dag: setup
	mkdir -p docs
	$(BIN)/snakemake --rulegraph mermaid-js > docs/rulegraph.mmd
	$(BIN)/snakemake --dag mermaid-js > docs/dag.mmd
	if command -v dot >/dev/null; then $(BIN)/snakemake --rulegraph dot | dot -Tsvg > docs/rulegraph.svg; fi
	@echo "wrote docs/rulegraph.mmd and docs/dag.mmd"

## clean: remove every artifact and Snakemake's state (keeps .venv)
clean:
	rm -rf results .snakemake output
