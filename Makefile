# `make demo` runs the pipeline on the embedded default world; `make test` runs every check.
# Both create and use the virtual environment at .venv.
VENV := .venv
PY := $(VENV)/bin/python
SNAKEMAKE := $(VENV)/bin/snakemake
WORLD ?= config/demo.yaml

.PHONY: setup demo demo-all demo-attacks test fast demo-test lint format

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0  # the CPU wheel; any other torch pulls a CUDA build
	$(PY) -m pip install -q -c constraints.txt -e ".[model,report,workflow,dev]"
	touch $@

demo: setup
	$(SNAKEMAKE) --cores 2 table1 --configfile=$(WORLD)

# The toy world with every method: the paper's and the field's baselines (config/baselines.yaml).
demo-all: setup
	$(SNAKEMAKE) --cores 2 table1 --configfile $(WORLD) config/baselines.yaml

# Erasure under attack on the toy world (after `make demo`: its Table 1 images are the
# unattacked ones).
demo-attacks: setup
	$(SNAKEMAKE) --cores 2 attacks --configfile=$(WORLD)

lint: setup
	$(VENV)/bin/ruff format --check src tests bench workflow/scripts
	$(VENV)/bin/ruff check src tests bench workflow/scripts
	$(VENV)/bin/snakefmt --check Snakefile workflow/rules
	$(PY) -m crce.config_schema --check

format: setup
	$(VENV)/bin/ruff format src tests bench workflow/scripts
	$(VENV)/bin/ruff check --fix src tests bench workflow/scripts
	$(VENV)/bin/snakefmt Snakefile workflow/rules

# The suite CI runs, the toy demo end to end included. `make fast` skips the end-to-end
# workflow runs; `make demo-test` runs only the demo and its erasure targets.
test: lint
	$(PY) -m pytest -q

fast: lint
	$(PY) -m pytest -q -m "not slow and not demo"

demo-test: setup
	$(PY) -m pytest -q -m demo
